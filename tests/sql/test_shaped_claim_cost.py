"""0022: a blocked site's recipients skipped by domain, limits that keep their
count when their maximum changes, and the reply-rule log trimmed by the sweeps.

* ``edm.claim_next_subtask`` finds a task's next recipient outside some
  domains by probing the first 64 and then jumping from domain to domain: on
  random layouts (runs of one domain longer than the probe, retries due and
  not yet due, excluded ids) it must return what the plain walk returns.
* A claim on a task whose first recipients are all at a suspended site gets
  the first recipient elsewhere, and a site mapping added after the task was
  created applies to its queued recipients (the site is read at the claim).
* ``edm.set_service_limits`` and the shaping setters change a limit whose
  max_count alone changes in place: the sends it counted still count.
* ``edm.run_sweeps`` trims ``edm.shaping_actions`` after
  ``retention.shaping_action_days``.
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


def task(s: Scheduler, user: str, emails: list[str], name: str = "t") -> int:
    return s.create_task({"user_id": user, "name": name, "templates": [TEMPLATE],
                          "scheduled_at": T0,
                          "recipients": [{"email": e} for e in emails]}).task_id


# ---------------------------------------------------------------------------
# Skipping a blocked site's recipients
# ---------------------------------------------------------------------------

layout_st = st.lists(st.tuples(st.sampled_from(["a.example", "b.example", "c.example",
                                                "d.example"]),
                               st.integers(1, 90)),            # a run of one domain
                     min_size=1, max_size=6)


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(layout=layout_st,
       skip=st.sets(st.sampled_from(["a.example", "b.example", "c.example", "x.example"])),
       retry_every=st.sampled_from([0, 7, 50]), exclude_every=st.sampled_from([0, 5]),
       now_s=st.sampled_from([0, 100, 10_000]))
def test_next_subtask_outside_domains_is_the_walks_answer(
        dsn: str, layout: list[tuple[str, int]], skip: set[str], retry_every: int,
        exclude_every: int, now_s: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn, Scheduler(dsn) as s:
        conn.execute("TRUNCATE edm.services, edm.users, edm.tasks, edm.subtasks CASCADE")
        s.upsert_user("a")
        emails = [f"r{k}-{i}@{d}" for k, (d, n) in enumerate(layout) for i in range(n)]
        tid = task(s, "a", emails)
        ids = [r[0] for r in conn.execute(
            "SELECT subtask_id FROM edm.subtasks WHERE task_id = %s ORDER BY subtask_id", (tid,))]
        if retry_every:
            # every n-th a retry, due at 1 s, 2 s, ... after T0
            conn.execute("UPDATE edm.subtasks SET not_before = %s + (subtask_id %% 5) * interval"
                         " '40 seconds' WHERE task_id = %s AND subtask_id %% %s = 0",
                         (T0, tid, retry_every))
        exclude = ids[::exclude_every] if exclude_every else []
        now = at(now_s)
        walk = """
            SELECT st.subtask_id FROM edm.subtasks st
            WHERE st.task_id = %(t)s AND st.status = 'pending' AND {range}
              AND st.subtask_id <> ALL (%(x)s) AND st.domain <> ALL (%(d)s)
            ORDER BY st.not_before, st.subtask_id LIMIT 1"""
        args = {"t": tid, "x": exclude, "d": sorted(skip), "now": now}
        want = conn.execute(walk.format(
            range="st.not_before > '-infinity' AND st.not_before <= %(now)s"), args).fetchone()
        if want is None:
            want = conn.execute(walk.format(range="st.not_before = '-infinity'"),
                                args).fetchone()
        got = conn.execute("SELECT subtask_id FROM edm.claim_next_subtask(%s, %s, %s, %s)",
                           (tid, now, exclude, sorted(skip))).fetchone()
        assert got == (want[0] if want else None,)


def test_a_suspended_sites_run_is_skipped_and_a_later_mapping_applies(
        dsn: str, conn: psycopg.Connection[Any]) -> None:
    with Scheduler(dsn) as s:
        s.upsert_user("a")
        sid = make_service(s, "svc", interval=0, users=["a"])
        emails = ([f"g{i}@gmail.com" for i in range(300)] + ["y0@yahoo.com"]
                  + [f"n{i}@newmail.example" for i in range(300)] + ["y1@yahoo.com"])
        task(s, "a", emails)
    conn.execute("SELECT edm.suspend_site(%s, 'google', %s, 'test')", (sid, at(3600)))
    rows = claim_v2(conn, at(0), per_service=2)
    assert [r["email"] for r in rows] == ["y0@yahoo.com", "n0@newmail.example"]
    # a mapping added after the task was created applies to its queued recipients
    conn.execute("SELECT edm.set_site_domains('newmail', ARRAY['newmail.example'], 'New Mail')")
    conn.execute("SELECT edm.suspend_site(%s, 'newmail', %s, 'test')", (sid, at(3600)))
    complete(conn, at(1), [r["subtask_id"] for r in rows])
    assert [r["email"] for r in claim_v2(conn, at(2), per_service=2)] == ["y1@yahoo.com"]


# ---------------------------------------------------------------------------
# A limit whose maximum changes keeps its count
# ---------------------------------------------------------------------------

COUNTED = {
    "calendar_day": {"kind": "calendar_day", "time_zone": "UTC"},
    "rolling": {"kind": "rolling", "window_ms": 3_600_000},
}


@pytest.mark.slow
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(sorted(COUNTED)), first=st.integers(1, 6), before=st.integers(1, 8),
       after=st.integers(0, 8), layer=st.sampled_from(["service", "user"]))
def test_changing_a_limits_maximum_keeps_its_count(
        dsn: str, kind: str, first: int, before: int, after: int, layer: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn, Scheduler(dsn) as s:
        conn.execute("TRUNCATE edm.services, edm.users, edm.tasks, edm.subtasks,"
                     " edm.shaping_limits CASCADE")
        s.upsert_user("a")
        sid = make_service(s, "svc", interval=0, users=["a"])
        task(s, "a", [f"r{i}@x.example" for i in range(20)])

        def set_max(n: int) -> None:
            lim = [{"name": "cap", "max_count": n, **COUNTED[kind]}]
            if layer == "service":
                conn.execute("SELECT edm.set_service_limits(%s, %s)", (sid, json.dumps(lim)))
            else:
                conn.execute("SELECT edm.set_user_limits('a', %s)", (json.dumps(lim),))

        set_max(before)
        sent = len(claim_v2(conn, at(0), per_service=first, batch=first))
        assert sent == min(first, before)
        set_max(after)  # mid-window: the sends above still count
        more = len(claim_v2(conn, at(60), per_service=20, batch=20))
        assert more == max(0, after - sent)


def test_changing_a_rate_limits_maximum_keeps_its_arrival_time(
        dsn: str, conn: psycopg.Connection[Any]) -> None:
    with Scheduler(dsn) as s:
        s.upsert_user("a")
        sid = make_service(s, "svc", interval=0, users=["a"])
        task(s, "a", [f"r{i}@x.example" for i in range(20)])
    rate = {"name": "per_min", "kind": "rate", "window_ms": 60_000, "burst": 1}
    conn.execute("SELECT edm.set_service_limits(%s, %s)",
                 (sid, json.dumps([{**rate, "max_count": 1}])))
    assert len(claim_v2(conn, at(0), per_service=5)) == 1
    tat = "SELECT tat FROM edm.service_limits WHERE service_id = %s"
    before = conn.execute(tat, (sid,)).fetchone()
    conn.execute("SELECT edm.set_service_limits(%s, %s)",
                 (sid, json.dumps([{**rate, "max_count": 2}])))
    assert conn.execute(tat, (sid,)).fetchone() == before  # no fresh burst
    assert claim_v2(conn, at(1), per_service=5) == []
    # a change of shape (the window) still starts the limit afresh
    conn.execute("SELECT edm.set_service_limits(%s, %s)",
                 (sid, json.dumps([{**rate, "max_count": 2, "window_ms": 30_000}])))
    assert conn.execute(tat, (sid,)).fetchone() == (None,)


# ---------------------------------------------------------------------------
# The sweeps trim the reply-rule log
# ---------------------------------------------------------------------------

def test_sweeps_trim_ended_shaping_actions_past_retention(
        dsn: str, conn: psycopg.Connection[Any]) -> None:
    with Scheduler(dsn) as s:
        sid = make_service(s, "svc", interval=0)
    rule = conn.execute("SELECT rule_id FROM edm.reply_rules ORDER BY rule_id LIMIT 1").fetchone()
    assert rule is not None
    now = at(0)
    conn.execute("SELECT edm.config_set('retention.shaping_action_days', '10'::jsonb)")
    rows = [("old, ended", now - dt.timedelta(days=11), now - dt.timedelta(days=10)),
            ("old, still running", now - dt.timedelta(days=11), now + dt.timedelta(days=1)),
            ("recent", now - dt.timedelta(days=9), now - dt.timedelta(days=9))]
    for detail, when, until in rows:
        conn.execute(
            "INSERT INTO edm.shaping_actions (at, rule_id, rule_name, service_id, action, until,"
            " reply) VALUES (%s, %s, 'test', %s, 'suspend_site', %s, %s)",
            (when, rule[0], sid, until, detail))
    report = conn.execute("SELECT edm.run_sweeps(%s)", (now,)).fetchone()
    assert report is not None and report[0]["shaping_actions_trimmed"] == 1, report
    left = {r[0] for r in conn.execute("SELECT reply FROM edm.shaping_actions")}
    assert left == {"old, still running", "recent"}
