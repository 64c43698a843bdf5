"""What every command shares: which database, how to print, exit codes."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

from edm_sched import db, errors

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3

Handler = Callable[[argparse.Namespace], int]

DEFAULT_DATABASE = "edm"
"""The database the CLI uses on the embedded server (the demo's too)."""


@contextlib.contextmanager
def database(args: argparse.Namespace, *, dbname: str = DEFAULT_DATABASE,
             need_schema: bool = True, keep_server: bool = False) -> Iterator[str]:
    """The DSN to use: --dsn / $EDM_SCHED_DSN, else the embedded server.

    An embedded server this command had to start is stopped again when the
    command ends (unless ``keep_server``); one already running (``edm-sched
    embedded start``) is left running. With ``need_schema``, a database
    without schema edm, or with an older one, is refused with a message
    saying to run ``edm-sched migrate``.
    """
    dsn = db.resolve_dsn(getattr(args, "dsn", None))
    if dsn:
        db.check_dsn(dsn)
        if need_schema:
            require_schema(dsn, hint=f"edm-sched migrate --dsn '{db.redact(dsn)}'")
        yield dsn
        return
    from edm_sched.demo.embedded import EmbeddedPostgres, running_dsn, stop_server

    was_running = running_dsn() is not None
    pg = EmbeddedPostgres(stop_on_exit=False)
    try:
        dsn = pg.create_database(dbname)
        if need_schema:
            require_schema(dsn, hint="edm-sched migrate")
        yield dsn
    finally:
        if not (was_running or keep_server):
            stop_server(pg.data_dir)


def require_schema(dsn: str, *, hint: str) -> None:
    """Raise MigrationError unless ``dsn`` has schema edm at this edm-sched's version."""
    from edm_sched.migrations import current_version
    from edm_sched.sqlfiles import migrations

    have, want = current_version(dsn), migrations()[-1].version
    if have is None:
        raise errors.MigrationError(
            f"database {db.redact(dsn)} has no edm schema; install it with: {hint}")
    if have < want:
        raise errors.MigrationError(
            f"database {db.redact(dsn)} has schema edm at version {have}, this edm-sched "
            f"needs {want}; upgrade it with: {hint}")


def emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(payload, default=str))
    else:
        print(text)


def is_terminal() -> bool:
    """Whether stdout is a terminal (escape sequences only then)."""
    return sys.stdout.isatty()
