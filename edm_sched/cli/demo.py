"""``edm-sched demo`` and ``edm-sched embedded ...`` (the ``demo`` extra)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from edm_sched import db
from edm_sched.cli.base import (
    DEFAULT_DATABASE,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    database,
    emit,
)


def cmd_demo(args: argparse.Namespace) -> int:
    from edm_sched.demo import run_demo

    explicit = db.resolve_dsn(args.dsn)
    was_running = False
    if not explicit:
        from edm_sched.demo.embedded import running_dsn

        was_running = running_dsn() is not None
    with database(args, need_schema=False, keep_server=args.keep_server) as dsn:
        summary = run_demo(dsn, seconds=args.seconds, json_out=args.json)
    if explicit:
        summary["dsn"] = db.redact(dsn)
        after = f"See it again with: edm-sched status --dsn '{db.redact(dsn)}'"
    elif args.keep_server or was_running:
        summary["dsn"] = dsn
        after = ("The embedded PostgreSQL is still running; `edm-sched status` shows this "
                 "demo, `edm-sched embedded stop` stops the server.")
    else:
        after = ("The embedded PostgreSQL was stopped (its data is kept); `edm-sched status` "
                 "starts it again and shows this demo; `edm-sched demo --keep-server` leaves "
                 "it running.")
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        print(f"\n{after}")
    return EXIT_OK if summary.get("ok", True) else EXIT_ERROR


def _state(data_dir: Any) -> dict[str, Any]:
    from edm_sched.demo.embedded import running_dsn

    dsn = running_dsn(data_dir, DEFAULT_DATABASE)
    return {"ok": True, "running": dsn is not None, "data_dir": str(data_dir), "dsn": dsn}


def cmd_embedded(args: argparse.Namespace) -> int:
    from edm_sched.demo.embedded import EmbeddedPostgres, default_data_dir, stop_server

    data_dir = default_data_dir().resolve()
    if args.action == "start":
        pg = EmbeddedPostgres(data_dir, stop_on_exit=False)
        pg.create_database(DEFAULT_DATABASE)
        state = _state(data_dir)
        emit(args, state, f"embedded PostgreSQL running in {data_dir}\n{state['dsn']}")
        return EXIT_OK
    if args.action == "stop":
        stopped = stop_server(data_dir)
        emit(args, {**_state(data_dir), "stopped": stopped},
             "stopped" if stopped else f"not running ({data_dir})")
        return EXIT_OK
    state = _state(data_dir)
    if args.action == "dsn":
        if not state["running"]:
            emit(args, {**state, "ok": False},
                 f"not running ({data_dir}); start it with: edm-sched embedded start")
            return EXIT_UNAVAILABLE
        emit(args, state, str(state["dsn"]))
        return EXIT_OK
    emit(args, state, (f"running in {data_dir}\n{state['dsn']}" if state["running"]
                       else f"not running ({data_dir})"))
    return EXIT_OK if state["running"] else EXIT_UNAVAILABLE


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "demo", parents=[common], help="run the end-to-end demo",
        description="Four tenants, five SMTP accounts and a few campaigns sent through a "
        "local SMTP server by a real dispatcher, with live progress and a summary computed "
        "from the server's log. Without --dsn it uses the embedded PostgreSQL (database "
        f"{DEFAULT_DATABASE!r}, the CLI's default) and stops it at the end unless it was "
        "already running or --keep-server is given.")
    p.add_argument("--seconds", type=float, default=60.0,
                   help="how long the senders run at most (default 60)")
    p.add_argument("--keep-server", action="store_true",
                   help="leave the embedded PostgreSQL running after the demo")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "embedded", parents=[common], help="start, stop or locate the embedded PostgreSQL",
        description="The embedded PostgreSQL (pgserver) the CLI uses when no DSN is given. "
        "Its data lives in $EDM_SCHED_EMBEDDED_DIR, else in the user's data directory. "
        "Run as root, pgserver creates the OS user 'pgserver' and runs PostgreSQL as it.")
    p.add_argument("action", choices=["start", "stop", "status", "dsn"],
                   help="start it (and leave it running), stop it, say whether it runs, "
                   f"or print the DSN of its {DEFAULT_DATABASE!r} database")
    p.set_defaults(func=cmd_embedded)
