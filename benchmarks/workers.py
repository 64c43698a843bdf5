"""Worker processes of the benchmarks, started with the ``spawn`` context.

* :func:`raw_worker` — the scheduler's pure database cost: a loop of the
  dispatcher's claim, ``edm.claim_v2(batch)`` with as many slots per service
  as the dispatcher asks for (``mode="claim"``), or that claim followed by
  ``edm.complete(all 'sent')`` (``mode="cycle"``) on its own connection.
  (Before 0014 this loop called ``edm.claim``, one slot per service.)
* :func:`dispatcher_worker` — the product: ``run_dispatcher()`` with a
  ``NullTransport``.

Every worker waits for a common wall-clock ``start_at``, works until
``stop_at`` and counts only what finished inside that window, so that
several processes measure the same interval.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from edm_sched.dispatcher import slots_per_service

# The dispatcher's claim: per-service slots as run_dispatcher() asks (slots_per_service).
CLAIM_SQL = "SELECT subtask_id FROM edm.claim_v2(%s, %s, %s, NULL, %s, NULL, '{}')"
COMPLETE_SQL = ("SELECT count(*) FILTER (WHERE accepted) FROM edm.complete(%s, %s, %s, NULL, "
                "NULL, NULL, NULL, NULL)")
LATENCY_SAMPLES = 200_000


def _sleep_until(t: float) -> None:
    delay = t - time.time()
    if delay > 0:
        time.sleep(delay)


def raw_worker(dsn: str, owner: str, mode: str, batch: int, start_at: float, stop_at: float,
               lease_seconds: int = 600) -> dict[str, Any]:
    """Loop claim (and complete) between start_at and stop_at; returns counts and latencies."""
    claim_lat: list[float] = []
    complete_lat: list[float] = []
    claimed = completed = calls = empty = 0
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as conn:
        conn.execute("SELECT 1")
        _sleep_until(start_at)
        while True:
            t0 = time.perf_counter()
            if time.time() >= stop_at:
                break
            ids = [r[0] for r in conn.execute(CLAIM_SQL, (owner, batch, lease_seconds,
                                                          slots_per_service(batch)))]
            t1 = time.perf_counter()
            if mode == "cycle" and ids:
                conn.execute(COMPLETE_SQL, (owner, ids, ["sent"] * len(ids)))
            t2 = time.perf_counter()
            if time.time() > stop_at:
                break  # finished outside the window: not counted
            calls += 1
            if not ids:
                empty += 1
            claimed += len(ids)
            if len(claim_lat) < LATENCY_SAMPLES:
                claim_lat.append(t1 - t0)
                if mode == "cycle" and ids:
                    complete_lat.append(t2 - t1)
            if mode == "cycle":
                completed += len(ids)
    return {"owner": owner, "claimed": claimed, "completed": completed, "calls": calls,
            "empty_calls": empty, "claim_latency": claim_lat, "complete_latency": complete_lat}


def dispatcher_worker(dsn: str, concurrency: int | None, batch: int | None, delay: float,
                      start_at: float, stop_at: float,
                      run_sweeps: bool = True) -> dict[str, Any]:
    """run_dispatcher() with NullTransport(delay) from start_at until stop_at (concurrency or
    batch None: the product's defaults, config queue.concurrent_workers and
    queue.central_batch_size)."""
    import logging

    from edm_sched.dispatcher import run_dispatcher
    from edm_sched.transports.null import NullTransport

    logging.basicConfig(level=logging.ERROR)
    stop = threading.Event()
    threading.Timer(max(0.0, stop_at - time.time()), stop.set).start()
    _sleep_until(start_at)
    stats = run_dispatcher(dsn, NullTransport(delay=delay), concurrency=concurrency,
                           batch_size=batch, stop_event=stop, handle_signals=False,
                           run_sweeps=run_sweeps)
    import resource

    return {"claimed": stats.claimed, "sent": stats.sent, "rejected": stats.rejected,
            "calls": stats.claim_calls, "claim_latency": stats.claim_seconds[:LATENCY_SAMPLES],
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "pid": os.getpid()}


def _entry(target: Callable[..., dict[str, Any]], kwargs: dict[str, Any],
           out: Any) -> None:
    try:
        out.put(("ok", target(**kwargs)))
    except BaseException as exc:  # report it to the parent rather than die silently
        out.put(("error", f"{type(exc).__name__}: {exc}"))
        raise


def run_parallel(target: Callable[..., dict[str, Any]], kwargs_list: list[dict[str, Any]],
                 timeout: float, monitor: Callable[[list[int]], None] | None = None,
                 ) -> list[dict[str, Any]]:
    """Run ``target(**kwargs)`` in one spawned process per kwargs; their results.

    ``monitor(pids)`` is called about every 0.1 s while they run (RSS sampling,
    database polling); it must return quickly.
    """
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(target, kw, out), daemon=True)
             for kw in kwargs_list]
    for p in procs:
        p.start()
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    deadline = time.time() + timeout
    pids = [p.pid for p in procs if p.pid is not None]
    while len(results) + len(errors) < len(procs) and time.time() < deadline:
        if monitor is not None:
            monitor(pids)
        try:
            status, value = out.get(timeout=0.1)
        except Exception:  # queue.Empty
            if all(not p.is_alive() for p in procs) and out.empty():
                break
            continue
        if status == "ok":
            results.append(value)
        else:
            errors.append(value)
    for p in procs:
        p.join(timeout=max(0.1, deadline - time.time()))
        if p.is_alive():
            p.terminate()
            p.join(5)
    if errors or len(results) < len(procs):
        raise RuntimeError(f"{len(procs) - len(results)} worker(s) failed: {errors or 'timeout'}")
    return results
