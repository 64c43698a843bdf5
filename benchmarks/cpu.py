"""Where one dispatcher's sends spend CPU: its own Python, and its PostgreSQL backends.

Builds an S1 world (``--scale``, default 0.3), optionally with the FIFO floor
of ``benchmarks/floor.sql`` installed (``--floor``: the database then costs
next to nothing, and the dispatcher's own CPU is what bounds it). Runs one
run_dispatcher() in this process with NullTransport(delay=0), concurrency
500, the product's default batch, sweeps off, and over a window after a warm-up reads:

* the sends in the window (``sent`` rows of ``edm.subtasks``);
* this process's CPU time (``getrusage``): the dispatcher's Python, its
  worker threads and psycopg;
* the CPU time of each of its PostgreSQL backends (``/proc/<pid>/stat``, so
  Linux only, and the server on this machine): the claim's connection (which
  also reads services, templates and contacts), the completion's, and the
  listener's.

Per send, in microseconds. One process, so the machine's second core keeps the
server from competing with the dispatcher; read the figures as CPU per send,
not as the product's throughput (``s1`` measures that).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg

from benchmarks import common, floor
from edm_sched.testing import worlds as data

DESCRIPTION = "one dispatcher's CPU per send: its Python and its PostgreSQL backends"

def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scale", type=float, default=0.3, help="S1 scale (default 0.3)")
    p.add_argument("--seconds", type=float, default=12.0, help="length of the measured window")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--floor", action="store_true",
                   help="install benchmarks/floor.sql first (a FIFO-cost claim)")


def _ticks(pid: int) -> int | None:
    """User plus system clock ticks of process ``pid``, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])


def _sent(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM edm.subtasks WHERE status = 'sent'").fetchone()
    return int(row[0]) if row else 0


def _measure(dsn: str, seconds: float, warmup: float) -> dict[str, Any]:
    from edm_sched.dispatcher import run_dispatcher
    from edm_sched.transports.null import NullTransport

    stop = threading.Event()
    result: dict[str, Any] = {}
    dbname = psycopg.conninfo.conninfo_to_dict(dsn).get("dbname")

    def watch() -> None:
        try:
            time.sleep(warmup)
            with psycopg.connect(dsn, autocommit=True) as conn:
                backends = {int(pid): str(q)[:60].replace("\n", " ") for pid, q in conn.execute(
                    "SELECT pid, query FROM pg_stat_activity WHERE datname = %s"
                    " AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
                    (dbname,)).fetchall()}
            t0 = {pid: _ticks(pid) for pid in backends}
            r0, n0, w0 = resource.getrusage(resource.RUSAGE_SELF), _sent(dsn), time.monotonic()
            time.sleep(seconds)
            t1 = {pid: _ticks(pid) for pid in backends}
            r1, n1, w1 = resource.getrusage(resource.RUSAGE_SELF), _sent(dsn), time.monotonic()
            hz = os.sysconf("SC_CLK_TCK")
            n = max(n1 - n0, 1)
            per_backend: list[dict[str, Any]] = []
            for pid, query in backends.items():
                a, b = t0[pid], t1[pid]
                if a is not None and b is not None:
                    per_backend.append({"pid": pid, "us_per_send": (b - a) / hz * 1e6 / n,
                                        "last_query": query})
            python_s = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
            result.update(
                sends=n1 - n0, sends_per_s=(n1 - n0) / (w1 - w0),
                python_us_per_send=python_s * 1e6 / n,
                postgres_us_per_send=sum(b["us_per_send"] for b in per_backend),
                backends=per_backend)
        finally:
            stop.set()

    logging.basicConfig(level=logging.ERROR)
    threading.Thread(target=watch, daemon=True).start()
    run_dispatcher(dsn, NullTransport(delay=0), concurrency=500,
                   stop_event=stop, handle_signals=False, run_sweeps=False)
    return result


def main(argv: Sequence[str]) -> int:
    args = common.parse_args("cpu", argv, DESCRIPTION, add_args)
    if not sys.platform.startswith("linux"):
        print("cpu: reads /proc for the backends' CPU, so it runs on Linux only")
        return 2
    spec = data.design_spec("s1", args.scale)
    result: dict[str, Any] = {"scenario": "cpu", "floor": args.floor}
    with common.bench_server(args.dsn, keep=args.keep) as server:
        dsn = server.fresh_database("edm_bench_cpu")
        scale = {"users": spec.users, "services": spec.services, "tasks": spec.tasks,
                 "subtasks": spec.subtasks, "floor": args.floor}
        result.update(common.print_header("One dispatcher's CPU per send", server, scale))
        common.say("building S1")
        data.build_world(dsn, spec)
        if args.floor:
            floor.install(dsn)
        result.update(_measure(dsn, args.seconds, args.warmup))
        common.print_table(
            f"one run_dispatcher(), NullTransport(delay=0), {args.seconds:g} s window",
            ["process", "us per send"],
            [["dispatcher (Python, threads, psycopg)", result["python_us_per_send"]]]
            + [[f"backend {b['pid']}: {b['last_query']}", b["us_per_send"]]
               for b in result["backends"]]
            + [["sends/s", result["sends_per_s"]]])
    return common.finish(args, result)
