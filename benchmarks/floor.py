"""What S1 could give if the database did a FIFO queue's work only (docs/performance.md).

Builds one S1 world and a copy of it. On the copy, ``benchmarks/floor.sql``
replaces ``edm.claim_v2`` and ``edm.complete`` with the least a claim and a
completion could cost on edm-sched's tables (the next 200 pending subtasks, the
dispatcher's default batch, leased to one service; marked sent with their events;
no fairness, limits or counters). Then, on each database in turn (the product
first), run_dispatcher() processes with NullTransport(delay=0), one then two, for
the same window.

The floor is not a design: it bounds any redesign of the claim that keeps the
dispatcher as it is. ``floor_cycles_per_s`` is what the dispatcher gives when
the database costs next to nothing; the gap to ``product_cycles_per_s`` is
what the fair claim and the completion's bookkeeping cost. The dispatcher's
own CPU per send bounds the floor.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg

from benchmarks import common, suite
from edm_sched.testing import worlds as data

DESCRIPTION = "S1 with the product's claim and with a FIFO-cost claim: the database's share"
FLOOR_SQL = Path(__file__).with_name("floor.sql")


def install(dsn: str) -> None:
    """Replace ``edm.claim_v2`` and ``edm.complete`` in database ``dsn`` with the floor's
    (``benchmarks/floor.sql``): only ever on a benchmark's own database."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(FLOOR_SQL.read_text())


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply S1's users, tasks and subtasks by this; default 1 = full S1")
    p.add_argument("--seconds", type=float, default=15.0, help="length of each measured window")
    p.add_argument("--processes", default="1,2", help="dispatcher processes to run, in turn")


def main(argv: Sequence[str]) -> int:
    args = common.parse_args("floor", argv, DESCRIPTION, add_args)
    t_run = time.perf_counter()
    spec = data.design_spec("s1", args.scale)
    counts = [int(n) for n in args.processes.split(",")]
    result: dict[str, Any] = {"scenario": "floor"}
    with common.bench_server(args.dsn, keep=args.keep) as server:
        dsn = server.fresh_database("edm_bench_floor")
        scale = {"users": spec.users, "services": spec.services, "tasks": spec.tasks,
                 "subtasks": spec.subtasks, "scaled_down": args.scale < 1}
        result.update(common.print_header("S1: the product's claim and a FIFO floor", server,
                                          scale))
        common.say("building S1")
        report = data.build_world(dsn, spec)
        print(f"build   : {report.seconds:.0f} s")
        floor_dsn = server.clone_database("edm_bench_floor", "edm_bench_floor_fifo")
        install(floor_dsn)
        rows = []
        for label, target in (("product", dsn), ("floor", floor_dsn)):
            for n in counts:
                r = suite.measure_dispatchers(target, n, args.seconds)
                result[f"{label}_x{n}_cycles_per_s"] = r["cycles_per_s"]
                rows.append([label, n, r["cycles_per_s"], r["claim_call_p50_ms"]])
        for label in ("product", "floor"):
            result[f"{label}_cycles_per_s"] = max(result[f"{label}_x{n}_cycles_per_s"]
                                                  for n in counts)
        result["floor_over_product"] = common.ratio(result["floor_cycles_per_s"],
                                                    result["product_cycles_per_s"])
        common.print_table(
            f"run_dispatcher(), NullTransport(delay=0), concurrency 500, the product's batch, "
            f"{args.seconds:g} s windows",
            ["database", "processes", "cycles/s", "claim call p50 ms"], rows)
        print(f"floor over product (best of each): {result['floor_over_product']:.2f}x")
        result["run_seconds"] = time.perf_counter() - t_run
    return common.finish(args, result)
