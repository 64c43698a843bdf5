"""S1 shared pool (docs/performance.md): 1,000 services granted to all 10,000 users,
1,000,000 pending subtasks over 20,000 tasks.

Measures, in one run on one fresh database:

* claims/s and full cycles/s (claim + null transport + complete) with 1, 2
  and 4 processes: raw SQL workers and real run_dispatcher() processes;
* p50/p99 claim latency;
* the baselines: pgbench's single-row SKIP LOCKED claim+complete (the raw
  ceiling) and PgQueuer draining no-op jobs in its best configuration found;
* dispatcher RSS with 1,000 sends in flight against a slow sink;
* dead tuples in the hot tables after the whole run.

``cycles_per_s`` is the best run_dispatcher() figure (the product's honest
end-to-end throughput); the raw SQL figure is reported next to it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

from benchmarks import baselines, common, suite
from edm_sched.testing import worlds as data

DESCRIPTION = "S1 shared pool: throughput against PgQueuer and the SKIP LOCKED ceiling"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply users, tasks and subtasks by this (services stay at 1,000 "
                        "unless --services is given); default 1 = the full S1")
    p.add_argument("--services", type=int, default=None)
    p.add_argument("--seconds", type=float, default=10.0, help="length of each measured window")
    p.add_argument("--batch", type=int, default=50, help="claim batch size (raw workers)")
    p.add_argument("--concurrency", type=int, default=500, help="dispatcher sends in flight")
    p.add_argument("--dispatcher-batch", type=int, default=None,
                   help="run_dispatcher()'s batch_size (default: the product's, config "
                        "queue.central_batch_size)")
    p.add_argument("--pgq-jobs", type=int, default=100_000, help="no-op jobs PgQueuer drains")
    p.add_argument("--no-baselines", action="store_true", help="skip pgbench and PgQueuer")
    p.add_argument("--rss-in-flight", type=int, default=1000)
    p.add_argument("--rss-delay", type=float, default=5.0, help="slow sink delay, seconds")


def main(argv: Sequence[str]) -> int:
    args = common.parse_args("s1", argv, DESCRIPTION, add_args)
    t_run = time.perf_counter()
    spec = data.design_spec("s1", args.scale, services=args.services)
    result: dict[str, Any] = {"scenario": "s1"}
    with common.bench_server(args.dsn, keep=args.keep) as server:
        dsn = server.fresh_database("edm_bench_s1")
        scale = {"users": spec.users, "services": spec.services, "grants": "all users x all "
                 "services", "tasks": spec.tasks, "subtasks": spec.subtasks,
                 "interval_ms": spec.interval_ms,
                 "scaled_down": args.scale < 1 or spec.services < 1000}
        result.update(common.print_header("S1 shared pool", server, scale))
        if scale["scaled_down"]:
            print(f"NOTE: scaled down from the design's S1 (1,000 services x 10,000 users, "
                  f"1,000,000 subtasks) by --scale {args.scale}")
        common.say("building S1")
        report = data.build_world(dsn, spec)
        print(f"build   : {report.seconds:.0f} s ({report.grants:,} grants; "
              + ", ".join(f"{k} {v:.1f} s" for k, v in report.steps.items()) + ")")
        result["build_seconds"] = report.seconds

        thr = suite.throughput_suite(dsn, seconds=args.seconds, batch=args.batch,
                                     dispatcher_concurrency=args.concurrency,
                                     dispatcher_batch=args.dispatcher_batch)
        result.update(thr)

        common.say(f"dispatcher RSS with {args.rss_in_flight} sends in flight")
        rss = suite.measure_rss(dsn, args.rss_in_flight, args.rss_delay,
                                seconds=max(3 * args.rss_delay, 12.0))
        common.print_table(
            f"Dispatcher memory: one run_dispatcher(), concurrency {args.rss_in_flight}, "
            f"NullTransport(delay={args.rss_delay:g} s)",
            ["sends in flight (max seen)", "RSS peak MB", "RSS median MB", "sent"],
            [[rss["max_leased"], rss["rss_peak_mb"], rss["rss_median_mb"], rss["sent"]]])
        result["rss"] = rss
        result["rss_mb"] = rss["rss_peak_mb"]

        pg_best = sl_best = float("nan")
        if not args.no_baselines:
            common.say("baseline: pgbench single-row SKIP LOCKED")
            sl = baselines.pgbench_skip_locked(dsn, seconds=args.seconds)
            result["skip_locked"] = sl
            sl_best = max((r["tps"] for r in sl), default=float("nan"))
            why = baselines.pgqueuer_available()
            if why is None:
                common.say(f"baseline: PgQueuer draining {args.pgq_jobs:,} no-op jobs")
                pq = baselines.pgqueuer_drain(dsn, args.pgq_jobs)
                result["pgqueuer"] = pq
                pg_best = max((r["jobs_per_s"] for r in pq), default=float("nan"))
            else:
                print(f"PgQueuer skipped: {why}")
            common.print_table(
                "Baselines on the same database",
                ["baseline", "configuration", "jobs/s"],
                [["pgbench SKIP LOCKED (single row)", f"{r['clients']} client(s)", r["tps"]]
                 for r in sl]
                + [["PgQueuer drain", f"{r['driver']}, {r['processes']} proc, batch "
                    f"{r['batch']}, {r['jobs']:,} jobs", r["jobs_per_s"]]
                   for r in result.get("pgqueuer", [])])

        result["pgqueuer_jobs_per_s"] = pg_best
        result["skip_locked_tps"] = sl_best
        result["ratio_vs_pgqueuer"] = common.ratio(thr["cycles_per_s"], pg_best)
        result["ratio_vs_skip_locked"] = common.ratio(thr["cycles_per_s"], sl_best)
        result["raw_ratio_vs_pgqueuer"] = common.ratio(thr["raw_cycles_per_s"], pg_best)
        result["raw_ratio_vs_skip_locked"] = common.ratio(thr["raw_cycles_per_s"], sl_best)
        common.print_table(
            "S1 summary (ratios measured in this run)",
            ["figure", "value", "vs PgQueuer best", "vs SKIP LOCKED ceiling", "goal"],
            [["cycles/s, run_dispatcher (cycles_per_s)", thr["cycles_per_s"],
              result["ratio_vs_pgqueuer"], result["ratio_vs_skip_locked"],
              ">= 1.0x PgQueuer, >= 2x ceiling"],
             ["cycles/s, raw SQL workers", thr["raw_cycles_per_s"],
              result["raw_ratio_vs_pgqueuer"], result["raw_ratio_vs_skip_locked"], ""],
             ["claims/s, raw SQL (claim only)", thr["claims_per_s"],
              common.ratio(thr["claims_per_s"], pg_best),
              common.ratio(thr["claims_per_s"], sl_best), ""],
             ["claim call p50 / p99 ms (1 process, batch "
              f"{args.batch})", f"{thr['claim_p50_ms']:.2f} / {thr['claim_p99_ms']:.2f}",
              None, None, ""],
             ["dispatcher RSS MB, 1,000 in flight", rss["rss_peak_mb"], None, None, "<= 150"]])

        common.wait_for_stats(1.0)
        stats = common.table_stats(dsn)
        common.print_table_stats("Hot tables after the whole S1 run (pg_stat_user_tables)",
                                 stats)
        result["table_stats"] = stats
        result["dead_tuples"] = {s["table"]: s["dead"] for s in stats}
        result["subtask_status"] = data.counts(dsn)
        result["run_seconds"] = time.perf_counter() - t_run
        print(f"\nS1 finished in {result['run_seconds']:.0f} s")
    return common.finish(args, result)
