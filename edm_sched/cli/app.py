"""edm-sched: fair, rate-limited, crash-safe sending of email campaigns on PostgreSQL.

Every subcommand takes ``--dsn`` (or ``$EDM_SCHED_DSN``), before or after the
command; without one it uses the embedded PostgreSQL. ``--json`` prints one
JSON object on the last line.

Exit codes: 0 success; 1 a typed error (message on stderr, code in the JSON);
2 bad usage; 3 the database is unreachable.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from edm_sched import db, errors
from edm_sched.cli import demo, jobs, ops, reputation, schema
from edm_sched.cli.base import EXIT_ERROR, EXIT_UNAVAILABLE, Handler


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edm-sched", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=version_text(),
                        help="print the version of edm-sched and of its schema, and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    # --dsn and --json go before or after the command: the top-level parser sets
    # the defaults; a command's copies default to SUPPRESS so they never reset a
    # value given before the command.
    for p, default in ((parser, None), (common := argparse.ArgumentParser(add_help=False),
                                        argparse.SUPPRESS)):
        p.add_argument("--dsn", default=default,
                       help="PostgreSQL DSN (default: $EDM_SCHED_DSN, else the embedded server)")
        p.add_argument("--json", action="store_true",
                       default=False if default is None else default,
                       help="print one JSON object on the last line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="one of the commands below; COMMAND -h for its options")

    for register in _extensions():
        register(sub, common)
    return parser


def version_text() -> str:
    """``edm-sched X.Y.Z (schema N)``: the package and its latest migration."""
    from importlib import metadata

    from edm_sched import __version__
    from edm_sched.sqlfiles import migrations

    try:
        version = metadata.version("edm-sched")
    except metadata.PackageNotFoundError:
        version = __version__
    return f"edm-sched {version} (schema {migrations()[-1].version})"


def _extensions() -> list[Callable[[Any, argparse.ArgumentParser], None]]:
    """The command groups, one module each."""
    return [schema.register, demo.register, ops.register, jobs.register, reputation.register]


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
