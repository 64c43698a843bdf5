"""Small helpers shared by tests: build a world, claim and complete with a controlled clock."""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg

from edm_sched.api import Scheduler
from edm_sched.dispatcher import run_dispatcher

T0 = dt.datetime(2026, 3, 2, 12, 0, tzinfo=dt.UTC)
TEMPLATE = {"subject": "Hello {{ first_name | default('there') }}",
            "body_text": "Hi {{ first_name | default('there') }}!"}


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def make_service(s: Scheduler, name: str, *, interval: float = 1.0, quota: int = 1_000_000,
                 users: list[str] | None = None, tz: str = "UTC", priority: int = 0) -> int:
    sid = s.create_service({"name": name, "from_addresses": [f"{name}@sender.example"],
                            "interval_seconds": interval, "daily_quota": quota,
                            "transport": "null", "quota_tz": tz})
    for u in users or []:
        s.grant(sid, u, priority=priority)
    return sid


def make_task(s: Scheduler, user: str, n: int, *, name: str = "t", priority: int = 0,
              scheduled_at: dt.datetime | None = None, domain: str = "rcpt.example") -> int:
    created = s.create_task({
        "user_id": user, "name": name, "templates": [TEMPLATE], "priority": priority,
        "scheduled_at": scheduled_at or T0,
        "recipients": [{"email": f"{user}-{name}-{i}@{domain}"} for i in range(n)],
    })
    return created.task_id


def claim(conn: psycopg.Connection[Any], when: dt.datetime, *, owner: str = "d1",
          batch: int = 50, lease: int | None = None) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute(
        "SELECT subtask_id, task_id, user_id, service_id, email, attempt, lease_expires_at"
        " FROM edm.claim(%s, %s, %s, %s)", (owner, batch, lease, when)).fetchall()


def claim_v2(conn: psycopg.Connection[Any], when: dt.datetime, *, owner: str = "d1",
             batch: int = 50, per_service: int = 1, lookahead_ms: int = 0,
             lease: int | None = None) -> list[dict[str, Any]]:
    """The dispatcher's claim (``edm.claim_v2``) at ``when``: its rows as dicts, in claim
    order (no services skipped)."""
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute(
        "SELECT * FROM edm.claim_v2(%s, %s, %s, %s, %s, %s, '{}')",
        (owner, batch, lease, when, per_service, lookahead_ms)).fetchall()


def complete(conn: psycopg.Connection[Any], when: dt.datetime, ids: list[int],
             outcome: str = "sent", *, owner: str = "d1",
             code: int | None = None) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT subtask_id, accepted, status, reason FROM edm.complete(%s, %s, %s, %s, NULL, NULL,"
        " NULL, %s)",
        (owner, ids, [outcome] * len(ids), [code] * len(ids), when)).fetchall()


def counters_match(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    """Tasks whose counters differ from the counts of their subtasks (I4); [] when all agree."""
    return conn.execute(
        """
        SELECT t.task_id, t.pending_count, t.leased_count, t.sent_count, t.failed_count,
               t.cancelled_count, c.p, c.l, c.s, c.f, c.x
        FROM edm.tasks t
        LEFT JOIN LATERAL (
          SELECT count(*) FILTER (WHERE status = 'pending') AS p,
                 count(*) FILTER (WHERE status = 'leased') AS l,
                 count(*) FILTER (WHERE status = 'sent') AS s,
                 count(*) FILTER (WHERE status = 'failed') AS f,
                 count(*) FILTER (WHERE status = 'cancelled') AS x
          FROM edm.subtasks st WHERE st.task_id = t.task_id) c ON true
        WHERE (t.pending_count, t.leased_count, t.sent_count, t.failed_count, t.cancelled_count)
              IS DISTINCT FROM (c.p, c.l, c.s, c.f, c.x)
        UNION ALL
        SELECT NULL, u.claimable_tasks, n.n, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
        FROM edm.users u
        JOIN LATERAL (SELECT count(*) AS n FROM edm.tasks t
                      WHERE t.user_id = u.user_id AND t.claimable) n ON true
        WHERE u.claimable_tasks <> n.n
        """).fetchall()


KEEP_TABLES = ("config", "schema_migrations")


def reset_database(conn: psycopg.Connection[Any]) -> None:
    """Empty every edm table except config and schema_migrations, identities restarted.

    Tables that refuse TRUNCATE by a trigger (the append-only audit log) are
    left alone: nothing here reads them.
    """
    tables = [r[0] for r in conn.execute(
        "SELECT format('%%I.%%I', n.nspname, c.relname) FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'edm' AND c.relkind IN ('r', 'p') AND NOT c.relispartition"
        "   AND c.relname <> ALL (%s)"
        "   AND NOT EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = c.oid"
        "                   AND g.tgtype & 32 <> 0)",  # 32: a TRUNCATE trigger
        (list(KEEP_TABLES),)).fetchall()]
    conn.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
    conn.execute("ALTER SEQUENCE edm.serve_seq RESTART")


def fingerprint(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
    row = conn.execute("""
        SELECT (SELECT md5(coalesce(string_agg(u::text, ',' ORDER BY u.user_id), ''))
                FROM edm.users u),
               (SELECT md5(coalesce(string_agg(s::text, ',' ORDER BY s.service_id), ''))
                FROM edm.services s),
               (SELECT count(*) FROM edm.grants), (SELECT count(*) FROM edm.tasks),
               (SELECT count(*) FROM edm.subtasks), (SELECT count(*) FROM edm.contacts),
               (SELECT count(*) FROM edm.suppressions), (SELECT count(*) FROM edm.templates),
               (SELECT md5(string_agg(c.value::text, ',' ORDER BY c.key)) FROM edm.config c)
        """).fetchone()
    assert row is not None
    return tuple(row)


def wait_for(pred: Any, timeout: float = 30.0) -> None:
    """Poll ``pred`` every 50 ms until it holds; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


@contextlib.contextmanager
def dispatcher_thread(dsn: str, *args: Any, **kwargs: Any) -> Iterator[threading.Thread]:
    """``run_dispatcher(dsn, *args, **kwargs)`` in a thread of this process while the
    block runs; stopped and joined (at most 30 s) when it ends. Check
    ``not thread.is_alive()`` afterwards."""
    stop = threading.Event()
    th = threading.Thread(target=run_dispatcher, args=(dsn, *args),
                          kwargs={"stop_event": stop, "handle_signals": False, **kwargs})
    th.start()
    try:
        yield th
    finally:
        stop.set()
        th.join(30)
