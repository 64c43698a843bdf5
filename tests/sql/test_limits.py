"""Limits, slots, holds, due retries first, lease renewal and uncertain outcomes (0008).

Driven with a controlled clock through ``edm.claim_v2``; the limits are also
checked as properties: whatever the arrival pattern of claims, the slots handed
out never break a limit.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edm_sched.api import Scheduler
from tests.support.helpers import at, claim_v2, complete, counters_match, make_service, make_task


@pytest.fixture
def sched(dsn: str) -> Iterator[Scheduler]:
    with Scheduler(dsn) as s:
        yield s


claim2 = claim_v2


def set_limits(conn: psycopg.Connection[Any], sid: int, limits: list[dict[str, Any]]) -> None:
    conn.execute("SELECT edm.set_service_limits(%s, %s)", (sid, json.dumps(limits)))


def test_slots_are_an_interval_apart_within_the_lookahead(
        sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a")
    sched.upsert_user("b")
    make_service(sched, "svc", interval=0.1, users=["a", "b"])
    make_task(sched, "a", 10)
    make_task(sched, "b", 10)
    rows = claim2(conn, at(0), per_service=10, lookahead_ms=250)
    slots = [r["send_at"] for r in rows]
    # idle: the first slot comes after the lead (queue.slot_lead_ms, 100 ms), the next an
    # interval later; the one after (+300 ms) is past the horizon
    assert slots == [at(0.1), at(0.2)]
    assert [r["user_id"] for r in rows] in (["a", "b"], ["b", "a"])  # fair per slot
    assert all(r["lease_expires_at"] - r["send_at"] == dt.timedelta(seconds=30) for r in rows)
    # the service is ready again a lookahead before its next slot, not before
    assert claim2(conn, at(0.04), per_service=10, lookahead_ms=250) == []
    more = claim2(conn, at(0.05), per_service=10, lookahead_ms=250)
    assert [r["send_at"] for r in more] == [at(0.3)]


@pytest.mark.parametrize("case", ["edm.claim", "lookahead below the lead",
                                  "late in its transaction"])
def test_an_idle_paced_service_is_claimed_on_the_servers_clock(
        case: str, sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    """The lead ends at the horizon at the latest (0031).

    Without a clock given, the lead is counted from clock_timestamp() and the
    horizon from now(), the transaction's start. A lead past the horizon made
    the claim take the service for one blocked by an extra limit: edm.claim
    (lookahead 0) never claimed a paced service, nor claim_v2 with a lookahead
    no longer than queue.slot_lead_ms, nor a claim called more than
    (lookahead - lead) into its transaction.
    """
    sched.upsert_user("a")
    sid = make_service(sched, "svc", interval=60, users=["a"])
    make_task(sched, "a", 3)
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    lookahead = {"edm.claim": 0, "lookahead below the lead": 50, "late in its transaction": 250}
    with conn.transaction():
        if case == "late in its transaction":
            conn.execute("SELECT pg_sleep(0.3)")
        if case == "edm.claim":
            rows = cur.execute("SELECT subtask_id, leased_at AS send_at"
                               " FROM edm.claim('d1', 5, 30, NULL)").fetchall()
        else:
            rows = cur.execute("SELECT subtask_id, send_at FROM edm.claim_v2('d1', 5, 30, NULL, 1,"
                               " %s, '{}')", (lookahead[case],)).fetchall()
        row = conn.execute("SELECT now(), quota_exhausted_until FROM edm.services"
                           " WHERE service_id = %s", (sid,)).fetchone()
    assert row is not None
    start, blocked_until = row
    assert len(rows) == 1, "the idle paced service gave no slot"
    assert start <= rows[0]["send_at"] <= start + dt.timedelta(milliseconds=lookahead[case])
    assert blocked_until is None


def test_a_held_service_is_left_to_its_holder(sched: Scheduler,
                                              conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a")
    make_service(sched, "svc", interval=1, users=["a"])
    make_task(sched, "a", 10)
    assert len(claim2(conn, at(0), owner="d1")) == 1
    assert claim2(conn, at(1), owner="d2") == []  # held by d1 until slot + 2 s
    assert len(claim2(conn, at(1), owner="d1")) == 1
    assert claim2(conn, at(2.5), owner="d2") == []
    assert len(claim2(conn, at(3.001), owner="d2")) == 1  # d1's hold ended at 1 + 2 s
    conn.execute("SELECT edm.release_holds('d2')")
    assert len(claim2(conn, at(4.5), owner="d1")) == 1


def test_rate_limit_with_burst_is_a_token_bucket(sched: Scheduler,
                                                 conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a")
    sid = make_service(sched, "ses", interval=0, users=["a"])
    set_limits(conn, sid, [{"name": "per_second", "kind": "rate", "max_count": 10,
                            "window_ms": 1000, "burst": 5}])
    make_task(sched, "a", 100)
    burst = claim2(conn, at(0), per_service=50)
    assert [r["send_at"] for r in burst] == [at(0)] * 5  # the burst at once
    assert claim2(conn, at(0.05), per_service=50) == []  # blocked until one token is back
    nxt = claim2(conn, at(0.1), per_service=50)
    assert [r["send_at"] for r in nxt] == [at(0.1)]
    status = conn.execute("SELECT limit_name, max_count FROM edm.service_limit_status"
                          " WHERE service_id = %s ORDER BY 1", (sid,)).fetchall()
    assert status == [("daily_quota", 1_000_000), ("per_second", 10)]


def test_rolling_and_calendar_day_limits(sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a")
    sid = make_service(sched, "box", interval=0, users=["a"])
    set_limits(conn, sid, [{"name": "rolling_24h", "kind": "rolling", "max_count": 3,
                            "window_ms": 86_400_000},
                           {"name": "per_day", "kind": "calendar_day", "max_count": 5,
                            "time_zone": "UTC"}])
    make_task(sched, "a", 20)
    assert len(claim2(conn, at(0), per_service=10)) == 3
    assert claim2(conn, at(3600), per_service=10) == []
    # blocked until the window has moved past the first sends (bucket width: 432 s)
    until = conn.execute("SELECT quota_exhausted_until FROM edm.services WHERE service_id = %s",
                         (sid,)).fetchone()
    assert until is not None and at(86_400) <= until[0] <= at(86_400 + 2 * 432)
    assert len(claim2(conn, until[0], per_service=10)) == 3  # a new window (and day)
    assert claim2(conn, until[0] + dt.timedelta(hours=1), per_service=10) == []
    with pytest.raises(psycopg.Error, match="invalid limit"):
        set_limits(conn, sid, [{"name": "bad", "kind": "rate", "max_count": 1}])  # no window


def test_due_retry_goes_before_fresh_work(sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a")
    make_service(sched, "svc", interval=1, users=["a"])
    make_task(sched, "a", 50)
    first = claim2(conn, at(0))[0]
    complete(conn, at(0.5), [first["subtask_id"]], outcome="transient")
    retry_due = conn.execute("SELECT not_before FROM edm.subtasks WHERE subtask_id = %s",
                             (first["subtask_id"],)).fetchone()
    assert retry_due is not None
    t = (retry_due[0] - at(0)).total_seconds()
    assert claim2(conn, at(t - 0.01))[0]["subtask_id"] != first["subtask_id"]
    assert claim2(conn, at(t + 1))[0]["subtask_id"] == first["subtask_id"]


def test_uncertain_outcome_is_recorded_and_counted(sched: Scheduler,
                                                   conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a")
    make_service(sched, "svc", interval=0, users=["a"])
    make_task(sched, "a", 3)
    rows = claim2(conn, at(0), per_service=3)
    ids = [r["subtask_id"] for r in rows]
    complete(conn, at(1), ids[:1], outcome="uncertain")
    complete(conn, at(1), ids[1:2], outcome="render_error")
    dup = conn.execute("SELECT subtask_id, uncertain_sends FROM edm.possible_duplicates"
                       ).fetchall()
    assert dup == [(ids[0], 1)]
    kinds = conn.execute("SELECT kind FROM edm.send_events ORDER BY subtask_id").fetchall()
    assert kinds == [("uncertain",), ("render_error",)]
    # render_error: failed at once, no attempt and no quota unit spent
    row = conn.execute("SELECT status, attempts FROM edm.subtasks WHERE subtask_id = %s",
                       (ids[1],)).fetchone()
    assert row == ("failed", 0)
    assert conn.execute("SELECT sent_today FROM edm.services").fetchone() == (2,)
    assert counters_match(conn) == []


def test_renewal_keeps_live_leases_only(sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a")
    make_service(sched, "svc", interval=0, users=["a"])
    make_task(sched, "a", 2)
    ids = [r["subtask_id"] for r in claim2(conn, at(0), per_service=2, lease=10)]
    renewed = conn.execute("SELECT subtask_id, lease_expires_at FROM edm.renew_leases("
                           "'d1', %s, 10, %s)", (ids, at(8))).fetchall()
    assert sorted(renewed) == [(i, at(18)) for i in sorted(ids)]
    assert conn.execute("SELECT * FROM edm.renew_leases('other', %s, 10, %s)",
                        (ids, at(9))).fetchall() == []  # fenced: not its leases
    assert conn.execute("SELECT * FROM edm.renew_leases('d1', %s, 10, %s)",
                        (ids, at(18.5))).fetchall() == []  # expired: never revived


@pytest.mark.slow  # 25 generated runs; test_rate_limit_with_burst_is_a_token_bucket is fast
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(gaps=st.lists(st.integers(min_value=0, max_value=400), min_size=5, max_size=40),
       rate=st.integers(min_value=1, max_value=8), burst=st.integers(min_value=1, max_value=4),
       per=st.integers(min_value=1, max_value=5))
def test_rate_limit_property(dsn: str, gaps: list[int], rate: int, burst: int, per: int) -> None:
    """Whatever the claim times, the slots conform to the GCRA of the limit (I2)."""
    burst = min(burst, rate)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE edm.services, edm.users, edm.tasks, edm.subtasks CASCADE")
        with Scheduler(dsn) as s:
            s.upsert_user("a")
            sid = make_service(s, f"p{rate}{burst}{per}", interval=0, users=["a"])
            set_limits(conn, sid, [{"name": "r", "kind": "rate", "max_count": rate,
                                    "window_ms": 1000, "burst": burst}])
            make_task(s, "a", 400)
        t = 0.0
        slots: list[float] = []
        for g in gaps:
            t += g / 1000
            slots += [(r["send_at"] - at(0)).total_seconds()
                      for r in claim2(conn, at(t), per_service=per, lookahead_ms=100)]
    # GCRA conformance: emission interval T, tolerance (burst - 1) T
    period, tau, tat = 1.0 / rate, (burst - 1) / rate, float("-inf")
    for s_ in sorted(slots):
        assert s_ >= tat - tau - 1e-5, (slots, s_, tat)  # timestamps are microseconds
        tat = max(tat, s_) + period


def test_create_service_with_limits_is_all_or_nothing(sched: Scheduler,
                                                      conn: psycopg.Connection[Any]) -> None:
    from edm_sched import errors

    spec = {"name": "ses", "from_addresses": ["n@ses.example"], "interval_seconds": 0,
            "daily_quota": 50_000, "transport": "null",
            "limits": [{"name": "max_send_rate", "kind": "rate", "max_count": 14,
                        "window_seconds": 1, "burst": 14},
                       {"name": "max_24_hour_send", "kind": "rolling", "max_count": 50_000,
                        "window_seconds": 86_400}]}
    sid = sched.create_service(spec)
    names = [lim.limit_name for lim in sched.service_limits(sid)]
    assert names == ["daily_quota", "max_24_hour_send", "max_send_rate"]
    bad = {**spec, "name": "ses2", "limits": [{"name": "r", "kind": "rate", "max_count": 2,
                                                "window_seconds": 1, "burst": 3}]}
    with pytest.raises(errors.InvalidInput, match="burst"):
        sched.create_service(bad)
    assert conn.execute("SELECT count(*) FROM edm.services WHERE name = 'ses2'").fetchone() == (0,)
    with pytest.raises(errors.NotFound):
        sched.service_limits(999_999)


def test_wait_reason_names_the_binding_limit(sched: Scheduler,
                                             conn: psycopg.Connection[Any]) -> None:
    conn.execute("INSERT INTO edm.dispatchers (dispatcher_id, heartbeat_at) VALUES ('d1', %s)",
                 (at(0),))
    sched.upsert_user("a")
    sid = make_service(sched, "m365", interval=0, users=["a"])
    set_limits(conn, sid, [{"name": "per_minute", "kind": "rate", "max_count": 2,
                            "window_ms": 60_000}])
    task = make_task(sched, "a", 5)
    assert len(claim2(conn, at(0), per_service=5)) == 1
    reason, until = conn.execute("SELECT reason, until FROM edm.task_wait_reason(%s, %s)",
                                 (task, at(1))).fetchone() or (None, None)
    assert reason == ("all granted services throttled: first to free is m365, "
                      "held by its per_minute limit")
    assert until == at(30)


def test_report_pace_moves_the_holders_next_slot_later_only(
        sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a")
    sid = make_service(sched, "svc", interval=1, users=["a"])
    make_task(sched, "a", 10)
    assert [r["send_at"] for r in claim2(conn, at(0), owner="d1")] == [at(0)]
    moved = conn.execute("SELECT edm.report_pace('d2', %s, %s)", ([sid], [at(5)])).fetchone()
    assert moved == (0,)  # not d2's service
    conn.execute("SELECT edm.report_pace('d1', %s, %s)", ([sid], [at(0.5)]))  # earlier: no-op
    assert claim2(conn, at(0.9), owner="d1", lookahead_ms=100)[0]["send_at"] == at(1)
    conn.execute("SELECT edm.report_pace('d1', %s, %s)", ([sid], [at(2.4)]))
    assert claim2(conn, at(2), owner="d1", lookahead_ms=100) == []  # next slot is 2.4 now
    assert claim2(conn, at(2.3), owner="d1", lookahead_ms=100)[0]["send_at"] == at(2.4)


def test_report_pace_moves_a_rate_limits_bucket_so_slots_follow_the_wire(
        sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    """A lane whose starts reached the provider late reports its next possible start:
    the rate limit's next slot moves there, and the slots after it keep the limit's
    spacing from there (no burst saved up while the lane was late)."""
    sched.upsert_user("a")
    sid = make_service(sched, "rate", interval=0, users=["a"])
    make_task(sched, "a", 20)
    set_limits(conn, sid, [{"name": "per_second", "kind": "rate", "max_count": 10,
                            "window_ms": 1000, "burst": 2}])
    first = [r["send_at"] for r in claim2(conn, at(0), owner="d1", per_service=10,
                                          lookahead_ms=250)]
    # the idle lead (100 ms), the burst of 2, then one per 100 ms, within the 250 ms
    assert first == [at(0.1), at(0.1), at(0.2)]
    conn.execute("SELECT edm.report_pace('d1', %s, %s)", ([sid], [at(0.5)]))
    later = [r["send_at"] for r in claim2(conn, at(0.3), owner="d1", per_service=10,
                                          lookahead_ms=300)]
    # unreported, the bucket would admit 0.3, 0.4, 0.5 and 0.6
    assert later == [at(0.5), at(0.6)]


def test_limit_names_are_unique_per_service(sched: Scheduler) -> None:
    from edm_sched import errors

    sid = make_service(sched, "dup", interval=0)
    limit = {"name": "r", "kind": "rate", "max_count": 1, "window_seconds": 1}
    with pytest.raises(errors.InvalidInput, match="unique"):
        sched.set_service_limits(sid, [limit, limit])
    assert [lim.limit_name for lim in sched.service_limits(sid)] == ["daily_quota"]
