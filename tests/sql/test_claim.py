"""The claim and completion functions, driven with a controlled clock."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from edm_sched.api import Scheduler
from tests.support.helpers import at, claim, complete, counters_match, make_service, make_task


@pytest.fixture
def sched(dsn: str) -> Iterator[Scheduler]:
    with Scheduler(dsn) as s:
        yield s


def test_interval_and_lease(sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("alice")
    make_service(sched, "svc", interval=10, users=["alice"])
    task = make_task(sched, "alice", 3)
    first = claim(conn, at(0))
    assert len(first) == 1 and first[0]["task_id"] == task and first[0]["attempt"] == 1
    assert claim(conn, at(9.999)) == []  # interval not elapsed (I2)
    second = claim(conn, at(10))
    assert len(second) == 1 and second[0]["subtask_id"] > first[0]["subtask_id"]
    assert complete(conn, at(11), [first[0]["subtask_id"]])[0][1:3] == (True, "sent")
    st = sched.get_task(task)
    assert (st.status, st.sent_count, st.leased_count, st.pending_count) == ("sending", 1, 1, 1)
    assert counters_match(conn) == []


def test_batch_takes_one_subtask_per_ready_service(sched: Scheduler,
                                                   conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("alice")
    services = [make_service(sched, f"s{i}", users=["alice"]) for i in range(5)]
    make_task(sched, "alice", 100)
    rows = claim(conn, at(0), batch=50)
    assert sorted(r["service_id"] for r in rows) == sorted(services)


def test_users_alternate_and_newcomer_is_served_next(sched: Scheduler,
                                                     conn: psycopg.Connection[Any]) -> None:
    for u in ("a", "b", "c"):
        sched.upsert_user(u)
    make_service(sched, "svc", interval=1, users=["a", "b", "c"])
    make_task(sched, "a", 200)
    make_task(sched, "b", 200)
    order = [claim(conn, at(i))[0]["user_id"] for i in range(6)]
    assert order in (["a", "b"] * 3, ["b", "a"] * 3)
    make_task(sched, "c", 1)  # arrives with one email behind two backlogs
    assert claim(conn, at(6))[0]["user_id"] == "c"


def test_tasks_of_a_user_rotate_with_priority(sched: Scheduler,
                                              conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a")
    make_service(sched, "svc", interval=1, users=["a"])
    t1 = make_task(sched, "a", 10, name="one")
    t2 = make_task(sched, "a", 10, name="two")
    order = [claim(conn, at(i))[0]["task_id"] for i in range(4)]
    assert sorted(order[:2]) == [t1, t2] and order[2:] == order[:2]
    hi = make_task(sched, "a", 2, name="urgent", priority=10)
    assert [claim(conn, at(10 + i))[0]["task_id"] for i in range(3)] == [hi, hi, order[0]]


def test_daily_quota_holds_until_local_midnight(sched: Scheduler,
                                                conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a")
    make_service(sched, "svc", interval=0, quota=2, users=["a"], tz="Asia/Tokyo")
    make_task(sched, "a", 10)
    assert len(claim(conn, at(0))) == 1
    assert len(claim(conn, at(1))) == 1
    assert claim(conn, at(2)) == []  # quota used up (I3)
    # T0 is 21:00 in Tokyo: the quota day turns at 15:00 UTC.
    assert claim(conn, at(3 * 3600 - 1)) == []
    assert len(claim(conn, at(3 * 3600))) == 1


def test_grants_confine_claims_to_granted_services(sched: Scheduler,
                                                   conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a")
    sched.upsert_user("b")
    sa = make_service(sched, "sa", users=["a"])
    make_service(sched, "sb", users=["b"])
    make_task(sched, "a", 5)
    rows = claim(conn, at(0))
    assert [(r["user_id"], r["service_id"]) for r in rows] == [("a", sa)]


def test_grant_priority_tiers(sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a")
    main = make_service(sched, "main", interval=10, users=["a"], priority=10)
    spare = make_service(sched, "spare", interval=10, users=["a"], priority=0)
    make_task(sched, "a", 10)
    assert [r["service_id"] for r in claim(conn, at(0), batch=1)] == [main]
    # main is now waiting for its interval: the overflow service takes over
    assert [r["service_id"] for r in claim(conn, at(1), batch=1)] == [spare]


def test_completion_is_fenced_by_the_lease(sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a")
    make_service(sched, "svc", users=["a"])
    make_task(sched, "a", 3)
    sid = claim(conn, at(0), lease=30)[0]["subtask_id"]
    assert complete(conn, at(1), [sid], owner="intruder")[0][1] is False
    late = complete(conn, at(31), [sid])[0]
    assert late[1] is False and "lease expired" in late[3]
    assert conn.execute(
        "SELECT count(*) FROM edm.send_events WHERE kind = 'late_completion'").fetchone() == (2,)
    assert complete(conn, at(1), [10**12])[0][1:] == (False, None, "unknown subtask")
    assert counters_match(conn) == []


def test_outcomes(sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a")
    svc = make_service(sched, "svc", interval=0, users=["a"])
    task = make_task(sched, "a", 4)
    ids = [r["subtask_id"] for r in claim(conn, at(0), batch=1)]
    assert complete(conn, at(1), ids, "transient", code=451)[0][2] == "pending"
    assert claim(conn, at(2)) != []  # another recipient; the retry waits for its back-off
    ids = [r["subtask_id"] for r in claim(conn, at(3))]
    assert complete(conn, at(3), ids, "permanent", code=550)[0][2] == "failed"
    assert conn.execute("SELECT count(*) FROM edm.suppressions").fetchone() == (1,)
    ids = [r["subtask_id"] for r in claim(conn, at(4))]
    assert complete(conn, at(4), ids, "service", code=421)[0][2] == "pending"
    health, backoff = conn.execute(
        "SELECT health, backoff_until FROM edm.services WHERE service_id = %s", (svc,)).fetchone()
    assert health == "backoff" and backoff == at(4 + 30)
    assert claim(conn, at(33)) == []
    attempts = conn.execute("SELECT attempts FROM edm.subtasks WHERE subtask_id = %s",
                            (ids[0],)).fetchone()
    assert attempts == (0,)  # a service-level failure does not use an attempt
    assert counters_match(conn) == []
    assert sched.get_task(task).failed_count == 1


def test_expired_leases_return_and_are_counted(sched: Scheduler,
                                               conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a")
    make_service(sched, "svc", interval=0, users=["a"])
    make_task(sched, "a", 2)
    sid = claim(conn, at(0), lease=30)[0]["subtask_id"]
    assert conn.execute("SELECT edm.expire_leases(%s)", (at(29),)).fetchone() == (0,)
    assert conn.execute("SELECT edm.expire_leases(%s)", (at(30),)).fetchone() == (1,)
    row = conn.execute("SELECT status, lease_expiries FROM edm.subtasks WHERE subtask_id = %s",
                       (sid,)).fetchone()
    assert row == ("pending", 1)
    again = claim(conn, at(31), owner="d2")
    assert sid in [r["subtask_id"] for r in again]
    assert counters_match(conn) == []


def test_pause_resume_cancel(sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a", quota_limit=100)
    make_service(sched, "svc", interval=0, users=["a"])
    task = make_task(sched, "a", 10)
    first = claim(conn, at(0))
    sched.pause_task(task)
    assert claim(conn, at(1)) == []  # I6: pause stops claims at once
    assert complete(conn, at(1), [first[0]["subtask_id"]])[0][1] is True  # in-flight completes
    assert sched.resume_task(task) == "sending"
    nxt = claim(conn, at(2))
    assert nxt[0]["subtask_id"] == first[0]["subtask_id"] + 1  # continues where it stopped
    assert sched.get_user("a").quota_used == 10
    assert sched.cancel_task(task) == 8
    assert sched.get_user("a").quota_used == 2  # 8 unsent refunded
    assert complete(conn, at(3), [nxt[0]["subtask_id"]], "transient")[0][2] == "cancelled"
    st = sched.get_task(task)
    assert (st.status, st.sent_count, st.cancelled_count) == ("cancelled", 1, 9)
    assert counters_match(conn) == []


def test_task_completes_when_nothing_left(sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a")
    make_service(sched, "svc", interval=0, users=["a"])
    task = make_task(sched, "a", 2)
    ids = [r["subtask_id"] for when in (0, 1) for r in claim(conn, at(when))]
    complete(conn, at(2), ids)
    assert sched.get_task(task).status == "completed"


def test_bad_claim_arguments_are_typed(conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.Error) as info:
        claim(conn, at(0), batch=0)
    assert info.value.sqlstate == "ED005"
