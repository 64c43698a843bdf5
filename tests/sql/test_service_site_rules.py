"""0025: the claim reads a service's own site rules only where it has some, and
skips a service whose small pool has no work outside its suspended sites.

* ``services.site_rules_until`` follows every way a service's site rules
  change: a suspension set by hand, extended, lifted, cascaded away with its
  site, set by a reply rule inside ``edm.complete``; (service, site) limits set
  and cleared.
* ``edm.task_sendable_outside`` never answers false where a due recipient
  outside the skipped domains exists (random layouts against a plain query),
  and answers false where none does as long as the task has few domains.
* A service whose users' work is all at its suspended site claims nothing and
  leaves that work alone; the same users' work elsewhere still goes through
  their other services, and through this service once the suspension ends.
  (That every such shortcut decides like the claim of 0016 is the property
  of tests/sql/test_shaped_claim_equivalence.py.)
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edm_sched.api import Scheduler
from tests.support.helpers import T0, TEMPLATE, at, claim_v2, complete, make_service

# loose: never binding here (a burst tolerance of minutes)
LIMITS = json.dumps([{"name": "l", "kind": "rate", "max_count": 1_000_000,
                      "window_ms": 3_600_000, "burst": 100_000}])


def rules_until(conn: psycopg.Connection[Any], sid: int) -> Any:
    row = conn.execute("SELECT nullif(site_rules_until, 'infinity'), site_rules_until = 'infinity'"
                       " FROM edm.services WHERE service_id = %s", (sid,)).fetchone()
    assert row is not None
    return "infinity" if row[1] else row[0]


def test_site_rules_until_follows_suspensions_and_limits(
        dsn: str, conn: psycopg.Connection[Any]) -> None:
    with Scheduler(dsn) as s:
        sid = make_service(s, "svc", interval=0)
        other = make_service(s, "other", interval=0)
        assert rules_until(conn, sid) is None
        conn.execute("SELECT edm.suspend_site(%s, 'google', %s, 'test')", (sid, at(60)))
        assert rules_until(conn, sid) == at(60)
        conn.execute("SELECT edm.suspend_site(%s, 'yahoo', %s, 'test')", (sid, at(30)))
        assert rules_until(conn, sid) == at(60)          # the latest end
        conn.execute("SELECT edm.suspend_site(%s, 'google', %s, 'test')", (sid, at(10)))
        assert rules_until(conn, sid) == at(30)          # shortened
        conn.execute("SELECT edm.lift_site_suspension(%s, 'yahoo', %s)", (sid, at(0)))
        assert rules_until(conn, sid) == at(10)
        conn.execute("SELECT edm.set_site_limits('apple', %s, %s)", (LIMITS, sid))
        assert rules_until(conn, sid) == "infinity"
        conn.execute("SELECT edm.set_site_limits('apple', '[]', %s)", (sid,))
        assert rules_until(conn, sid) == at(10)
        # a site-wide limit is not the service's own
        conn.execute("SELECT edm.set_site_limits('apple', %s)", (LIMITS,))
        assert rules_until(conn, sid) == at(10)
        # a site deleted takes its suspensions along
        conn.execute("SELECT edm.set_site_domains('gone', ARRAY['gone.example'], 'Gone')")
        conn.execute("SELECT edm.suspend_site(%s, 'gone', %s, 'test')", (sid, at(99)))
        assert rules_until(conn, sid) == at(99)
        conn.execute("DELETE FROM edm.sites WHERE site = 'gone'")
        assert rules_until(conn, sid) == at(10)
        assert rules_until(conn, other) is None


def test_a_reply_rule_suspension_sets_site_rules_until(
        dsn: str, conn: psycopg.Connection[Any]) -> None:
    with Scheduler(dsn) as s:
        s.upsert_user("a")
        sid = make_service(s, "svc", interval=0, users=["a"])
        s.create_task({"user_id": "a", "name": "t", "templates": [TEMPLATE],
                       "scheduled_at": T0,
                       "recipients": [{"email": "x@outlook.com"}]})
    ids = [r["subtask_id"] for r in claim_v2(conn, at(0), batch=1)]
    assert len(ids) == 1
    conn.execute(
        "SELECT * FROM edm.complete('d1', %s, ARRAY['transient'], ARRAY[451],"
        " ARRAY['4.7.650 The mail server has been temporarily rate limited'], NULL, NULL, %s)",
        (ids, at(1)))
    until = conn.execute("SELECT until FROM edm.site_suspensions WHERE service_id = %s"
                         " AND site = 'microsoft'", (sid,)).fetchone()
    assert until is not None, "the shipped Microsoft rule did not suspend the pair"
    assert rules_until(conn, sid) == until[0]


# ---------------------------------------------------------------------------
# edm.task_sendable_outside
# ---------------------------------------------------------------------------

SITES = ["a.example", "b.example", "c.example", "d.example", "e.example"]


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(layout=st.lists(st.tuples(st.sampled_from(SITES), st.sampled_from(["fresh", "due",
                                                                          "later", "sent"])),
                       min_size=0, max_size=30),
       skip=st.sets(st.sampled_from([*SITES, "x.example"])))
def test_task_sendable_outside_is_the_plain_answer(
        dsn: str, layout: list[tuple[str, str]], skip: set[str]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn, Scheduler(dsn) as s:
        conn.execute("TRUNCATE edm.users, edm.tasks, edm.subtasks CASCADE")
        s.upsert_user("a")
        tid = s.create_task({"user_id": "a", "name": "t", "templates": [TEMPLATE],
                             "scheduled_at": T0,
                             "recipients": [{"email": f"r{i}@{d}"}
                                            for i, (d, _) in enumerate(layout)]
                             or [{"email": "only@z.example"}]}).task_id
        if not layout:
            conn.execute("UPDATE edm.subtasks SET status = 'sent', finished_at = now()"
                         " WHERE task_id = %s", (tid,))
        for i, (_, state) in enumerate(layout):
            change = {"due": "not_before = %(t0)s", "later": "not_before = %(later)s",
                      "sent": "status = 'sent', finished_at = now()"}.get(state)
            if change:
                conn.execute(f"UPDATE edm.subtasks SET {change} WHERE task_id = %(tid)s"
                             " AND email = %(email)s",
                             {"t0": T0, "later": at(3600), "tid": tid,
                              "email": f"r{i}@{layout[i][0]}"})
        plain = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM edm.subtasks WHERE task_id = %s AND status = 'pending'"
            " AND not_before <= %s AND domain <> ALL (%s))", (tid, at(0), sorted(skip))
        ).fetchone()
        got = conn.execute("SELECT edm.task_sendable_outside(%s, %s, %s)",
                           (tid, at(0), sorted(skip))).fetchone()
        assert plain is not None and got is not None
        assert got[0] == plain[0]   # (five domains: well under the function's 32)


def test_task_sendable_outside_says_yes_past_32_domains(
        dsn: str, conn: psycopg.Connection[Any]) -> None:
    with Scheduler(dsn) as s:
        s.upsert_user("a")
        tid = s.create_task({"user_id": "a", "name": "t", "templates": [TEMPLATE],
                             "scheduled_at": T0,
                             "recipients": [{"email": f"r@d{i:02}.example"}
                                            for i in range(40)]}).task_id
    skip = [f"d{i:02}.example" for i in range(40)]
    # every domain skipped: past 32 the function stops looking (never a wrong "no")
    got = conn.execute("SELECT edm.task_sendable_outside(%s, %s, %s)",
                       (tid, at(0), skip)).fetchone()
    assert got == (True,)
    got = conn.execute("SELECT edm.task_sendable_outside(%s, %s, %s)",
                       (tid, at(0), skip[:20])).fetchone()
    assert got == (True,)


# ---------------------------------------------------------------------------
# A service with nothing outside its suspended sites
# ---------------------------------------------------------------------------

def claim16(conn: psycopg.Connection[Any], now: dt.datetime) -> list[dict[str, Any]]:
    return claim_v2(conn, now, per_service=16)


@pytest.mark.parametrize("tasks", [1, 2])
def test_a_service_with_only_suspended_work_gives_nothing_and_resumes(
        dsn: str, conn: psycopg.Connection[Any], tasks: int) -> None:
    with Scheduler(dsn) as s:
        s.upsert_user("a")
        dedicated = make_service(s, "dedicated", interval=0, users=["a"])
        for k in range(tasks):
            s.create_task({"user_id": "a", "name": f"t{k}", "templates": [TEMPLATE],
                           "scheduled_at": T0,
                           "recipients": [{"email": f"r{k}-{i}@outlook.com"}
                                          for i in range(3)]})
    conn.execute("SELECT edm.suspend_site(%s, 'microsoft', %s, 'test')", (dedicated, at(60)))
    assert claim16(conn, at(0)) == []
    assert claim16(conn, at(30)) == []
    # the suspension ends: the same work goes
    got = claim16(conn, at(61))
    assert len(got) == 3 * tasks and {r["service_id"] for r in got} == {dedicated}
    complete(conn, at(62), [r["subtask_id"] for r in got])


def test_work_elsewhere_of_a_suspended_services_user_still_goes(
        dsn: str, conn: psycopg.Connection[Any]) -> None:
    with Scheduler(dsn) as s:
        for u in ("a", "b"):
            s.upsert_user(u)
        svc = make_service(s, "svc", interval=0, users=["a", "b"])
        s.create_task({"user_id": "a", "name": "ms", "templates": [TEMPLATE],
                       "scheduled_at": T0,
                       "recipients": [{"email": f"a{i}@outlook.com"} for i in range(3)]})
        s.create_task({"user_id": "b", "name": "mixed", "templates": [TEMPLATE],
                       "scheduled_at": T0,
                       "recipients": [{"email": f"b{i}@outlook.com"} for i in range(3)]
                       + [{"email": "b@gmail.com"}]})
    conn.execute("SELECT edm.suspend_site(%s, 'microsoft', %s, 'test')", (svc, at(60)))
    assert [r["email"] for r in claim16(conn, at(0))] == ["b@gmail.com"]
    assert claim16(conn, at(1)) == []
    conn.execute("SELECT edm.set_site_limits('microsoft', %s, %s)", (LIMITS, svc))
    assert claim16(conn, at(2)) == []      # still suspended, now with an own limit too
    assert len(claim16(conn, at(61))) == 6
