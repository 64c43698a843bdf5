"""0027: a claim does not work through ready services that have nothing to give.

A service is ready whatever its grantees have left to send. Late in a drain the
services whose users have sent everything rank first (least quota used), and a
claim used to lock each of them and search it for a slot before it reached a
service with work. Now:

* the second ranking (all the services the first list did not cover),
  visited a chunk at a time, leaves out services none of whose grantees has
  claimable work, so they are never locked (here the service with work is in
  the third chunk);
* nothing is remembered between calls: a service is served again as soon as
  one of its grantees has work.
"""

from __future__ import annotations

from typing import Any

import psycopg

from edm_sched.api import Scheduler
from tests.support.helpers import T0, at, claim_v2, make_service, make_task


def _unlocked(conn: psycopg.Connection[Any], ids: list[int]) -> list[int]:
    """The services among ``ids`` that no transaction holds locked."""
    return sorted(r[0] for r in conn.execute(
        "SELECT service_id FROM edm.services WHERE service_id = ANY (%s)"
        " FOR UPDATE SKIP LOCKED", (ids,)))


def test_services_without_work_past_the_first_list_are_not_locked(
        dsn: str, conn: psycopg.Connection[Any]) -> None:
    batch = 2
    listed = 2 * batch + 8  # the first list's length
    with Scheduler(dsn) as s:
        for u in ("busy", "drained", "paused"):
            s.upsert_user(u)
        # services whose grantees have no claimable work rank first (equal quota
        # share and success rate: by id): one user without tasks, one whose task
        # is paused, and a pool of both
        idle = [make_service(s, f"idle{i}", interval=0, users=[("drained", "paused")[i % 2]])
                for i in range(3 * listed + 6)]
        idle.append(make_service(s, "idle_pool", interval=0, users=["drained", "paused"]))
        sid = make_service(s, "last", interval=0, users=["busy", "drained"])
        make_task(s, "busy", 5)
        paused = make_task(s, "paused", 5)
        s.pause_task(paused)
    conn.execute("SELECT edm.start_due_tasks(%s)", (T0,))
    with psycopg.connect(dsn) as claimer:  # the claim's transaction stays open
        rows = claim_v2(claimer, at(1), batch=batch, per_service=1)
        assert [r["service_id"] for r in rows] == [sid]
        past = idle[listed:]
        assert _unlocked(conn, past) == past
        claimer.rollback()


def test_a_service_is_served_again_once_a_grantee_has_work(
        dsn: str, conn: psycopg.Connection[Any]) -> None:
    with Scheduler(dsn) as s:
        for u in ("busy", "late"):
            s.upsert_user(u)
        idle = [make_service(s, f"idle{i}", interval=0, users=["late"]) for i in range(30)]
        sid = make_service(s, "busy_svc", interval=0, users=["busy"])
        make_task(s, "busy", 50)
    conn.execute("SELECT edm.start_due_tasks(%s)", (T0,))
    first = claim_v2(conn, at(1), batch=1, per_service=1)
    assert [r["service_id"] for r in first] == [sid]
    with Scheduler(dsn) as s:
        make_task(s, "late", 3, name="late")
    conn.execute("SELECT edm.start_due_tasks(%s)", (T0,))
    # the late user's services rank first again (less quota used than busy_svc)
    rows = claim_v2(conn, at(2), batch=3, per_service=1)
    assert {r["user_id"] for r in rows} == {"late"}
    assert {r["service_id"] for r in rows} <= set(idle)
