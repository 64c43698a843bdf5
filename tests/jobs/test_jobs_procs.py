"""Exactly-once firing with competing scheduler processes (real processes, one database).

Three processes each run ``run_jobs`` against the same database while ten
jobs fire every second. Every run appends ``job scheduled_for pid`` to a file
(O_APPEND, one write per line): that file is what really ran, independently
of what the database says. Each (job, occurrence) must appear exactly once,
with no gap between the first and the last occurrence of each job, and the
database must agree.
"""

from __future__ import annotations

import datetime as dt
import itertools
import multiprocessing
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest

from edm_sched.jobs import JobContext, JobScheduler

pytestmark = pytest.mark.slow

PROCESSES = 3
JOBS = 10
RUN_SECONDS = 4.0


def _record(ctx: JobContext) -> None:
    line = f"{ctx.job_id} {ctx.scheduled_for.isoformat() if ctx.scheduled_for else '-'} " \
           f"{os.getpid()}\n"
    fd = os.open(ctx.args["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _child(dsn: str, stop: Any, ready: Any, index: int) -> None:
    from edm_sched.jobs import run_jobs

    ready.put(index)
    run_jobs(dsn, {"record": _record}, stop_event=stop, worker_id=f"proc-{index}",
             concurrency=4, shutdown_grace=5.0)


def test_each_occurrence_fires_exactly_once_across_processes(dsn: str, tmp_path: Path,
                                                             conn: psycopg.Connection[Any]) -> None:
    log = tmp_path / "runs.log"
    sched = JobScheduler(dsn)
    job_ids = [sched.create_job({
        "name": f"every-second-{i}", "cron": "* * * * * *", "max_concurrent": 3,
        "target": {"kind": "function", "function": "record", "args": {"log": str(log)}},
    }).job_id for i in range(JOBS)]

    ctx = multiprocessing.get_context("spawn")
    stop, ready = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_child, args=(dsn, stop, ready, i)) for i in range(PROCESSES)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=60)
        time.sleep(RUN_SECONDS)
    finally:
        stop.set()
        for p in procs:
            p.join(30)
        for p in procs:
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0] * PROCESSES

    lines = [line.split() for line in log.read_text().splitlines()]
    runs = Counter((int(job), when) for job, when, _pid in lines)
    duplicates = {k: n for k, n in runs.items() if n > 1}
    assert duplicates == {}, f"occurrences run more than once: {duplicates}"

    firing_pids = {pid for _job, _when, pid in lines}
    assert len(firing_pids) >= 2, "the processes did not actually compete"

    for job_id in job_ids:
        times = sorted(dt.datetime.fromisoformat(w) for j, w in runs if j == job_id)
        assert len(times) >= RUN_SECONDS - 1
        gaps = {b - a for a, b in itertools.pairwise(times)}
        assert gaps <= {dt.timedelta(seconds=1)}, f"job {job_id} missed occurrences: {gaps}"

    # The database agrees with what ran, and nothing is left running or half-done.
    db_runs = conn.execute(
        "SELECT count(*) FILTER (WHERE status = 'succeeded'),"
        "       count(DISTINCT worker_id)"
        " FROM edm.job_executions").fetchone()
    assert db_runs is not None
    assert db_runs[0] == len(lines) and db_runs[1] >= 2
    # A runner fires an occurrence of every due job and claims as many as it has free
    # slots, leaving the rest to the others (NOTIFY). When all stop at once, the
    # occurrences of that last second that no runner claimed stay pending, never
    # started, for the next runner: only after each job's last run, never in between.
    last_run = {job_id: max(dt.datetime.fromisoformat(w) for j, w in runs if j == job_id)
                for job_id in job_ids}
    for job_id, when, status, started_at in conn.execute(
            "SELECT job_id, scheduled_for, status, started_at FROM edm.job_executions"
            " WHERE status NOT IN ('succeeded', 'skipped')").fetchall():
        assert (status, started_at) == ("pending", None), (job_id, when, status)
        assert when > last_run[job_id], f"job {job_id}: {when} left pending between runs"
    assert conn.execute("SELECT sum(running_count) FROM edm.jobs").fetchone() == (0,)
