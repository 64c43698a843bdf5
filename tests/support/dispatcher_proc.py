"""One real dispatcher process, for the multi-process and crash tests.

    python -m tests.support.dispatcher_proc --dsn DSN --id ID [--transport smtp|null]
        [--delay SECONDS] [--lease SECONDS] [--concurrency N] [--batch N]

Runs :func:`edm_sched.dispatcher.run_dispatcher` until SIGTERM (clean stop)
or SIGKILL (the crash under test). Every connection of the process carries
``application_name=ID``, so a test can tell from ``pg_stat_activity`` which
dispatcher owns a backend (for instance the one holding the sweep lock).
With ``--transport null`` every service is served by a ``NullTransport``
that answers after ``--delay`` seconds, which lets a test make a dispatcher
hold its leases for as long as it likes.

Run it from the project root (or with the project root on ``PYTHONPATH``);
:func:`spawn` does both.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from psycopg import conninfo

ROOT = Path(__file__).resolve().parents[2]


def with_application_name(dsn: str, name: str) -> str:
    """``dsn`` with ``application_name`` set (PostgreSQL keeps 63 bytes of it)."""
    return conninfo.make_conninfo(dsn, application_name=name[:63])


def spawn(dsn: str, dispatcher_id: str, *, transport: str = "smtp", delay: float = 0.0,
          lease: int | None = None, concurrency: int = 10, batch: int | None = None,
          log: IO[bytes] | None = None) -> subprocess.Popen[bytes]:
    """Start ``python -m tests.support.dispatcher_proc`` as a child process."""
    args = [sys.executable, "-m", "tests.support.dispatcher_proc", "--dsn", dsn,
            "--id", dispatcher_id, "--transport", transport, "--delay", str(delay),
            "--concurrency", str(concurrency)]
    if lease is not None:
        args += ["--lease", str(lease)]
    if batch is not None:
        args += ["--batch", str(batch)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.Popen(args, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=log if log is not None else subprocess.DEVNULL,
                            stderr=subprocess.STDOUT if log is not None else subprocess.DEVNULL)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.dispatcher_proc")
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--transport", choices=("smtp", "null"), default="smtp")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--lease", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--batch", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {args.id} %(levelname)s %(name)s %(message)s")

    from edm_sched.dispatcher import run_dispatcher
    from edm_sched.transports.base import Transport
    from edm_sched.transports.null import NullTransport
    from edm_sched.transports.smtp import SmtpTransport

    transport: Transport = (NullTransport(delay=args.delay) if args.transport == "null"
                            else SmtpTransport(timeout=10.0))
    stats = run_dispatcher(with_application_name(args.dsn, args.id), transport,
                           dispatcher_id=args.id, concurrency=args.concurrency,
                           batch_size=args.batch, lease_seconds=args.lease,
                           handle_signals=True)
    print(f"{args.id} stopped: claimed={stats.claimed} sent={stats.sent} "
          f"rejected={stats.rejected}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
