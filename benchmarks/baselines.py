"""The FIFO baselines measured in the same run, on the same database.

* :func:`pgbench_skip_locked` — the raw ceiling (docs/performance.md): pgbench
  driving a single-row ``UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP
  LOCKED LIMIT 1)`` (claim and completion of one job in one statement and one
  transaction), with 1, 2 and 4 clients.
* :func:`pgqueuer_drain` — PgQueuer (``pip install pgqueuer``; the ``bench``
  extra) draining N no-op jobs, over a small grid of configurations
  (driver, worker processes, dequeue batch size); the best one is its figure.

Both create their own tables in the benchmark database (schema ``bench`` and
PgQueuer's own tables), never touching schema ``edm``.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.common import as_uri, pgbench_path, say
from benchmarks.workers import run_parallel

SKIP_LOCKED_SETUP = """
CREATE SCHEMA IF NOT EXISTS bench;
DROP TABLE IF EXISTS bench.queue;
CREATE TABLE bench.queue (
  id      bigint PRIMARY KEY,
  payload text NOT NULL,
  status  text NOT NULL DEFAULT 'pending',
  done_at timestamptz
);
INSERT INTO bench.queue (id, payload) SELECT g, 'job ' || g FROM generate_series(1, %s) g;
CREATE INDEX queue_pending_idx ON bench.queue (id) WHERE status = 'pending';
"""

SKIP_LOCKED_SCRIPT = """\
UPDATE bench.queue SET status = 'done', done_at = now()
WHERE id = (SELECT id FROM bench.queue WHERE status = 'pending'
            ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED);
"""


def pgbench_skip_locked(dsn: str, clients: tuple[int, ...] = (1, 2, 4), seconds: float = 10,
                        rows: int = 600_000) -> list[dict[str, Any]]:
    """tps of the single-row SKIP LOCKED claim+complete for each client count."""
    binary = pgbench_path()
    if binary is None:
        say("pgbench not found: skipping the SKIP LOCKED ceiling")
        return []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SKIP_LOCKED_SETUP % int(rows))
        conn.execute("VACUUM (ANALYZE) bench.queue")
    results = []
    with tempfile.TemporaryDirectory(prefix="edm-pgbench-") as tmp:
        script = Path(tmp) / "skip_locked.sql"
        script.write_text(SKIP_LOCKED_SCRIPT)
        for c in clients:
            cmd = [str(binary), "-n", "-M", "prepared", "-f", str(script), "-c", str(c),
                   "-j", str(c), "-T", str(max(1, round(seconds))), "-r", dsn]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                                  timeout=seconds + 120)
            if proc.returncode != 0:
                raise RuntimeError(f"pgbench failed: {proc.stderr.strip()[-500:]}")
            tps = _parse(r"tps = ([0-9.]+) \(without initial connection time\)", proc.stdout)
            lat = _parse(r"latency average = ([0-9.]+) ms", proc.stdout)
            done = int(_parse(r"number of transactions actually processed: (\d+)",
                              proc.stdout) or 0)
            results.append({"clients": c, "tps": tps, "latency_ms": lat, "transactions": done})
            say(f"  pgbench SKIP LOCKED, {c} client(s): {tps:,.0f} tps")
    with psycopg.connect(dsn, autocommit=True) as conn:
        left = conn.execute("SELECT count(*) FROM bench.queue WHERE status = 'pending'").fetchone()
    if left is not None and left[0] == 0:
        say("  warning: the pgbench queue ran dry; raise rows")
    return results


def _parse(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    return float(m.group(1)) if m else float("nan")


# ----------------------------------------------------------------------- PgQueuer


def pgqueuer_available() -> str | None:
    """None when PgQueuer can run, else why not."""
    try:
        import pgqueuer  # noqa: F401
    except ImportError:
        return "pgqueuer is not installed (pip install pgqueuer, or the bench extra)"
    return None


def _has_asyncpg() -> bool:
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        return False
    return True


async def _pgq_connect(dsn: str, driver: str) -> Any:
    from pgqueuer.db import AsyncpgDriver, PsycopgDriver

    if driver == "asyncpg":
        import asyncpg

        return AsyncpgDriver(await asyncpg.connect(dsn=as_uri(dsn)))
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    return PsycopgDriver(conn)


async def _pgq_install_and_enqueue(dsn: str, jobs: int) -> None:
    from pgqueuer.queries import Queries

    driver = await _pgq_connect(dsn, "psycopg")
    queries = Queries(driver)
    if not await queries.schema_is_installed():
        await queries.install()
    await queries.clear_queue()
    await queries.clear_statistics_log()
    step = 50_000
    for i in range(0, jobs, step):
        n = min(step, jobs - i)
        await queries.enqueue(["noop"] * n, [None] * n, [0] * n)
    await driver._connection.close()


def pgqueuer_worker(dsn: str, driver: str, batch: int, start_at: float) -> dict[str, Any]:
    """One PgQueuer consumer process draining the queue of no-op jobs."""
    import logging

    logging.getLogger("pgqueuer").setLevel(logging.ERROR)

    async def main() -> dict[str, Any]:
        from pgqueuer import PgQueuer
        from pgqueuer.models import Job
        from pgqueuer.types import QueueExecutionMode

        pgq = PgQueuer(await _pgq_connect(dsn, driver))
        done = 0

        @pgq.entrypoint("noop")
        async def noop(job: Job) -> None:
            nonlocal done
            done += 1

        delay = start_at - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await pgq.qm.run(batch_size=batch, mode=QueueExecutionMode.drain)
        return {"done": done, "finished_at": time.time()}

    try:
        import uvloop

        return uvloop.run(main())
    except ImportError:
        return asyncio.run(main())


def pgqueuer_drain(dsn: str, jobs: int, configs: list[tuple[str, int, int]] | None = None,
                   ) -> list[dict[str, Any]]:
    """jobs/s of PgQueuer draining ``jobs`` no-op jobs, for each (driver, processes, batch)."""
    if configs is None:
        # The grid searched: batch 10 (PgQueuer's default) drains 5-7x slower than 100
        # on this machine, so it is left out to keep S1 within its 10 minutes.
        drivers = ["asyncpg", "psycopg"] if _has_asyncpg() else ["psycopg"]
        configs = [(drivers[0], p, 100) for p in (1, 2, 4)]
        configs += [(drivers[0], 2, 250), (drivers[0], 2, 500)]
        if len(drivers) > 1:
            configs += [(drivers[1], 2, 100)]
    results = []
    for driver, procs, batch in configs:
        asyncio.run(_pgq_install_and_enqueue(dsn, jobs))
        start_at = time.time() + 3.0  # spawned interpreters import pgqueuer meanwhile
        out = run_parallel(pgqueuer_worker,
                           [{"dsn": dsn, "driver": driver, "batch": batch, "start_at": start_at}
                            for _ in range(procs)], timeout=600)
        elapsed = max(r["finished_at"] for r in out) - start_at
        done = sum(r["done"] for r in out)
        with psycopg.connect(dsn, autocommit=True) as conn:
            left = conn.execute("SELECT count(*) FROM pgqueuer").fetchone()
        rate = done / elapsed if elapsed > 0 else float("nan")
        results.append({"driver": driver, "processes": procs, "batch": batch, "jobs": done,
                        "seconds": elapsed, "jobs_per_s": rate,
                        "left_in_queue": int(left[0]) if left else None})
        say(f"  PgQueuer {driver}, {procs} process(es), batch {batch}: {rate:,.0f} jobs/s")
    return results


def quick_baselines(dsn: str, seconds: float, pgq_jobs: int) -> dict[str, Any]:
    """The ceiling (1, 2, 4 clients) and PgQueuer in its usual best configurations only.

    For the scenarios other than S1, which runs the full PgQueuer grid.
    """
    out: dict[str, Any] = {"skip_locked": pgbench_skip_locked(dsn, seconds=seconds)}
    out["skip_locked_tps"] = max((r["tps"] for r in out["skip_locked"]), default=float("nan"))
    if pgqueuer_available() is None:
        driver = "asyncpg" if _has_asyncpg() else "psycopg"
        out["pgqueuer"] = pgqueuer_drain(dsn, pgq_jobs, [(driver, 2, 100), (driver, 2, 500)])
        out["pgqueuer_jobs_per_s"] = max(r["jobs_per_s"] for r in out["pgqueuer"])
    else:
        out["pgqueuer"] = []
        out["pgqueuer_jobs_per_s"] = float("nan")
    return out
