"""Recurring jobs at the seeds' scale: 1,000,000 runs a day over 100 tenants.

    python -m benchmarks jobs [--dsn DSN] [--json] [--runners 3] [--concurrency 8]
                              [--steady-seconds 60] [--bursts 2] [--no-history]

A day cannot be replayed in three minutes without changing what is measured
(firing delay is a real-time figure), so the day is scaled down to windows of
real time at the same rate, and the output says so:

* **idle** — runner processes up, no job due: what waiting costs the database
  (it should be nothing: runners sleep until the next run or a NOTIFY).
* **steady** — 2,084 jobs (about 21 per tenant) each firing every 3 minutes
  at its own second (6-field cron expressions), spread evenly: 11.6 runs/s,
  i.e. 1,000,320 runs a day, for ``--steady-seconds`` of real time.
* **burst** — the same daily volume aligned on the clock: 347 jobs firing at
  :00 and :30 of every minute (``0,30 * * * * *``), 999,360 runs a day, all
  347 due at the same instant; ``--bursts`` such instants are measured.

Before the steady window, one day of history of the steady jobs (1,000,320
finished executions) is loaded into ``edm.job_executions`` (``--no-history``
skips it), so the queries run against a table of production-like size.

Runners are separate processes calling ``run_jobs`` (exactly-once firing and
claiming in SQL). Each run is a no-op Python function that records its firing
delay: the time it started executing minus its scheduled time (both read from
the same machine clock). The claim delay (``started_at - scheduled_for`` in
the database) is reported beside it. Database load is the change of
``pg_stat_database`` counters over each window (transactions, rows written and
read, blocks) and, for the embedded server, the CPU time its processes used.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import multiprocessing
import time
from pathlib import Path
from typing import Any

import psycopg

from benchmarks import common
from edm_sched.jobs import JobContext, JobScheduler

TENANTS = 100
STEADY_JOBS = 2084  # x 480 runs a day (every 180 s) = 1,000,320 runs/day
STEADY_PERIOD_S = 180
BURST_JOBS = 347  # x 2,880 runs a day (every 30 s) = 999,360 runs/day
BURST_PERIOD_S = 30


# ----------------------------------------------------------------- runner processes


def _noop(ctx: JobContext) -> dict[str, float] | None:
    if ctx.scheduled_for is None:
        return None
    return {"delay_ms": (time.time() - ctx.scheduled_for.timestamp()) * 1000.0}


def _runner(dsn: str, index: int, concurrency: int, stop: Any, ready: Any) -> None:
    from edm_sched.jobs import run_jobs

    ready.put(index)
    run_jobs(dsn, {"bench.noop": _noop}, stop_event=stop, worker_id=f"bench-runner-{index}",
             concurrency=concurrency, shutdown_grace=5.0)


# ---------------------------------------------------------------------- load probes


class Probe:
    """pg_stat_database counters and server CPU time at one instant."""

    COUNTERS = ("xact_commit", "xact_rollback", "tup_inserted", "tup_updated", "tup_deleted",
                "tup_fetched", "tup_returned", "blks_read", "blks_hit")

    def __init__(self, dsn: str, server_pid: int | None) -> None:
        self.dsn = dsn
        self.server_pid = server_pid

    def snapshot(self) -> dict[str, float]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_stat_force_next_flush()")
            conn.execute("SELECT pg_stat_clear_snapshot()")
            row = conn.execute(
                "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted,"
                " tup_fetched, tup_returned, blks_read, blks_hit"
                " FROM pg_stat_database WHERE datname = current_database()").fetchone()
        assert row is not None
        snap = {k: float(v) for k, v in zip(self.COUNTERS, row, strict=True)}
        snap["t"] = time.monotonic()
        snap["cpu_s"] = self._cpu()
        return snap

    def _cpu(self) -> float:
        if self.server_pid is None:
            return float("nan")
        try:
            import psutil
        except ImportError:
            return float("nan")
        try:
            root = psutil.Process(self.server_pid)
            total = 0.0
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    t = proc.cpu_times()
                    total += t.user + t.system
            return total
        except psutil.Error:
            return float("nan")


def _postmaster_pid(server: common.BenchServer) -> int | None:
    if server.data_dir is None:
        return None
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int((Path(server.data_dir) / "postmaster.pid").read_text().split()[0])
    return None


def _load(before: dict[str, float], after: dict[str, float], runs: int) -> dict[str, float]:
    seconds = max(1e-9, after["t"] - before["t"])
    d = {k: after[k] - before[k] for k in Probe.COUNTERS}
    written = d["tup_inserted"] + d["tup_updated"] + d["tup_deleted"]
    read = d["tup_fetched"] + d["tup_returned"]
    return {
        "seconds": seconds,
        "runs": runs,
        "runs_per_s": runs / seconds,
        "xact_per_s": d["xact_commit"] / seconds,
        "xact_per_run": common.ratio(d["xact_commit"], runs),
        "rows_written_per_s": written / seconds,
        "rows_written_per_run": common.ratio(written, runs),
        "rows_read_per_s": read / seconds,
        "blocks_per_s": (d["blks_read"] + d["blks_hit"]) / seconds,
        "rollbacks": d["xact_rollback"],
        "db_cpu_pct_of_core": 100.0 * (after["cpu_s"] - before["cpu_s"]) / seconds,
    }


# ---------------------------------------------------------------------------- phases


def _create(dsn: str, specs: list[dict[str, Any]]) -> None:
    sched = JobScheduler(dsn)
    for i in range(0, len(specs), 500):
        sched.create_jobs(specs[i:i + 500])


def _pause_all(dsn: str) -> None:
    # Benchmark housekeeping only: take every job out of the schedule at once.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE edm.jobs SET status = 'paused', next_run_at = NULL"
                     " WHERE status = 'active'")


def _delays(dsn: str, start: dt.datetime, end: dt.datetime) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT status, (result ->> 'delay_ms')::float,"
            "       extract(epoch FROM started_at - scheduled_for) * 1000"
            " FROM edm.job_executions"
            " WHERE trigger = 'scheduled' AND scheduled_for >= %s AND scheduled_for < %s",
            (start, end)).fetchall()
    fire = [float(r[1]) for r in rows if r[0] == "succeeded" and r[1] is not None]
    claim = [float(r[2]) for r in rows if r[2] is not None]
    return {
        "runs": len(fire),
        "not_succeeded": sum(1 for r in rows if r[0] != "succeeded"),
        "delay_ms_p50": common.percentile(fire, 50),
        "delay_ms_p90": common.percentile(fire, 90),
        "delay_ms_p99": common.percentile(fire, 99),
        "delay_ms_max": max(fire) if fire else float("nan"),
        "claim_delay_ms_p50": common.percentile(claim, 50),
        "claim_delay_ms_p99": common.percentile(claim, 99),
    }


def _wait_until(t: dt.datetime) -> None:
    while (left := (t - dt.datetime.now(dt.UTC)).total_seconds()) > 0:
        time.sleep(min(left, 0.5))


def _steady_specs() -> list[dict[str, Any]]:
    specs = []
    for i in range(STEADY_JOBS):
        minute, second = i % 3, (i // 3) % 60  # 695, 695 and 694 jobs per minute
        specs.append({
            "name": f"steady-{i}", "user_id": f"tenant-{i % TENANTS:03d}",
            "cron": f"{second} {minute}-59/3 * * * *", "status": "paused",
            "target": {"kind": "function", "function": "bench.noop"},
            "timeout_seconds": 60, "misfire_grace_seconds": 60,
        })
    return specs


def _load_history(dsn: str) -> int:
    """One day of finished runs of the steady jobs (1,000,320 rows), as a day of
    production would leave in edm.job_executions (retention keeps 30 of them)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(
            "INSERT INTO edm.job_executions (job_id, user_id, trigger, status, priority,"
            "  scheduled_for, run_after, created_at, started_at, finished_at, result, worker_id)"
            " SELECT j.job_id, j.user_id, 'scheduled', 'succeeded', 0, t, t, t,"
            "        t + interval '30 ms', t + interval '31 ms', '{\"delay_ms\": 30}', 'history'"
            " FROM edm.jobs j CROSS JOIN LATERAL generate_series("
            "   now() - interval '1 day', now() - interval '1 s', interval '180 s') t"
            " WHERE j.name LIKE 'steady-%%'")
        n = cur.rowcount
        conn.execute("VACUUM ANALYZE edm.jobs, edm.job_executions")
    return n


def _activate_steady(dsn: str, start: dt.datetime) -> None:
    """Start the paused steady jobs at ``start`` (benchmark setup: one statement
    instead of 2,084 resume_job calls; next runs computed with the same cronsim code)."""
    from edm_sched.jobs import schedule

    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT job_id, cron_expr, timezone FROM edm.jobs"
                            " WHERE name LIKE 'steady-%%'").fetchall()
        ids, nexts = [], []
        for job_id, cron, tz in rows:
            ids.append(job_id)
            nexts.append(schedule.first_run(schedule.parse(cron, tz), now=start,
                                            start_at=start))
        conn.execute("UPDATE edm.jobs j SET status = 'active', start_at = %s,"
                     " next_run_at = x.next_run_at"
                     " FROM unnest(%s::bigint[], %s::timestamptz[]) AS x(job_id, next_run_at)"
                     " WHERE j.job_id = x.job_id", (start, ids, nexts))


def _burst_specs(start: dt.datetime) -> list[dict[str, Any]]:
    return [{
        "name": f"burst-{i}", "user_id": f"tenant-{i % TENANTS:03d}",
        "cron": "0,30 * * * * *", "start_at": start,
        "target": {"kind": "function", "function": "bench.noop"},
        "timeout_seconds": 60, "misfire_grace_seconds": 60,
    } for i in range(BURST_JOBS)]


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runners", type=int, default=3, help="runner processes (default 3)")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="runs in flight per runner (default 8)")
    parser.add_argument("--steady-seconds", type=float, default=60.0,
                        help="real seconds of the steady window (default 60)")
    parser.add_argument("--bursts", type=int, default=2,
                        help="aligned instants measured in the burst window (default 2)")
    parser.add_argument("--no-history", dest="history", action="store_false",
                        help="skip preloading one day of execution history")


def main(argv: list[str]) -> int:
    args = common.parse_args("jobs", argv, "Recurring jobs: 1,000,000 runs a day over 100 "
                             "tenants; firing delay and database load.", _extra)
    result: dict[str, Any] = {"scenario": "jobs"}
    with common.bench_server(args.dsn, keep=args.keep) as server:
        dsn = server.fresh_database("bench_jobs")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("UPDATE edm.config SET value = '100000'"
                         " WHERE key = 'jobs.max_jobs_per_user'")
        scale = {
            "tenants": TENANTS,
            "runs_per_day": "1,000,000 (steady 1,000,320; burst 999,360)",
            "day_scaled_to": f"{args.steady_seconds:g} s steady + {args.bursts} bursts of "
                             f"{BURST_JOBS} (real time at the daily rate, not a full day)",
            "steady_jobs": STEADY_JOBS, "burst_jobs": BURST_JOBS,
            "runner_processes": args.runners, "concurrency_per_runner": args.concurrency,
            "history_rows": STEADY_JOBS * 480 if args.history else 0,
        }
        result.update(common.print_header(
            "recurring jobs: 1,000,000 runs/day over 100 tenants", server, scale))
        print("note    : the simulated day is scaled down to real-time windows at the "
              "1,000,000-runs/day rate; figures are per window, not a 24 h run")
        probe = Probe(dsn, _postmaster_pid(server))

        ctx = multiprocessing.get_context("spawn")
        stop, ready = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_runner, args=(dsn, i, args.concurrency, stop, ready))
                 for i in range(args.runners)]
        for p in procs:
            p.start()
        try:
            for _ in procs:
                ready.get(timeout=120)
            time.sleep(2.0)  # runners connected and asleep

            common.say("idle window: runners waiting, nothing due")
            before = probe.snapshot()
            time.sleep(3.0)
            idle = _load(before, probe.snapshot(), 0)

            common.say(f"steady window: creating {STEADY_JOBS} jobs (paused)")
            _create(dsn, _steady_specs())
            if args.history:
                common.say("loading one day of execution history (1,000,320 rows)")
                history = _load_history(dsn)
            else:
                history = 0
            start = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=4)).replace(microsecond=0)
            _activate_steady(dsn, start)
            _wait_until(start)
            common.say(f"steady window: {args.steady_seconds:g} s at 11.6 runs/s")
            before = probe.snapshot()
            end = start + dt.timedelta(seconds=args.steady_seconds)
            _wait_until(end)
            after = probe.snapshot()
            _pause_all(dsn)
            time.sleep(1.0)
            steady = _delays(dsn, start, end)
            steady_load = _load(before, after, steady["runs"])

            common.say(f"burst window: creating {BURST_JOBS} jobs due at :00 and :30")
            now = dt.datetime.now(dt.UTC)
            first = (now + dt.timedelta(seconds=8)).replace(microsecond=0)
            first += dt.timedelta(seconds=(-first.second) % BURST_PERIOD_S)
            _create(dsn, _burst_specs(first))
            _wait_until(first - dt.timedelta(seconds=1))
            before = probe.snapshot()
            last = first + dt.timedelta(seconds=BURST_PERIOD_S * (max(1, args.bursts) - 1))
            _wait_until(last + dt.timedelta(seconds=5))
            after = probe.snapshot()
            _pause_all(dsn)
            time.sleep(1.0)
            burst = _delays(dsn, first, last + dt.timedelta(seconds=1))
            burst_load = _load(before, after, burst["runs"])
        finally:
            stop.set()
            for p in procs:
                p.join(30)
                if p.is_alive():
                    p.kill()

        common.print_table(
            "firing delay: when the job function started, minus its scheduled time (ms)",
            ["window", "runs", "p50", "p90", "p99", "max", "claim p50", "claim p99",
             "not run"],
            [[name, d["runs"], d["delay_ms_p50"], d["delay_ms_p90"], d["delay_ms_p99"],
              d["delay_ms_max"], d["claim_delay_ms_p50"], d["claim_delay_ms_p99"],
              d["not_succeeded"]]
             for name, d in (("steady 11.6/s", steady), (f"burst {BURST_JOBS} at once", burst))],
            note="claim = started_at - scheduled_for in the database (the claim transaction's "
                 "time); not run = skipped or failed occurrences in the window")
        common.print_table(
            "database load over each window",
            ["window", "seconds", "runs/s", "xact/s", "xact/run", "rows written/s",
             "rows written/run", "rows read/s", "blocks/s", "DB CPU % of a core"],
            [[name, d["seconds"], d["runs_per_s"], d["xact_per_s"], d["xact_per_run"],
              d["rows_written_per_s"], d["rows_written_per_run"], d["rows_read_per_s"],
              d["blocks_per_s"], d["db_cpu_pct_of_core"]]
             for name, d in (("idle (runners waiting)", idle), ("steady", steady_load),
                             ("burst", burst_load))],
            note="counters from pg_stat_database for the benchmark database; CPU from the "
                 "embedded server's processes (blank with --dsn)")
        common.wait_for_stats()
        tables = common.table_stats(dsn, ("jobs", "job_executions"))
        common.print_table_stats("tables after the run", tables)
        result.update({
            "steady": {**steady, **{f"load_{k}": v for k, v in steady_load.items()}},
            "burst": {**burst, **{f"load_{k}": v for k, v in burst_load.items()}},
            "idle": idle, "tables": tables, "history_rows_loaded": history,
        })
    return common.finish(args, result)
