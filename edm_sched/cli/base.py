"""What every command shares: which database, how to print, exit codes."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

from edm_sched import db

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3

Handler = Callable[[argparse.Namespace], int]


@contextlib.contextmanager
def database(args: argparse.Namespace, *, dbname: str = "edm") -> Iterator[str]:
    """The DSN to use: --dsn / $EDM_SCHED_DSN, else the embedded server."""
    dsn = db.resolve_dsn(getattr(args, "dsn", None))
    if dsn:
        yield db.check_dsn(dsn)
        return
    from edm_sched.demo.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres(stop_on_exit=False)
    yield pg.create_database(dbname)


def emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(payload, default=str))
    else:
        print(text)
