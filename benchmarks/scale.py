"""Scale: per-claim cost as users and backlog grow, as a ratio to the smallest point.

Two sweeps on the same server, one database per point, each point measured
by one raw SQL worker looping ``edm.claim(batch)`` + ``edm.complete`` (the
scheduler's own cost, no Python dispatcher in the way) for a fixed window:

* **users** 1k → 10k → 100k, one task per user, a backlog of 100,000
  subtasks, a pool of 10 services granted to every user;
* **backlog** 100k → 1M → 10M subtasks, 1,000 users with two tasks each, the
  same pool.

All points are built first, then measured in interleaved rounds (median
reported), so that load from other tenants of a shared machine hits every
point alike.

The claim takes at most one subtask per ready service, so the batch equals
the pool size. Reported per point: claim-call time per claimed subtask
(p50), cycles/s, and both as a ratio to the smallest point (goal: the
largest <= 1.5x the smallest). ``--max-backlog`` stops the backlog sweep
earlier (the output says where it stopped); ``--explain`` prints EXPLAIN
ANALYZE of the claim's user and subtask lookups at the first and last point
of each sweep.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any

import psycopg

from benchmarks import common, suite
from benchmarks.workers import raw_worker
from edm_sched.testing import plans
from edm_sched.testing import worlds as data

DESCRIPTION = "Per-claim cost as users (1k-100k) and backlog (100k-10M) grow"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--users", default="1000,10000,100000",
                   help="comma-separated user counts of the users sweep")
    p.add_argument("--backlogs", default="100000,1000000,10000000",
                   help="comma-separated backlog sizes of the backlog sweep")
    p.add_argument("--max-backlog", type=int, default=10_000_000,
                   help="stop the backlog sweep above this many subtasks")
    p.add_argument("--services", type=int, default=10, help="shared pool size (= claim batch)")
    p.add_argument("--seconds", type=float, default=6.0, help="measured window per point")
    p.add_argument("--explain", action="store_true",
                   help="print EXPLAIN ANALYZE of the claim's lookups at the sweep ends")
    p.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds")
    p.add_argument("--budget", type=float, default=540.0,
                   help="stop building points / starting rounds past this run time (s)")


def _measure(dsn: str, batch: int, seconds: float) -> dict[str, Any]:
    """One raw worker in this process (no spawn): claim + complete cycles for ``seconds``."""
    now = time.time()
    r = raw_worker(dsn, "bench-scale", "cycle", batch, now, now + seconds)
    suite.release_leases(dsn)
    per_subtask = [x / max(1, batch) for x in r["claim_latency"]]
    return {"claim_per_subtask_ms": common.percentile(per_subtask, 50) * 1000,
            "cycles_per_s": r["completed"] / seconds, "calls": r["calls"]}


def _explain(dsn: str, label: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            values = plans.sample_values(conn)
        except LookupError as exc:
            print(f"\nEXPLAIN ANALYZE ({label}): skipped, {exc}")
            return
        for inner in plans.INNER_STATEMENTS:
            if inner.name in ("claim: next user in rotation", "claim: the task's next subtask"):
                check = plans.explain_inner(conn, inner, values, analyze=True)
                print(f"\nEXPLAIN ANALYZE ({label}) {inner.name}:\n{check.custom_plan}")


def _build_point(server: common.BenchServer, name: str, spec: data.WorldSpec
                 ) -> tuple[str, float, int]:
    dsn = server.fresh_database(name)
    rep = data.build_world(dsn, spec)
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_total_relation_size('edm.subtasks')").fetchone()
    return dsn, rep.seconds, int(row[0]) if row else 0


def main(argv: Sequence[str]) -> int:
    args = common.parse_args("scale", argv, DESCRIPTION, add_args)
    t_run = time.perf_counter()
    user_points = [int(x) for x in args.users.split(",") if x]
    backlog_points = [int(x) for x in args.backlogs.split(",") if x]
    result: dict[str, Any] = {"scenario": "scale"}
    with common.bench_server(args.dsn, keep=args.keep) as server:
        scale = {"users sweep": user_points, "users sweep backlog": 100_000,
                 "backlog sweep": backlog_points, "backlog sweep users": 1000,
                 "pool services (= claim batch)": args.services,
                 "max backlog": args.max_backlog, "window s": args.seconds,
                 "rounds": args.rounds}
        result.update(common.print_header("Scale: users and backlog", server, scale))
        # Build every point first (one database each), then measure them in
        # interleaved rounds: on a shared, noisy machine a burst of load then
        # hits every point alike, and the median of the rounds is reported.
        points: list[dict[str, Any]] = []
        notes: list[str] = []
        for n in user_points:
            if time.perf_counter() - t_run > args.budget * 0.6:
                notes.append(f"users sweep stopped before {n:,} users (time budget)")
                break
            common.say(f"users sweep: building {n:,} users")
            dsn, secs, size = _build_point(server, f"edm_bench_scale_u{n}", data.WorldSpec(
                users=n, services=args.services, tasks=n, subtasks=100_000, grants="shared"))
            points.append({"sweep": "users", "users": n, "backlog": 100_000, "dsn": dsn,
                           "build_s": secs, "subtasks_mb": size / 1e6, "samples": []})
        for n in backlog_points:
            if n > args.max_backlog:
                notes.append(f"backlog sweep stopped before {n:,} subtasks "
                             f"(--max-backlog {args.max_backlog:,})")
                break
            if time.perf_counter() - t_run > args.budget * 0.6:
                notes.append(f"backlog sweep stopped before {n:,} subtasks (time budget)")
                break
            common.say(f"backlog sweep: building {n:,} subtasks")
            dsn, secs, size = _build_point(server, f"edm_bench_scale_b{n}", data.WorldSpec(
                users=1000, services=args.services, tasks=2000, subtasks=n, grants="shared"))
            points.append({"sweep": "backlog", "users": 1000, "backlog": n, "dsn": dsn,
                           "build_s": secs, "subtasks_mb": size / 1e6, "samples": []})
        for rnd in range(args.rounds):
            if rnd and time.perf_counter() - t_run > args.budget:
                notes.append(f"measured {rnd} round(s) instead of {args.rounds} (time budget)")
                break
            common.say(f"measuring round {rnd + 1} of {args.rounds}")
            for p in points:
                p["samples"].append(_measure(p["dsn"], args.services, args.seconds))
        for p in points:
            p["claim_per_subtask_ms"] = statistics.median(
                x["claim_per_subtask_ms"] for x in p["samples"])
            p["cycles_per_s"] = statistics.median(x["cycles_per_s"] for x in p["samples"])
        if args.explain:
            for sweep in ("users", "backlog"):
                ends = [p for p in points if p["sweep"] == sweep]
                for p in ends[:1] + ends[-1:] if len(ends) > 1 else ends:
                    _explain(p["dsn"], f"{p['users']:,} users, {p['backlog']:,} subtasks")

        def rows(sweep: str, key: str) -> list[list[Any]]:
            pts = [p for p in points if p["sweep"] == sweep]
            base = pts[0] if pts else {}
            return [[p[key], p["subtasks_mb"], p["build_s"], p["claim_per_subtask_ms"],
                     common.ratio(p["claim_per_subtask_ms"], base["claim_per_subtask_ms"]),
                     p["cycles_per_s"], common.ratio(base["cycles_per_s"], p["cycles_per_s"]),
                     " ".join(f"{x['claim_per_subtask_ms']:.2f}" for x in p["samples"])]
                    for p in pts]

        headers = ["claim ms/subtask (median)", "x smallest", "cycles/s (median)",
                   "cycle cost x smallest", "claim ms/subtask per round"]
        common.print_table(
            f"Users sweep (backlog 100,000; one task per user; pool of {args.services} services "
            f"granted to all; 1 raw worker, claim batch {args.services})",
            ["users", "subtasks MB", "build s", *headers], rows("users", "users"))
        common.print_table(
            f"Backlog sweep (1,000 users, 2,000 tasks; pool of {args.services} services)",
            ["subtasks", "subtasks MB", "build s", *headers], rows("backlog", "backlog"),
            note="\n".join(f"NOTE: {n}" for n in notes) or None)

        def worst(sweep: str) -> float:
            pts = [p for p in points if p["sweep"] == sweep]
            if len(pts) < 2:
                return float("nan")
            return common.ratio(pts[-1]["claim_per_subtask_ms"], pts[0]["claim_per_subtask_ms"])

        result.update({
            "points": [{k: v for k, v in p.items() if k != "dsn"} for p in points],
            "users_ratio_largest_vs_smallest": worst("users"),
            "backlog_ratio_largest_vs_smallest": worst("backlog"),
            "users_largest": max((p["users"] for p in points if p["sweep"] == "users"),
                                 default=None),
            "backlog_largest": max((p["backlog"] for p in points if p["sweep"] == "backlog"),
                                   default=None),
            "notes": notes,
        })
        print("\nclaim cost, largest / smallest: "
              f"users x{result['users_ratio_largest_vs_smallest']:.2f}, "
              f"backlog x{result['backlog_ratio_largest_vs_smallest']:.2f} (goal <= 1.5)")
        result["run_seconds"] = time.perf_counter() - t_run
        print(f"scale finished in {result['run_seconds']:.0f} s")
    return common.finish(args, result)
