"""Measurements shared by the throughput scenarios (s1, s2, s3) and the scale sweep.

* :func:`measure_raw` — N processes looping ``edm.claim`` (and ``edm.complete``)
  on their own connections: the scheduler's pure database cost.
* :func:`measure_dispatchers` — N ``run_dispatcher()`` processes with a
  ``NullTransport``: the product's end-to-end cost.
* :func:`measure_rss` — one dispatcher holding many sends in flight against a
  slow sink.
* :func:`throughput_suite` — both, with 1, 2 and 4 processes, as tables.

Counting is done in the database over a common window: completed cycles are
the ``sent`` rows of ``edm.send_events`` whose ``occurred_at`` falls in the
window, claims the ``edm.serve_seq`` values drawn in it (one per claimed
subtask).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import psycopg

from benchmarks import common
from benchmarks.workers import dispatcher_worker, raw_worker, run_parallel

SPAWN_GRACE = 2.5  # seconds for spawned interpreters to import and connect


def _serve_seq(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT last_value FROM edm.serve_seq").fetchone()
    return int(row[0]) if row else 0


def default_batch(dsn: str) -> int:
    """The product's claim batch: what run_dispatcher() takes when given none."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT edm.config_int('queue.central_batch_size')").fetchone()
    assert row is not None
    return int(row[0])


def sent_between(dsn: str, t0: float, t1: float) -> int:
    """``sent`` outcomes recorded in [t0, t1) (epoch seconds)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM edm.send_events WHERE kind = 'sent'"
            " AND occurred_at >= to_timestamp(%s) AND occurred_at < to_timestamp(%s)",
            (t0, t1)).fetchone()
    return int(row[0]) if row else 0


def release_leases(dsn: str) -> int:
    """Return every leased subtask to pending: expired leases through edm.expire_leases
    (as the sweep would), live ones through edm.complete(..., 'released')."""
    released = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT edm.expire_leases(now(), 1000000)").fetchone()
        released += int(row[0]) if row and row[0] else 0
        owners = conn.execute("SELECT DISTINCT lease_owner FROM edm.subtasks"
                              " WHERE status = 'leased'").fetchall()
        for (owner,) in owners:
            while True:
                ids = [r[0] for r in conn.execute(
                    "SELECT subtask_id FROM edm.subtasks WHERE status = 'leased'"
                    " AND lease_owner = %s LIMIT 5000", (owner,)).fetchall()]
                if not ids:
                    break
                row = conn.execute(
                    "SELECT count(*) FILTER (WHERE accepted) FROM edm.complete(%s, %s, %s)",
                    (owner, ids, ["released"] * len(ids))).fetchone()
                accepted = int(row[0]) if row else 0
                released += accepted
                if accepted == 0:  # nothing more this owner's leases can give back
                    break
    return released


def measure_raw(dsn: str, mode: str, processes: int, batch: int, seconds: float,
                label: str = "raw") -> dict[str, Any]:
    """``processes`` raw SQL workers in ``mode`` ("claim" or "cycle") for ``seconds``."""
    start_at = time.time() + SPAWN_GRACE
    stop_at = start_at + seconds
    with psycopg.connect(dsn, autocommit=True) as conn:
        out = run_parallel(raw_worker, [
            {"dsn": dsn, "owner": f"bench-{label}-{mode}-{processes}-{i}", "mode": mode,
             "batch": batch, "start_at": start_at, "stop_at": stop_at}
            for i in range(processes)], timeout=seconds + 120)
        seq_end = _serve_seq(conn)
    claimed = sum(r["claimed"] for r in out)
    lat = [x for r in out for x in r["claim_latency"]]
    calls = sum(r["calls"] for r in out)
    per_claim = [x / max(1, batch) for x in lat]
    complete_lat = [x for r in out for x in r["complete_latency"]]
    res = {
        "mode": mode, "processes": processes, "batch": batch, "seconds": seconds,
        "claimed": claimed, "claims_per_s": claimed / seconds,
        "cycles_per_s": (sum(r["completed"] for r in out) / seconds) if mode == "cycle" else None,
        "calls": calls, "empty_calls": sum(r["empty_calls"] for r in out),
        "mean_batch": claimed / max(1, calls),
        "claim_call_p50_ms": common.percentile(lat, 50) * 1000,
        "claim_call_p99_ms": common.percentile(lat, 99) * 1000,
        "claim_per_subtask_p50_ms": common.percentile(per_claim, 50) * 1000,
        "complete_call_p50_ms": common.percentile(complete_lat, 50) * 1000,
        "complete_call_p99_ms": common.percentile(complete_lat, 99) * 1000,
        "serve_seq": seq_end,
    }
    common.say(f"  {label} {mode}, {processes} process(es), batch {batch}: "
               f"{res['claims_per_s']:,.0f} claims/s"
               + (f", {res['cycles_per_s']:,.0f} cycles/s" if res["cycles_per_s"] else ""))
    return res


def measure_dispatchers(dsn: str, processes: int, seconds: float, *, concurrency: int = 500,
                        batch: int | None = None, delay: float = 0.0, warmup: float = 2.0,
                        run_sweeps: bool = True) -> dict[str, Any]:
    """``processes`` run_dispatcher() processes (NullTransport(delay)); cycles/s in a window.
    ``batch`` None: the product's default (config queue.central_batch_size)."""
    batch = batch or default_batch(dsn)
    start_at = time.time() + SPAWN_GRACE
    t0 = start_at + warmup
    t1 = t0 + seconds
    marks: dict[str, int] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        def monitor(_pids: list[int]) -> None:
            now = time.time()
            if "c0" not in marks and now >= t0:
                marks["c0"] = _serve_seq(conn)
            if "c1" not in marks and now >= t1:
                marks["c1"] = _serve_seq(conn)

        out = run_parallel(dispatcher_worker, [
            {"dsn": dsn, "concurrency": concurrency, "batch": batch, "delay": delay,
             "start_at": start_at, "stop_at": t1 + 0.5, "run_sweeps": run_sweeps}
            for _ in range(processes)], timeout=seconds + warmup + 180, monitor=monitor)
    sent = sent_between(dsn, t0, t1)
    lat = [x for r in out for x in r["claim_latency"]]
    claims = (marks.get("c1", 0) - marks.get("c0", 0)) if "c1" in marks else None
    res = {
        "processes": processes, "concurrency": concurrency, "batch": batch, "delay": delay,
        "seconds": seconds, "cycles": sent, "cycles_per_s": sent / seconds,
        "claims_per_s": (claims / seconds) if claims is not None else None,
        "claim_call_p50_ms": common.percentile(lat, 50) * 1000,
        "claim_call_p99_ms": common.percentile(lat, 99) * 1000,
        "mean_batch": sum(r["claimed"] for r in out) / max(1, sum(r["calls"] for r in out)),
        "rejected": sum(r["rejected"] for r in out),
        "max_rss_mb": max(r["max_rss_mb"] for r in out),
    }
    common.say(f"  run_dispatcher x{processes} (concurrency {concurrency}, batch {batch}): "
               f"{res['cycles_per_s']:,.0f} cycles/s")
    return res


def measure_rss(dsn: str, in_flight: int, delay: float, seconds: float) -> dict[str, Any]:
    """One dispatcher with ``in_flight`` sends against NullTransport(delay): its RSS."""
    release_leases(dsn)  # so that every lease seen below is this dispatcher's
    start_at = time.time() + SPAWN_GRACE
    samples: list[float] = []
    leased: list[int] = []
    last_poll = [0.0]
    with psycopg.connect(dsn, autocommit=True) as conn:
        def monitor(pids: list[int]) -> None:
            now = time.time()
            if now < start_at:
                return
            for pid in pids:
                with contextlib.suppress(Exception):  # the process may just have exited
                    samples.append(common.rss_mb(pid))
            if now - last_poll[0] >= 0.5:
                last_poll[0] = now
                row = conn.execute("SELECT count(*) FROM edm.subtasks"
                                   " WHERE status = 'leased'").fetchone()
                leased.append(int(row[0]) if row else 0)

        out = run_parallel(dispatcher_worker, [
            {"dsn": dsn, "concurrency": in_flight, "batch": min(1000, in_flight),
             "delay": delay, "start_at": start_at, "stop_at": start_at + seconds,
             "run_sweeps": False}], timeout=seconds + delay + 180, monitor=monitor)
    res = {
        "target_in_flight": in_flight, "sink_delay_s": delay, "seconds": seconds,
        "max_leased": max(leased, default=0),
        "rss_peak_mb": max(samples, default=float("nan")),
        "rss_median_mb": common.percentile(samples, 50),
        "max_rss_self_mb": out[0]["max_rss_mb"], "sent": out[0]["sent"],
    }
    common.say(f"  RSS with {res['max_leased']} in flight: peak {res['rss_peak_mb']:.0f} MB")
    return res


def throughput_suite(dsn: str, *, processes: tuple[int, ...] = (1, 2, 4), seconds: float = 10,
                     batch: int = 50, dispatcher_concurrency: int = 500,
                     dispatcher_batch: int | None = None) -> dict[str, Any]:
    """Claims/s and cycles/s, raw and through run_dispatcher(), with 1, 2 and 4 processes
    (``dispatcher_batch`` None: the product's default)."""
    dispatcher_batch = dispatcher_batch or default_batch(dsn)
    claims = []
    for p in processes:
        claims.append(measure_raw(dsn, "claim", p, batch, seconds))
        release_leases(dsn)
    cycles = [measure_raw(dsn, "cycle", p, batch, seconds) for p in processes]
    disp = [measure_dispatchers(dsn, p, seconds, concurrency=dispatcher_concurrency,
                                batch=dispatcher_batch) for p in processes]
    cpus = common.machine()["cpus"] or 0
    common.print_table(
        f"Raw SQL workers (edm.claim_v2 batch {batch}, slots per service as the dispatcher; "
        f"cycle = claim + complete), {seconds:.0f} s windows",
        ["processes", "claims/s", "cycles/s", "claim call p50 ms", "claim call p99 ms",
         "per subtask p50 ms", "complete call p50 ms", "mean batch"],
        [[f"{c['processes']}" + (" (oversubscribed)" if c["processes"] > cpus else ""),
          c["claims_per_s"], y["cycles_per_s"], c["claim_call_p50_ms"], c["claim_call_p99_ms"],
          c["claim_per_subtask_p50_ms"], y["complete_call_p50_ms"], c["mean_batch"]]
         for c, y in zip(claims, cycles, strict=True)],
        note="claims/s: claim-only loop (leases released afterwards); cycles/s: claim then "
             "complete('sent') in a loop.")
    common.print_table(
        f"run_dispatcher() processes, NullTransport(delay=0), concurrency "
        f"{dispatcher_concurrency}, batch {dispatcher_batch}, {seconds:.0f} s windows",
        ["processes", "cycles/s", "claims/s", "claim call p50 ms", "claim call p99 ms",
         "mean batch", "max RSS MB"],
        [[d["processes"], d["cycles_per_s"], d["claims_per_s"], d["claim_call_p50_ms"],
          d["claim_call_p99_ms"], d["mean_batch"], d["max_rss_mb"]] for d in disp])
    best_raw = max(cycles, key=lambda r: r["cycles_per_s"] or 0)
    best_disp = max(disp, key=lambda r: r["cycles_per_s"])
    best_claim = max(claims, key=lambda r: r["claims_per_s"])
    one = claims[0]
    return {
        "claims": claims, "raw_cycles": cycles, "dispatcher": disp,
        "claims_per_s": best_claim["claims_per_s"],
        "raw_cycles_per_s": best_raw["cycles_per_s"],
        "cycles_per_s": best_disp["cycles_per_s"],
        "claim_p50_ms": one["claim_call_p50_ms"], "claim_p99_ms": one["claim_call_p99_ms"],
        "claim_per_subtask_p50_ms": one["claim_per_subtask_p50_ms"],
    }


def add_throughput_args(p: Any, *, default_scale: float = 1.0) -> None:
    """Command-line options shared by the throughput scenarios."""
    p.add_argument("--scale", type=float, default=default_scale,
                   help="multiply users, tasks and subtasks by this (1 = the design's size)")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each measured window")
    p.add_argument("--batch", type=int, default=50, help="claim batch size (raw workers)")
    p.add_argument("--concurrency", type=int, default=500, help="dispatcher sends in flight")
    p.add_argument("--dispatcher-batch", type=int, default=None,
                   help="run_dispatcher()'s batch_size (default: the product's, config "
                        "queue.central_batch_size)")
    p.add_argument("--pgq-jobs", type=int, default=100_000, help="no-op jobs PgQueuer drains")
    p.add_argument("--no-baselines", action="store_true", help="skip pgbench and PgQueuer")


def run_throughput_scenario(name: str, title: str, args: Any, spec: Any,
                            scale: dict[str, Any], full_size_note: str) -> dict[str, Any]:
    """Build ``spec`` on a fresh database, run the throughput suite and the quick baselines."""
    from benchmarks import baselines
    from edm_sched.testing import worlds as data

    t_run = time.perf_counter()
    result: dict[str, Any] = {"scenario": name}
    with common.bench_server(args.dsn, keep=args.keep) as server:
        dsn = server.fresh_database(f"edm_bench_{name}")
        scale = {**scale, "scaled_down": args.scale < 1}
        result.update(common.print_header(title, server, scale))
        if args.scale < 1:
            print(f"NOTE: scaled down from the design's size ({full_size_note}) by "
                  f"--scale {args.scale}")
        common.say(f"building {name}")
        report = data.build_world(dsn, spec)
        print(f"build   : {report.seconds:.0f} s ({report.services:,} services, "
              f"{report.grants:,} grants; "
              + ", ".join(f"{k} {v:.1f} s" for k, v in report.steps.items()) + ")")
        result["build_seconds"] = report.seconds
        result["services"] = report.services
        result["grants"] = report.grants
        thr = throughput_suite(dsn, seconds=args.seconds, batch=args.batch,
                               dispatcher_concurrency=args.concurrency,
                               dispatcher_batch=args.dispatcher_batch)
        result.update(thr)
        pg_best = sl_best = float("nan")
        if not args.no_baselines:
            common.say("baselines: pgbench SKIP LOCKED ceiling, PgQueuer (best usual configs)")
            b = baselines.quick_baselines(dsn, args.seconds, args.pgq_jobs)
            result.update(b)
            pg_best, sl_best = b["pgqueuer_jobs_per_s"], b["skip_locked_tps"]
        result["ratio_vs_pgqueuer"] = common.ratio(thr["cycles_per_s"], pg_best)
        result["ratio_vs_skip_locked"] = common.ratio(thr["cycles_per_s"], sl_best)
        result["raw_ratio_vs_skip_locked"] = common.ratio(thr["raw_cycles_per_s"], sl_best)
        common.print_table(
            f"{title}: summary (ratios measured in this run)",
            ["figure", "value", "vs PgQueuer", "vs SKIP LOCKED ceiling"],
            [["cycles/s, run_dispatcher (cycles_per_s)", thr["cycles_per_s"],
              result["ratio_vs_pgqueuer"], result["ratio_vs_skip_locked"]],
             ["cycles/s, raw SQL workers", thr["raw_cycles_per_s"],
              common.ratio(thr["raw_cycles_per_s"], pg_best),
              result["raw_ratio_vs_skip_locked"]],
             ["claims/s, raw SQL (claim only)", thr["claims_per_s"],
              common.ratio(thr["claims_per_s"], pg_best),
              common.ratio(thr["claims_per_s"], sl_best)],
             ["claim call p50 / p99 ms (1 process)",
              f"{thr['claim_p50_ms']:.2f} / {thr['claim_p99_ms']:.2f}", None, None],
             ["PgQueuer best jobs/s", pg_best, None, None],
             ["pgbench SKIP LOCKED best tps", sl_best, None, None]])
        common.wait_for_stats(1.0)
        stats = common.table_stats(dsn)
        common.print_table_stats(f"Hot tables after the {name} run (pg_stat_user_tables)", stats)
        result["table_stats"] = stats
        result["dead_tuples"] = {s["table"]: s["dead"] for s in stats}
        result["run_seconds"] = time.perf_counter() - t_run
        print(f"\n{name} finished in {result['run_seconds']:.0f} s")
    return result
