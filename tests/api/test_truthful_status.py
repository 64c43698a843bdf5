"""Status that tells the truth (migration 0010): no live dispatcher is named as the
reason a task waits, and quota alerts end with their quota day."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from edm_sched import Scheduler
from tests.support.helpers import at, claim, make_service, make_task


@pytest.fixture
def sched(dsn: str) -> Iterator[Scheduler]:
    with Scheduler(dsn) as s:
        yield s


def reason(conn: psycopg.Connection[Any], task: int, when: dt.datetime) -> str:
    row = conn.execute("SELECT reason FROM edm.task_wait_reason(%s, %s)", (task, when)).fetchone()
    assert row is not None
    return str(row[0])


def test_no_live_dispatcher_is_the_reason(sched: Scheduler,
                                          conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a")
    make_service(sched, "svc", interval=0, users=["a"])
    task = make_task(sched, "a", 2)
    now = dt.datetime.now(dt.UTC)
    assert reason(conn, task, now).startswith("no dispatcher running")
    assert conn.execute("SELECT edm.live_dispatcher_count(%s)", (now,)).fetchone() == (0,)
    # A heartbeat 10 s old: live. The service is ready: the task is in rotation.
    conn.execute("INSERT INTO edm.dispatchers (dispatcher_id, heartbeat_at) VALUES ('d1', %s)",
                 (now - dt.timedelta(seconds=10),))
    assert conn.execute("SELECT edm.live_dispatcher_count(%s)", (now,)).fetchone() == (1,)
    assert reason(conn, task, now).startswith("in rotation")
    # Its heartbeat 40 s old (three missed), or stopped: not live any more.
    assert reason(conn, task, now + dt.timedelta(seconds=30)).startswith("no dispatcher")
    conn.execute("UPDATE edm.dispatchers SET stopped_at = %s", (now,))
    assert reason(conn, task, now).startswith("no dispatcher running")
    # Reasons that hold whatever the dispatchers do come first.
    sched.pause_task(task)
    assert reason(conn, task, now) == "paused"
    row = conn.execute("SELECT reason FROM edm.task_wait_reasons WHERE task_id = %s",
                       (task,)).fetchone()
    assert row == ("paused",)


def test_quota_alerts_end_with_their_quota_day(sched: Scheduler,
                                               conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a")
    svc = make_service(sched, "svc", interval=0, quota=2, users=["a"], tz="Europe/Paris")
    make_task(sched, "a", 10)
    claim(conn, at(0))
    claim(conn, at(1))
    conn.execute("SELECT edm.sweep_alerts(%s)", (at(2),))
    open_alerts = "SELECT count(*) FROM edm.alerts WHERE kind = 'quota' AND resolved_at IS NULL"
    assert conn.execute(open_alerts).fetchone() == (1,)
    # 23:30 in Paris the same day: still that quota day, the alert stays.
    assert conn.execute("SELECT edm.resolve_stale_quota_alerts(%s)",
                        (dt.datetime(2026, 3, 2, 22, 30, tzinfo=dt.UTC),)).fetchone() == (0,)
    # Local midnight passes; the sweep's roll-over starts the new day: resolved,
    # dated at that midnight, without waiting for usage to be re-read.
    tomorrow = dt.datetime(2026, 3, 3, 0, 5, tzinfo=dt.UTC)
    assert conn.execute("SELECT edm.roll_quota_days(%s)", (tomorrow,)).fetchone() == (1,)
    row = conn.execute("SELECT resolved_at FROM edm.alerts WHERE kind = 'quota'").fetchone()
    assert row == (dt.datetime(2026, 3, 2, 23, 0, tzinfo=dt.UTC),)
    # The new day fills up: a new alert for the new day.
    claim(conn, tomorrow)
    claim(conn, tomorrow + dt.timedelta(seconds=1))
    conn.execute("SELECT edm.sweep_alerts(%s)", (tomorrow + dt.timedelta(seconds=2),))
    assert conn.execute(open_alerts).fetchone() == (1,)
    # With no sweep at all (no dispatcher), the claim that starts the next day
    # resolves it too.
    day3 = dt.datetime(2026, 3, 4, 9, 0, tzinfo=dt.UTC)
    claim(conn, day3)
    assert conn.execute(open_alerts).fetchone() == (0,)
    assert svc
