"""Recovery sweeps: run by one elected dispatcher, or alone by ``edm-sched sweep``.

The work is in SQL (``edm.run_sweeps``); this module elects the leader and
calls it. Leadership is a session advisory lock: it is released when the
leader's connection ends, including on ``kill -9``, so another dispatcher
takes over at its next tick.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg

from edm_sched import db
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
    """One round of every sweep on ``conn`` (which should hold the leader lock)."""
    return {"leases_expired": await expire_leases_async(conn, now), "alerts": []}


def sweep(dsn: str, now: dt.datetime | None = None) -> dict[str, Any]:
    """One round of every sweep, run alone (``edm-sched sweep``)."""
    with db.connect(dsn) as conn, db.translate():
        row = conn.execute(query("sweep_expire_leases"), (now,)).fetchone()
        return {"leases_expired": int(row[0]) if row else 0, "alerts": []}
