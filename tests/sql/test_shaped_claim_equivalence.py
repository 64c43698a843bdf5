"""The shaped claim of 0022 makes the same decisions as the one of 0016.

0022 made ``edm.claim_v2`` cheaper where shaping is in use: the batched fill
(0014) now serves shaped services and checks every layer at each of its
slots, a recipient's site comes from its stored domain, and a blocked site's
recipients are skipped by domain (``edm.claim_next_subtask``). None of this
may change a decision. The claim of 0016, installed from that migration's own
text as ``edm_ref.claim_v2``, is the oracle: on hypothesis-generated worlds
(two users with one to three tasks each, recipients at three sites and an
unmapped domain, services with and without an interval, any mix of global,
site, (service, site), user and task limits, a suspended (service, site)
pair, a transactional task) both are driven through the same sequence of
claims and completions with a controlled clock, and must hand out the same
subtasks, on the same services, to the same users and tasks, at the same
slots, call by call.

Each example runs the sequence twice inside one transaction, rolled back to a
savepoint in between: both runs start from the same rows.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edm_sched.api import Scheduler
from tests.support.claim_worlds import reference_function_sql, replay_on_both, shaping_limit_st
from tests.support.helpers import T0, TEMPLATE, at, complete, make_service

pytestmark = pytest.mark.slow

DOMAINS = ("gmail.com", "yahoo.com", "outlook.com", "x.example")


limit_st = shaping_limit_st(max_burst=3, max_rolling=8)
world_st = st.fixed_dictionaries({
    "global": st.none() | limit_st,
    "google": st.none() | limit_st,
    "yahoo_s0": st.none() | limit_st,
    "user_a": st.none() | limit_st,
    "task_b0": st.none() | limit_st,
    "suspend_microsoft_s1": st.booleans(),
    "transactional": st.booleans(),
    "intervals": st.lists(st.sampled_from([0.0, 0.0, 1.0]), min_size=1, max_size=3),
    "tasks_a": st.integers(1, 3),
    "recipients": st.integers(2, 12),
    # recipients in domain runs (sorted by domain) or mixed
    "runs": st.booleans(),
})
calls_st = st.lists(st.tuples(st.integers(0, 1500),                 # ms since the last call
                              st.sampled_from([1, 2, 4, 16]),         # slots per service
                              st.sampled_from([1, 3, 6, 50]),         # batch
                              st.sampled_from(["sent", "sent", "transient", None])),
                    min_size=4, max_size=14)


def build(s: Scheduler, conn: psycopg.Connection[Any], w: dict[str, Any]) -> None:
    conn.execute("TRUNCATE edm.services, edm.users, edm.tasks, edm.subtasks,"
                 " edm.shaping_limits, edm.site_suspensions CASCADE")
    for u in ("a", "b"):
        s.upsert_user(u)
    svcs = [make_service(s, f"s{n}", interval=iv, users=["a", "b"])
            for n, iv in enumerate(w["intervals"])]
    n = w["recipients"]
    if w["runs"]:
        mix = [f"{{}}{i}@{d}" for d in DOMAINS for i in range(n)]
    else:
        mix = [f"{{}}{i}@{d}" for i in range(n) for d in DOMAINS]

    def task(user: str, name: str, transactional: bool = False) -> int:
        return s.create_task({"user_id": user, "name": name, "templates": [TEMPLATE],
                              "scheduled_at": T0, "transactional": transactional,
                              "recipients": [{"email": m.format(name)} for m in mix]}).task_id

    for k in range(w["tasks_a"]):
        task("a", f"a{k}")
    tb0 = task("b", "b0")
    task("b", "b1", transactional=w["transactional"])

    def named(lim: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"name": "l", **lim}]
    if w["global"]:
        s.set_global_limits(named(w["global"]))
    if w["google"]:
        s.set_site_limits("google", named(w["google"]))
    if w["yahoo_s0"]:
        s.set_site_limits("yahoo", named(w["yahoo_s0"]), service_id=svcs[0])
    if w["user_a"]:
        s.set_user_limits("a", named(w["user_a"]))
    if w["task_b0"]:
        s.set_task_limits(tb0, named(w["task_b0"]))
    if w["suspend_microsoft_s1"]:
        conn.execute("SELECT edm.suspend_site(%s, 'microsoft', %s, 'test')",
                     (svcs[-1], at(3600)))


def drive(conn: psycopg.Connection[Any], fn: str,
          calls: list[tuple[int, int, int, str | None]]) -> list[list[tuple[Any, ...]]]:
    out = []
    t = 0.0
    for gap, per_service, batch, outcome in calls:
        t += gap / 1000
        rows = conn.execute(
            f"SELECT subtask_id, service_id, user_id, task_id, send_at, attempt"
            f" FROM {fn}('d1', %s, 600, %s, %s, 250, '{{}}')",
            (batch, at(t), per_service)).fetchall()
        out.append(rows)
        if rows and outcome is not None:
            complete(conn, at(t), [r[0] for r in rows], outcome,
                     code=451 if outcome == "transient" else 250)
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(w=world_st, calls=calls_st)
def test_shaped_claim_decides_like_the_claim_of_0016(
        dsn: str, w: dict[str, Any], calls: list[tuple[int, int, int, str | None]]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn, Scheduler(dsn) as s:
        conn.execute("CREATE SCHEMA IF NOT EXISTS edm_ref")
        conn.execute(reference_function_sql(16, "claim_v2"))
        build(s, conn, w)
        expected, got = replay_on_both(conn, drive, "edm_ref.claim_v2", "edm.claim_v2", calls)
    for i, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert have == want, f"call {i}: 0016 claimed {want}, 0022 claimed {have}"
    assert sum(len(c) for c in got) > 0
