"""Recovery sweeps: run by one elected dispatcher, or alone by ``edm-sched sweep``.

The work is in SQL (``edm.run_sweeps``: expired leases, quota-day rollover,
due tasks, completion, alerts, metric roll-ups, partitions, retention; then
``edm.check_reputation``, the reputation breaker); this
module elects the leader and calls it. Leadership is a session advisory lock:
it is released when the leader's connection ends, including on ``kill -9``,
so another dispatcher takes over at its next tick. ``edm-sched sweep`` takes
the same lock, so a manual sweep never runs beside the leader's.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg
from psycopg.rows import dict_row

from edm_sched import db, errors
from edm_sched.sqlfiles import query

# pg_advisory_lock key: the bytes "edm_swep" as a signed 64-bit integer.
SWEEP_LOCK_KEY = int.from_bytes(b"edm_swep", "big", signed=True)


async def expire_leases_async(conn: psycopg.AsyncConnection[Any],
                              now: dt.datetime | None = None) -> int:
    cur = await conn.execute(query("sweep_expire_leases"), (now,))
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def run_async(conn: psycopg.AsyncConnection[Any],
                    now: dt.datetime | None = None) -> dict[str, Any]:
    """One round of every sweep on ``conn`` (which holds the leader lock).

    The report's ``alerts`` are the alerts not yet handed to the host; they
    are marked as handed over, so each reaches the callback once.
    """
    cur = await conn.execute(query("sweep_run"), (now,))
    row = await cur.fetchone()
    report: dict[str, Any] = dict(row[0]) if row else {}
    try:  # the reputation breaker (edm.check_reputation paces itself)
        cur = await conn.execute(query("sweep_reputation"), (now, False))
        row = await cur.fetchone()
        report["reputation_raised"] = int(row[0]) if row else 0
    except psycopg.Error as exc:
        report.setdefault("errors", []).append(f"reputation_raised: {exc}")
    acur = conn.cursor(row_factory=dict_row)
    await acur.execute(query("sweep_take_alerts"))
    report["alerts"] = await acur.fetchall()
    return report


def sweep(dsn: str, now: dt.datetime | None = None) -> dict[str, Any]:
    """One round of every sweep, run alone (``edm-sched sweep``).

    Raises :class:`errors.EdmSchedError` (LOCK_HELD) when a dispatcher is the
    sweep leader right now: its sweep covers the same ground.
    """
    with db.connect(dsn) as conn, db.translate():
        got = conn.execute(query("sweep_try_lead"), (SWEEP_LOCK_KEY,)).fetchone()
        if not (got and got[0]):
            raise SweepLockHeld("another process (a dispatcher) is sweeping right now")
        row = conn.execute(query("sweep_run"), (now,)).fetchone()
        report: dict[str, Any] = dict(row[0]) if row else {}
        row = conn.execute(query("sweep_reputation"), (now, False)).fetchone()
        report["reputation_raised"] = int(row[0]) if row else 0
        report["alerts"] = conn.cursor(row_factory=dict_row).execute(
            query("sweep_take_alerts")).fetchall()
        return report


class SweepLockHeld(errors.EdmSchedError):
    code = "LOCK_HELD"
