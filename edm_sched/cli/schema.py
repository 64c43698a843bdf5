"""``edm-sched migrate``: install or upgrade schema edm."""

from __future__ import annotations

import argparse
from typing import Any

from edm_sched.cli.base import EXIT_OK, database, emit


def cmd_migrate(args: argparse.Namespace) -> int:
    from edm_sched.migrations import migrate

    with database(args, need_schema=False) as dsn:
        status = migrate(dsn)
    emit(
        args,
        {"ok": True, "applied": status.applied, "newly_applied": status.newly_applied},
        f"schema edm at version {max(status.applied)}; "
        + (f"applied {status.newly_applied}" if status.newly_applied else "nothing to do"),
    )
    return EXIT_OK


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("migrate", parents=[common], help="install or upgrade the edm schema",
                       description="Apply the migrations this edm-sched ships that the "
                       "database lacks, each in its own transaction.")
    p.set_defaults(func=cmd_migrate)
