"""The ``edm-sched`` command line.

Every subcommand takes ``--dsn`` (or ``$EDM_SCHED_DSN``); without one it uses
the embedded PostgreSQL. ``--json`` prints one JSON object on the last line.

Exit codes: 0 success; 1 a typed error (message on stderr, code in the JSON);
2 bad usage; 3 the database is unreachable.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg

from edm_sched import db, errors

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3

Handler = Callable[[argparse.Namespace], int]


@contextlib.contextmanager
def database(args: argparse.Namespace, *, dbname: str = "edm") -> Iterator[str]:
    """The DSN to use: --dsn / $EDM_SCHED_DSN, else the embedded server."""
    dsn = db.resolve_dsn(getattr(args, "dsn", None))
    if dsn:
        yield db.check_dsn(dsn)
        return
    from edm_sched.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres(stop_on_exit=False)
    yield pg.create_database(dbname)


def emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(payload, default=str))
    else:
        print(text)


def cmd_migrate(args: argparse.Namespace) -> int:
    from edm_sched.migrations import migrate

    with database(args) as dsn:
        status = migrate(dsn)
    emit(
        args,
        {"ok": True, "applied": status.applied, "newly_applied": status.newly_applied},
        f"schema edm at version {max(status.applied)}; "
        + (f"applied {status.newly_applied}" if status.newly_applied else "nothing to do"),
    )
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from edm_sched.demo import run_demo

    with database(args, dbname="edm_demo") as dsn:
        summary = run_demo(dsn, seconds=args.seconds, json_out=args.json)
    if args.json:
        print(json.dumps(summary, default=str))
    return EXIT_OK if summary.get("ok", True) else EXIT_ERROR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edm-sched", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dsn", help="PostgreSQL DSN (default: $EDM_SCHED_DSN, else embedded)")
    common.add_argument("--json", action="store_true", help="print one JSON object at the end")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("migrate", parents=[common], help="install or upgrade the edm schema")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("demo", parents=[common], help="run the end-to-end demo")
    p.add_argument("--seconds", type=float, default=60.0, help="how long senders run (max)")
    p.set_defaults(func=cmd_demo)

    for register in _extensions():
        register(sub, common)
    return parser


def _extensions() -> list[Callable[[Any, argparse.ArgumentParser], None]]:
    """Subcommands contributed by other modules (one module per concept)."""
    from edm_sched import cli_ops, reputation
    from edm_sched.jobs import cli as jobs_cli

    return [cli_ops.register, jobs_cli.register, reputation.register]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    handler: Handler = args.func
    try:
        return handler(args)
    except errors.DatabaseUnavailable as exc:
        _fail(args, exc)
        return EXIT_UNAVAILABLE
    except errors.EdmSchedError as exc:
        _fail(args, exc)
        return EXIT_ERROR
    except psycopg.Error as exc:
        typed = db.to_typed(exc) or errors.EdmSchedError(
            str(exc.diag.message_primary or exc).strip())
        _fail(args, typed)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def _fail(args: argparse.Namespace, exc: errors.EdmSchedError) -> None:
    print(f"edm-sched: error: {exc.code}: {exc}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "error": exc.code, "message": str(exc)}))


if __name__ == "__main__":
    sys.exit(main())
