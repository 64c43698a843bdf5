"""Fairness of the claim (promise I5, docs/explanation/fairness.md), as hypothesis
properties with a controlled clock.

Every example runs on the test's database, emptied first (reset_database), and
drives ``edm.claim`` directly with an explicit ``now``: a "round" is one claim
call at one tick that may take one subtask per ready service, and services
with a 1 s interval are all ready again at the next tick.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edm_sched.api import Scheduler
from tests.support.helpers import (
    at,
    claim,
    complete,
    counters_match,
    make_service,
    make_task,
    reset_database,
)

# Property-based runs of the claim on many generated worlds: the slow lane.
pytestmark = pytest.mark.slow

EXAMPLES = settings(max_examples=20, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@pytest.fixture
def sched(dsn: str) -> Iterator[Scheduler]:
    with Scheduler(dsn) as s:
        yield s


def users_named(k: int) -> list[str]:
    return [f"user{i}" for i in range(k)]


def sent_per_user(conn: psycopg.Connection[Any], users: list[str]) -> dict[str, int]:
    counts = dict.fromkeys(users, 0)
    counts.update(conn.execute(
        "SELECT user_id, sum(sent_count)::int FROM edm.tasks GROUP BY user_id").fetchall())
    return counts


def shared_pool(sched: Scheduler, conn: psycopg.Connection[Any], k: int,
                n_services: int) -> list[str]:
    """An emptied database: users user0..user{k-1}, n services (1 s interval) shared by all."""
    reset_database(conn)
    users = users_named(k)
    for u in users:
        sched.upsert_user(u)
    for i in range(n_services):
        make_service(sched, f"s{i}", interval=1, users=users)
    return users


def jain(xs: list[int]) -> float:
    """Jain's fairness index: 1.0 for equal shares, 1/n when one takes everything."""
    return float(sum(xs)) ** 2 / (len(xs) * sum(x * x for x in xs))


def run_round(conn: psycopg.Connection[Any], tick: int, batch: int) -> list[dict[str, Any]]:
    """One round: a claim at the tick, every claimed subtask then reported sent."""
    rows = claim(conn, at(tick), batch=batch, lease=3600)
    if rows:
        done = complete(conn, at(tick), [r["subtask_id"] for r in rows])
        assert all(ok for _, ok, _, _ in done)
    return rows


def split(total: int, parts: int) -> st.SearchStrategy[list[int]]:
    """``total`` cut into ``parts`` positive sizes (parts <= total)."""
    return (st.lists(st.integers(1, total - 1), min_size=parts - 1, max_size=parts - 1,
                     unique=True)
            .map(lambda cuts: [b - a for a, b in zip([0, *sorted(cuts)],
                                                     [*sorted(cuts), total], strict=True)]))


# ------------------------------------------------- (a) equal backlogs alternate


@EXAMPLES
@given(k=st.integers(2, 6), n_services=st.integers(1, 3), backlog=st.integers(1, 12),
       data=st.data())
def test_equal_backlogs_differ_by_at_most_one_after_every_round(
        sched: Scheduler, conn: psycopg.Connection[Any], k: int, n_services: int,
        backlog: int, data: st.DataObject) -> None:
    users = shared_pool(sched, conn, k, n_services)
    for u in users:
        n_tasks = data.draw(st.integers(1, min(3, backlog)), label=f"tasks of {u}")
        for j, size in enumerate(data.draw(split(backlog, n_tasks) if n_tasks > 1
                                           else st.just([backlog]), label=f"sizes of {u}")):
            make_task(sched, u, size, name=f"t{j}")
    total, tick = 0, 0
    while total < k * backlog:
        rows = run_round(conn, tick, n_services)
        # every ready service sends while there is work (nothing idles)
        assert len(rows) == min(n_services, k * backlog - total)
        total += len(rows)
        counts = sent_per_user(conn, users)
        assert max(counts.values()) - min(counts.values()) <= 1, (tick, counts)
        tick += 1
    assert set(sent_per_user(conn, users).values()) == {backlog}
    assert counters_match(conn) == []


# ---------------------------------------------- (b) a newcomer is not starved

# 2,000 rather than the 100,000 pending subtasks per backlog user, to
# keep each example fast; test_newcomer_behind_100k_backlog below is the full
# size, once, built set-based.


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(n_backlogged=st.integers(1, 3), n_services=st.integers(1, 3),
       warmup=st.integers(0, 8), data=st.data())
def test_newcomer_is_served_within_one_round(
        sched: Scheduler, conn: psycopg.Connection[Any], n_backlogged: int, n_services: int,
        warmup: int, data: st.DataObject) -> None:
    reset_database(conn)
    users = users_named(n_backlogged)
    for u in [*users, "newcomer"]:
        sched.upsert_user(u)
    services = [make_service(sched, f"s{i}", interval=1, users=users)
                for i in range(n_services)]
    for u in users:
        make_task(sched, u, 2000)
    for tick in range(warmup):
        assert len(run_round(conn, tick, n_services)) == n_services
    # the newcomer may use only some of the services: it must get the first of
    # them that sends next
    mine = data.draw(st.lists(st.sampled_from(services), min_size=1, unique=True),
                     label="newcomer's services")
    for sid in mine:
        sched.grant(sid, "newcomer")
    make_task(sched, "newcomer", 1, name="hello")
    rows = run_round(conn, warmup, n_services)
    served = [r for r in rows if r["user_id"] == "newcomer"]
    assert len(served) == 1, rows
    first_of_mine = next(r["service_id"] for r in rows if r["service_id"] in mine)
    assert served[0]["service_id"] == first_of_mine


def test_newcomer_behind_100k_backlog(sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    """The issue's size: 100,000 pending subtasks, contacts built by one set-based INSERT."""
    sched.upsert_user("big")
    sched.upsert_user("newcomer")
    svc = make_service(sched, "svc", interval=1, users=["big", "newcomer"])
    conn.execute(
        "INSERT INTO edm.contacts (user_id, email, tags)"
        " SELECT 'big', 'c' || g || '@big.example', '{all}' FROM generate_series(1, 100000) g")
    created = sched.create_task({"user_id": "big", "name": "backlog", "scheduled_at": at(0),
                                 "templates": [{"subject": "s", "body_text": "b"}],
                                 "rule": {"include_any": ["all"]}})
    assert created.recipients == 100_000
    for tick in range(3):
        assert [r["user_id"] for r in run_round(conn, tick, 1)] == ["big"]
    make_task(sched, "newcomer", 1, name="hello")
    [row] = run_round(conn, 3, 1)
    assert (row["user_id"], row["service_id"]) == ("newcomer", svc)
    assert [r["user_id"] for r in run_round(conn, 4, 1)] == ["big"]


# ---------------------------------------------------------- (c) Jain's index


def test_jain_index_reference_values() -> None:
    assert jain([5, 5, 5]) == 1.0
    assert jain([1, 0]) == 0.5
    assert jain([3, 1]) == pytest.approx(0.8)


@EXAMPLES
@given(k=st.integers(2, 6), n_services=st.integers(1, 4), backlog=st.integers(3, 10))
def test_jain_index_is_one_for_equal_shares(
        sched: Scheduler, conn: psycopg.Connection[Any], k: int, n_services: int,
        backlog: int) -> None:
    users = shared_pool(sched, conn, k, n_services)
    for u in users:
        make_task(sched, u, backlog)
    order: list[str] = []
    tick = 0
    while len(order) < k * backlog:
        order += [r["user_id"] for r in run_round(conn, tick, n_services)]
        tick += 1
    # every window of whole turns (k·r consecutive claims) is perfectly fair
    for width in range(k, len(order) + 1, k):
        for start in range(len(order) - width + 1):
            window = Counter(order[start:start + width])
            assert jain([window[u] for u in users]) == pytest.approx(1.0, abs=1e-12), (
                start, width, window)


# ------------------------------------------- (d) task rotation and priority


@EXAMPLES
@given(n_users=st.integers(1, 2),
       tasks=st.lists(st.tuples(st.integers(0, 1), st.sampled_from([0, 0, 5]),
                                st.integers(1, 5)), min_size=2, max_size=6),
       late=st.one_of(st.none(), st.tuples(st.integers(0, 1), st.sampled_from([0, 5]),
                                          st.integers(1, 3), st.integers(1, 8))))
def test_tasks_rotate_least_recently_served_first_priority_first(
        sched: Scheduler, conn: psycopg.Connection[Any], n_users: int,
        tasks: list[tuple[int, int, int]], late: tuple[int, int, int, int] | None) -> None:
    """A model of the rule in docs/explanation/fairness.md predicts every claim exactly.

    Users: least recently served first (never served first, ties by user id).
    Within the user: highest task priority, then least recently served task
    (never served first), ties by task id. Within the task: lowest pending
    subtask id. A task arriving late (``late``) joins the rotation at once.
    """
    users = shared_pool(sched, conn, n_users, 1)
    pending: dict[int, list[int]] = {}
    meta: dict[int, tuple[str, int]] = {}

    def add(user: str, priority: int, size: int, name: str) -> None:
        tid = make_task(sched, user, size, name=name, priority=priority)
        pending[tid] = [r[0] for r in conn.execute(
            "SELECT subtask_id FROM edm.subtasks WHERE task_id = %s ORDER BY subtask_id",
            (tid,))]
        meta[tid] = (user, priority)

    for i, (owner, priority, size) in enumerate(tasks):
        add(users[owner % n_users], priority, size, f"t{i}")
    served_user: dict[str, int] = dict.fromkeys(users, 0)
    served_task: dict[int, int] = {}
    stamp, tick = 0, 0
    while any(pending.values()):
        if late is not None and tick == late[3]:
            add(users[late[0] % n_users], late[1], late[2], "late")
        live = [t for t, ids in pending.items() if ids]
        user = min({meta[t][0] for t in live}, key=lambda u: (served_user[u], u))
        task = min((t for t in live if meta[t][0] == user),
                   key=lambda t: (-meta[t][1], served_task.get(t, 0), t))
        [row] = run_round(conn, tick, 1)
        assert (row["user_id"], row["task_id"], row["subtask_id"]) == (
            user, task, pending[task][0]), tick
        pending[task].pop(0)
        stamp += 1
        served_user[user] = served_task[task] = stamp
        tick += 1
    assert run_round(conn, tick, 1) == []


# ------------------------------------------------------- (e) grant tiers


@EXAMPLES
@given(n_users=st.integers(1, 3), intervals=st.lists(st.integers(1, 3), min_size=2, max_size=4),
       data=st.data())
def test_lower_priority_grant_only_while_no_higher_one_is_ready(
        sched: Scheduler, conn: psycopg.Connection[Any], n_users: int, intervals: list[int],
        data: st.DataObject) -> None:
    """Overflow grants: a claim through a user's priority-p grant only happens
    while none of that user's granted services with priority > p is ready; and
    a claim round ends only when no ready service is left that some user with
    work may use at its top ready tier (tiers never leave a slot idle).
    """
    reset_database(conn)
    users = users_named(n_users)
    for u in users:
        sched.upsert_user(u)
    services = [make_service(sched, f"s{i}", interval=iv) for i, iv in enumerate(intervals)]
    grants: dict[tuple[int, str], int] = {}
    for u in users:
        mine = data.draw(st.lists(st.sampled_from(services), min_size=1, unique=True),
                         label=f"services of {u}")
        for sid in mine:
            grants[sid, u] = data.draw(st.sampled_from([0, 10]), label="grant priority")
            sched.grant(sid, u, priority=grants[sid, u])
        make_task(sched, u, 200)

    def ready(tick: float) -> set[int]:
        return {r[0] for r in conn.execute(
            "SELECT service_id FROM edm.services s WHERE edm.service_is_ready(s, %s)",
            (at(tick),))}

    def usable(sid: int, user: str, now_ready: set[int]) -> bool:
        p = grants.get((sid, user))
        return p is not None and not any(
            q > p and s2 in now_ready for (s2, u2), q in grants.items() if u2 == user)

    claims = 0
    for tick in range(10):
        for _ in range(len(services) + 1):
            before = ready(tick)
            rows = claim(conn, at(tick), batch=1, lease=3600)
            if not rows:
                break
            [row] = rows
            claims += 1
            assert row["service_id"] in before
            assert usable(row["service_id"], row["user_id"], before), (tick, row, before)
        else:
            pytest.fail("more claims in one tick than services")
        now_ready = ready(tick)
        idle = [(sid, u) for sid in now_ready for u in users if usable(sid, u, now_ready)]
        assert idle == [], (tick, idle)
    assert claims > 0
