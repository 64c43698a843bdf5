"""Warm-up ramps (0018): a calendar_day limit 'warmup' that follows the ramp day by day."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edm_sched.api import Scheduler
from tests.support.helpers import at, claim_v2, make_service, make_task

# T0 (tests.support.helpers) is 2026-03-02 12:00 UTC: 21:00 in Tokyo (UTC+9, no DST),
# whose local midnight is 15:00 UTC, three hours after T0.
TOKYO_MIDNIGHT = 3 * 3600
DAY = 86_400


@pytest.fixture
def sched(dsn: str) -> Iterator[Scheduler]:
    with Scheduler(dsn) as s:
        yield s


def claim2(conn: psycopg.Connection[Any], now: dt.datetime, *, per_service: int = 20,
           batch: int = 50) -> list[dict[str, Any]]:
    return claim_v2(conn, now, per_service=per_service, batch=batch)


def set_warmup(conn: psycopg.Connection[Any], sid: int, ramp: list[int] | None,
               started_on: dt.date | None, now: dt.datetime) -> int | None:
    row = conn.execute("SELECT edm.set_service_warmup(%s, %s::int[], %s::date, %s)",
                       (sid, ramp, started_on, now)).fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def apply(conn: psycopg.Connection[Any], now: dt.datetime) -> int:
    row = conn.execute("SELECT edm.apply_warmups(%s)", (now,)).fetchone()
    assert row is not None
    return int(row[0])


def warmup_limit(conn: psycopg.Connection[Any], sid: int) -> tuple[Any, ...] | None:
    return conn.execute("SELECT max_count, day, day_count FROM edm.service_limits"
                        " WHERE service_id = %s AND name = 'warmup'", (sid,)).fetchone()


def test_warmup_ramp_doubles_to_the_full_volume(conn: psycopg.Connection[Any]) -> None:
    def ramp(*args: Any) -> list[int]:
        row = conn.execute("SELECT edm.warmup_ramp(%s::int, %s::int, %s::numeric)", args).fetchone()
        assert row is not None
        return row[0]  # type: ignore[no-any-return]

    assert ramp(50, 1000, 2) == [50, 100, 200, 400, 800, 1000]
    assert ramp(7, 7, 2) == [7]
    assert ramp(100, 400, 1.5) == [100, 150, 225, 338, 400]
    for bad in ((0, 10, 2), (10, 5, 2), (1, 10, 1), (1, 100_000_000, 1.01)):
        with pytest.raises(psycopg.Error) as err:
            ramp(*bad)
        assert err.value.sqlstate == "ED005", bad


def test_ramp_follows_local_days_in_a_non_utc_zone(sched: Scheduler,
                                                    conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a")
    sid = make_service(sched, "fresh-ip", interval=0, users=["a"], tz="Asia/Tokyo")
    make_task(sched, "a", 60)
    day1 = dt.date(2026, 3, 2)  # Tokyo's date at T0
    assert set_warmup(conn, sid, [3, 5, 8], None, at(0)) == 3  # started today, local
    assert len(claim2(conn, at(0))) == 3
    assert claim2(conn, at(60)) == []
    assert claim2(conn, at(TOKYO_MIDNIGHT - 1)) == []  # 23:59:59 in Tokyo: still day 1
    status = conn.execute("SELECT state, day, days, ceiling_today, ceiling_tomorrow, started_on"
                          " FROM edm.service_warmup_status WHERE service_id = %s",
                          (sid,)).fetchone()
    assert status is not None and status[5] == day1

    # Day 2 starts at Tokyo's midnight. Before any sweep the ceiling in force is
    # day 1's (3), lower than day 2's: day 2 counts from 0 against it.
    assert len(claim2(conn, at(TOKYO_MIDNIGHT + 1))) == 3
    assert claim2(conn, at(TOKYO_MIDNIGHT + 2)) == []
    assert apply(conn, at(TOKYO_MIDNIGHT + 3)) == 1
    assert warmup_limit(conn, sid) == (5, day1 + dt.timedelta(days=1), 3)  # count kept
    assert len(claim2(conn, at(TOKYO_MIDNIGHT + 4))) == 2
    assert claim2(conn, at(TOKYO_MIDNIGHT + 5)) == []

    # Day 3: the sweep moves the ceiling, then 8 sends.
    d3 = TOKYO_MIDNIGHT + DAY
    report = conn.execute("SELECT edm.run_sweeps(%s)", (at(d3 + 1),)).fetchone()
    assert report is not None and report[0]["warmups_applied"] == 1
    assert len(claim2(conn, at(d3 + 2))) == 8
    assert claim2(conn, at(d3 + 3)) == []

    # Day 4, after the ramp: the limit still counts day 3 (yesterday), so it
    # stays until a send has moved it to day 4; the next sweep removes it.
    d4 = d3 + DAY
    assert apply(conn, at(d4 + 1)) == 0
    assert warmup_limit(conn, sid) is not None
    assert len(claim2(conn, at(d4 + 2), per_service=1)) == 1
    assert apply(conn, at(d4 + 3)) == 1
    assert warmup_limit(conn, sid) is None
    assert conn.execute("SELECT count(*) FROM edm.service_warmups").fetchone() == (0,)
    assert conn.execute("SELECT has_limits FROM edm.services WHERE service_id = %s",
                        (sid,)).fetchone() == (False,)
    assert len(claim2(conn, at(d4 + 4))) == 20  # no ceiling any more


def test_a_late_slot_of_yesterday_keeps_yesterdays_headroom(
        sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    """A claim that began before midnight may slot on the old day after the sweep
    raised the ceiling for the new one: the old day keeps its own ceiling."""
    sched.upsert_user("a")
    sid = make_service(sched, "fresh-ip", interval=0, users=["a"])  # UTC days
    make_task(sched, "a", 40)
    midnight = 12 * 3600  # T0 is noon UTC
    set_warmup(conn, sid, [3, 10], None, at(0))
    assert len(claim2(conn, at(0), per_service=2)) == 2  # day 1: 2 of 3
    apply(conn, at(midnight + 1))  # day 2: ceiling 10
    assert warmup_limit(conn, sid) == (10, dt.date(2026, 3, 2), 9)  # 2 + (10 - 3)
    # the late claim: its clock is still on day 1
    assert len(claim2(conn, at(midnight - 0.5))) == 1
    assert len(claim2(conn, at(midnight + 2))) == 10  # day 2 counts afresh


def test_a_stale_ceiling_is_never_above_the_days_and_lowering_is_conservative(
        sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a")
    sid = make_service(sched, "fresh-ip", interval=0, users=["a"])
    make_task(sched, "a", 40)
    # started yesterday: today is day 2
    assert set_warmup(conn, sid, [2, 6, 9], dt.date(2026, 3, 1), at(0)) == 6
    assert len(claim2(conn, at(0))) == 6
    # a new ramp, lower today: what was sent today counts against it
    assert set_warmup(conn, sid, [1, 4], dt.date(2026, 3, 1), at(1)) == 4
    assert claim2(conn, at(2)) == []
    # a ramp starting tomorrow holds today at its first day's ceiling
    assert set_warmup(conn, sid, [7, 8], dt.date(2026, 3, 3), at(3)) == 7
    assert len(claim2(conn, at(4))) == 1


def test_sends_before_the_warmup_started_count_on_its_first_day(
        sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a")
    sid = make_service(sched, "fresh-ip", interval=0, users=["a"])
    make_task(sched, "a", 40)
    assert len(claim2(conn, at(0), per_service=4)) == 4
    set_warmup(conn, sid, [5, 10], None, at(1))
    assert len(claim2(conn, at(2))) == 1


def test_bad_ramps_and_unknown_services_are_refused_and_change_nothing(
        sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sid = make_service(sched, "fresh-ip", interval=0)
    set_warmup(conn, sid, [10, 20], None, at(0))
    bad_ramps: list[Any] = [[5, 3], [0, 10], [10, None], [1] * 367, [[1, 2], [3, 4]],
                            [100_000_001]]
    for ramp in bad_ramps:
        with pytest.raises(psycopg.Error) as err:
            set_warmup(conn, sid, ramp, None, at(1))
        assert err.value.sqlstate == "ED005", ramp
    with pytest.raises(psycopg.Error) as err:
        conn.execute("SELECT edm.set_service_warmup(%s, ARRAY[1, 2], 'infinity')", (sid,))
    assert err.value.sqlstate == "ED005"
    with pytest.raises(psycopg.Error) as err:
        set_warmup(conn, 999_999, [1, 2], None, at(1))
    assert err.value.sqlstate == "ED001"
    assert conn.execute("SELECT ramp FROM edm.service_warmups WHERE service_id = %s",
                        (sid,)).fetchone() == ([10, 20],)
    # ending it (NULL or an empty ramp) removes the limit at once
    assert set_warmup(conn, sid, [], None, at(2)) is None
    assert warmup_limit(conn, sid) is None
    assert set_warmup(conn, sid, None, None, at(2)) is None  # already ended: fine


def test_the_warmup_limit_belongs_to_the_warmup(sched: Scheduler,
                                                conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a")
    sid = make_service(sched, "fresh-ip", interval=0, users=["a"])
    make_task(sched, "a", 20)
    set_warmup(conn, sid, [4, 8], None, at(0))
    assert len(claim2(conn, at(0), per_service=3)) == 3
    # replacing the other limits keeps it, with its count
    conn.execute("SELECT edm.set_service_limits(%s, %s)", (sid, json.dumps(
        [{"name": "per_minute", "kind": "rate", "max_count": 600, "window_ms": 60_000},
         {"name": "warmup", "kind": "calendar_day", "max_count": 1000}])))
    assert warmup_limit(conn, sid) == (4, dt.date(2026, 3, 2), 3)
    names = conn.execute("SELECT array_agg(name ORDER BY name) FROM edm.service_limits"
                         " WHERE service_id = %s", (sid,)).fetchone()
    assert names == (["per_minute", "warmup"],)
    assert conn.execute("SELECT max_count, used FROM edm.service_limit_status"
                        " WHERE service_id = %s AND limit_name = 'warmup'",
                        (sid,)).fetchone() is not None
    # a service with a limit of its own named warmup is not taken over
    other = make_service(sched, "other", interval=0)
    conn.execute("SELECT edm.set_service_limits(%s, %s)", (other, json.dumps(
        [{"name": "warmup", "kind": "calendar_day", "max_count": 1000}])))
    with pytest.raises(psycopg.Error) as err:
        set_warmup(conn, other, [1, 2], None, at(0))
    assert err.value.sqlstate == "ED005"
    # deleting a warming-up service takes its warm-up and limit with it
    fresh = make_service(sched, "fresh-2", interval=0)
    set_warmup(conn, fresh, [1, 2], None, at(0))
    conn.execute("DELETE FROM edm.services WHERE service_id = %s", (fresh,))
    assert warmup_limit(conn, fresh) is None


def test_above_the_ceiling_work_overflows_to_the_users_other_service(
        sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a")
    warming = make_service(sched, "fresh-ip", interval=0, users=["a"])
    seasoned = make_service(sched, "old-ip", interval=0, users=["a"])
    make_task(sched, "a", 30)
    set_warmup(conn, warming, [5, 10], None, at(0))
    sent: dict[int, int] = {warming: 0, seasoned: 0}
    for i in range(6):
        for row in claim2(conn, at(i), per_service=4):
            sent[row["service_id"]] += 1
    assert sent == {warming: 5, seasoned: 24}
    reason = conn.execute("SELECT limit_name FROM edm.services s,"
                          " edm.service_binding_limit(s, %s) WHERE s.service_id = %s",
                          (at(7), warming)).fetchone()
    assert reason == ("warmup",)


def test_a_sweep_with_nothing_to_change_locks_no_service(
        sched: Scheduler, conn: psycopg.Connection[Any], dsn: str) -> None:
    """Claims skip a locked service: the sweep locks only the services whose
    ceiling moves, so on most sweeps it takes no service from the claims."""
    sid = make_service(sched, "fresh-ip", interval=0)
    set_warmup(conn, sid, [5, 10], None, at(0))
    with psycopg.connect(dsn) as sweeper, psycopg.connect(dsn, autocommit=True) as claimer:
        assert sweeper.execute("SELECT edm.apply_warmups(%s)", (at(60),)).fetchone() == (0,)
        claimer.execute("SELECT 1 FROM edm.services WHERE service_id = %s FOR UPDATE NOWAIT",
                        (sid,))
        sweeper.rollback()
        assert sweeper.execute("SELECT edm.apply_warmups(%s)", (at(DAY),)).fetchone() == (1,)
        with pytest.raises(psycopg.errors.LockNotAvailable):
            claimer.execute("SELECT 1 FROM edm.services WHERE service_id = %s"
                            " FOR UPDATE NOWAIT", (sid,))
        sweeper.rollback()


# One step of the property below: (ms from a local midnight, what runs, how late its clock is).
# A "late" claim runs after the steps before it with a clock up to a second behind them:
# a claim that began before midnight and reached the service after the sweep.
_STEP = st.tuples(st.integers(min_value=-1000, max_value=1000),
                  st.sampled_from(["claim", "sweep", "late"]),
                  st.integers(min_value=1, max_value=2000))


@pytest.mark.slow
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(ramp=st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=4).map(sorted),
       start_shift=st.integers(min_value=-1, max_value=1),
       nights=st.lists(st.lists(_STEP, min_size=1, max_size=8), min_size=3, max_size=5),
       per=st.integers(min_value=1, max_value=4))
def test_no_local_day_ever_exceeds_its_ceiling(dsn: str, ramp: list[int], start_shift: int,
                                               nights: list[list[tuple[int, str, int]]],
                                               per: int) -> None:
    """Whatever the order of claims, late claims and sweeps around each local
    midnight (and at midday, to use the day up), every local day's slots stay
    within that day's ceiling (I2)."""
    tz = ZoneInfo("Asia/Tokyo")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE edm.services, edm.users, edm.tasks, edm.subtasks CASCADE")
        with Scheduler(dsn) as s:
            s.upsert_user("a")
            sid = make_service(s, "fresh-ip", interval=0, users=["a"], tz="Asia/Tokyo")
            make_task(s, "a", 400)
        first = at(TOKYO_MIDNIGHT - 3600)  # 23:00 in Tokyo on day 0
        started_on = first.astimezone(tz).date() + dt.timedelta(days=start_shift)
        set_warmup(conn, sid, ramp, started_on, first)
        slots: list[dt.datetime] = []
        for night, steps in enumerate(nights):
            midnight = TOKYO_MIDNIGHT + night * DAY
            clock = at(midnight - 1.5)
            for offset, kind, late in sorted(steps):
                clock = max(clock, at(midnight + offset / 1000))
                if kind == "sweep":
                    apply(conn, clock)
                else:
                    when = clock - dt.timedelta(milliseconds=late if kind == "late" else 0)
                    slots += [r["send_at"] for r in claim2(conn, when, per_service=per)]
            apply(conn, at(midnight + 4 * 3600))  # midday: the sweep, then use the day up
            for k in range(3):
                slots += [r["send_at"] for r in claim2(conn, at(midnight + 4 * 3600 + k),
                                                       per_service=per)]
    per_day: dict[dt.date, int] = {}
    for slot in slots:
        day = slot.astimezone(tz).date()
        per_day[day] = per_day.get(day, 0) + 1
    for day, n in per_day.items():
        index = (day - started_on).days
        ceiling = ramp[0] if index < 0 else ramp[index] if index < len(ramp) else None
        assert ceiling is None or n <= ceiling, (day, n, ceiling, per_day)
