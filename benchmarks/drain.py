"""Drain: one run_dispatcher() at its defaults sending a backlog over unpaced services.

``python -m benchmarks drain [--json] [--recipients N] [--delays 0,0.002,0.01]``

The world a new user starts with: one user, six services without an interval
or extra limits, one task with a backlog larger than the window can send.
One ``run_dispatcher()`` process with the product's defaults (concurrency from
``queue.concurrent_workers``, batch from ``queue.central_batch_size``) sends
through a ``NullTransport`` that answers after each of the given delays (0: an
instant answer, as from a provider that refuses at once; a few ms: a relay on
the same network). From ``edm.send_events``, on the database's clock:

* **sends/s** in the window, against the most the send slots allow: each
  service sends on one connection (its default ``max_connections``), so at most
  min(concurrency, services) / delay;
* **longest pause** between two consecutive sends' starts. With work waiting
  and free slots, no pause may be longer than a few claims' round trips:
  the goal is <= 250 ms. (A lost wake-up made a full dispatcher sleep 5 s with
  the backlog waiting; the instant case drained 16 messages a second.)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import psycopg

from benchmarks import common, suite
from benchmarks.workers import dispatcher_worker, run_parallel
from edm_sched import db
from edm_sched.api import Scheduler
from edm_sched.sqlfiles import query

DESCRIPTION = "One dispatcher at its defaults draining a backlog: sends/s, longest pause"
SERVICES = 6
GOAL_MAX_GAP_MS = 250.0


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipients", type=int, default=20_000,
                   help="the backlog: recipients of the one task")
    p.add_argument("--delays", default="0,0.002,0.01",
                   help="comma-separated NullTransport answer delays, s (one run each)")
    p.add_argument("--seconds", type=float, default=8.0, help="measured window per run")
    p.add_argument("--warmup", type=float, default=1.0)


def build(dsn: str, recipients: int) -> None:
    """One user, SERVICES unpaced services granted to it, one task of ``recipients``."""
    with Scheduler(dsn) as s:
        s.upsert_user("u")
        for i in range(SERVICES):
            sid = s.create_service({"name": f"unpaced-{i}", "from_addresses": ["n@sender.example"],
                                    "interval_seconds": 0, "daily_quota": 10_000_000,
                                    "transport": "null"})
            s.grant(sid, "u")
        s.create_task({"user_id": "u", "name": "backlog",
                       "templates": [{"subject": "Hello", "body_text": "Hello {{ email }}"}],
                       "recipients": [{"email": f"r{i}@rcpt.example"}
                                      for i in range(recipients)]})


def window_figures(dsn: str, t0: float, t1: float) -> dict[str, Any]:
    """Sends started in [t0, t1) and the longest pause between consecutive starts, the
    window's ends counted as starts (a stall across an end is a pause too)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            """
            SELECT count(*), extract(epoch FROM coalesce(greatest(
                     max(gap), min(started_at) - to_timestamp(%(t0)s),
                     to_timestamp(%(t1)s) - max(started_at)),
                   to_timestamp(%(t1)s) - to_timestamp(%(t0)s))) * 1000
            FROM (
              SELECT started_at, started_at - lag(started_at) OVER (ORDER BY started_at) AS gap
              FROM edm.send_events
              WHERE kind = 'sent' AND started_at >= to_timestamp(%(t0)s)
                AND started_at < to_timestamp(%(t1)s)) x
            """, {"t0": t0, "t1": t1}).fetchone()
        left = conn.execute("SELECT count(*) FROM edm.subtasks WHERE status = 'pending'"
                            ).fetchone()
    sends = int(row[0]) if row else 0
    return {"sends": sends, "sends_per_s": sends / (t1 - t0),
            "max_gap_ms": float(row[1]) if row and row[1] is not None else float("nan"),
            "pending_after": int(left[0]) if left else 0}


def run_one(server: common.BenchServer, delay: float, args: argparse.Namespace,
            concurrency: int) -> dict[str, Any]:
    dsn = server.fresh_database("edm_bench_drain")
    build(dsn, args.recipients)
    start_at = time.time() + suite.SPAWN_GRACE
    t0 = start_at + args.warmup
    t1 = t0 + args.seconds
    out = run_parallel(dispatcher_worker, [
        {"dsn": dsn, "concurrency": None, "batch": None, "delay": delay,
         "start_at": start_at, "stop_at": t1 + 0.5}], timeout=args.seconds + args.warmup + 120)
    res = {"delay_s": delay, "concurrency": concurrency,
           "slot_bound_per_s": min(concurrency, SERVICES) / delay if delay > 0 else None,
           **window_figures(dsn, t0, t1), "claim_calls": out[0]["calls"],
           "claim_call_p50_ms": common.percentile(out[0]["claim_latency"], 50) * 1000}
    if res["pending_after"] == 0:
        common.say(f"  delay {delay}: the backlog ran out inside the window; "
                   "raise --recipients")
    common.say(f"  delay {delay * 1000:g} ms: {res['sends_per_s']:.0f} sends/s, "
               f"longest pause {res['max_gap_ms']:.0f} ms")
    return res


def main(argv: Sequence[str]) -> int:
    args = common.parse_args("drain", argv, DESCRIPTION, add_args)
    t_run = time.perf_counter()
    delays = [float(x) for x in args.delays.split(",") if x]
    result: dict[str, Any] = {"scenario": "drain"}
    with common.bench_server(args.dsn, keep=args.keep) as server:
        probe = server.fresh_database("edm_bench_drain")
        with psycopg.connect(probe, autocommit=True) as conn:
            config = dict(conn.execute(query("config_all")).fetchall())
        concurrency = int(db.setting(config, "queue.concurrent_workers"))
        scale = {"services": SERVICES, "interval_ms": 0, "users": 1, "tasks": 1,
                 "recipients": args.recipients, "window s": args.seconds,
                 "concurrency": f"{concurrency} (the default)",
                 "transport delays s": delays}
        result.update(common.print_header("Drain at the defaults", server, scale))
        runs = [run_one(server, d, args, concurrency) for d in delays]
        common.print_table(
            f"One dispatcher at its defaults, {args.seconds:.0f} s windows, "
            f"{SERVICES} unpaced services",
            ["delay ms", "sends", "sends/s", "slot bound /s", "longest pause ms",
             "claim calls", "claim call p50 ms"],
            [[1000 * r["delay_s"], r["sends"], r["sends_per_s"], r["slot_bound_per_s"],
              r["max_gap_ms"], r["claim_calls"], r["claim_call_p50_ms"]] for r in runs],
            note=f"slot bound = min(concurrency, services) / delay: one connection per "
                 f"service. Goal: longest pause <= "
                 f"{GOAL_MAX_GAP_MS:.0f} ms in every run.")
        result["runs"] = runs
        result["max_gap_ms"] = max(r["max_gap_ms"] for r in runs)
        result["run_seconds"] = time.perf_counter() - t_run
        print(f"\ndrain finished in {result['run_seconds']:.0f} s")
    return common.finish(args, result)
