"""``edm-sched demo``: the end-to-end demo (needs the ``demo`` extra)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from edm_sched.cli.base import EXIT_ERROR, EXIT_OK, database


def cmd_demo(args: argparse.Namespace) -> int:
    from edm_sched.demo import run_demo

    with database(args, dbname="edm_demo") as dsn:
        summary = run_demo(dsn, seconds=args.seconds, json_out=args.json)
    if args.json:
        print(json.dumps(summary, default=str))
    return EXIT_OK if summary.get("ok", True) else EXIT_ERROR


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("demo", parents=[common], help="run the end-to-end demo")
    p.add_argument("--seconds", type=float, default=60.0, help="how long senders run (max)")
    p.set_defaults(func=cmd_demo)
