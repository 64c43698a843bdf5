"""Batched slot fills (0014) decide like the slot-by-slot ``edm.claim_v2`` of 0008.

0014 fills several slots of a service (no interval, or several intervals
within the lookahead) with one statement: the next users of the rotation
head or of the service's small pool, each with its best task and that task's
due retry or else its lowest pending subtask, keeping the longest prefix of
users that each got a subtask and leaving the rest to 0008's loop. 0008's
``edm.claim_v2`` is kept here, installed from the migration's own text as
``edm_ref.claim_v2``, as the oracle: on hypothesis-generated worlds (shared
and dedicated services with and without intervals, grant tiers, task
priorities, retries, leases left open) both are driven through the same
claims and completions with several slots per service and a controlled
clock, and must return the same subtasks, services, users, tasks and slots,
in the same order, call by call — once with every service on the
rotation-head lookup and once with every service on its small pool, and both
once more with every shaping layer of 0016 configured but never binding (the
claim's shaped path: no batched fill, every layer checked and counted per slot).
Since 0030 the same oracle covers the slots of a small pool's services once
its users were served in the call: the single-user pass of a dedicated
account, the wrap-around that stops at the first user who fits, and the pool's
users not yet served (the generated worlds with every service on its small
pool, and four worlds built to make the pass stop early).
(``tests/sql/test_claim_equivalence.py`` does the same for one slot per service
against 0002.)
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edm_sched.api import Scheduler
from tests.support.claim_worlds import (
    build,
    reference_function_sql,
    replay_on_both,
    services_st,
    tasks_st,
    users_st,
)
from tests.support.helpers import at, complete, reset_database

Call = list[tuple[Any, ...]]


@pytest.fixture
def ref_conn(conn: psycopg.Connection[Any]) -> Iterator[psycopg.Connection[Any]]:
    conn.execute("CREATE SCHEMA IF NOT EXISTS edm_ref")
    conn.execute(reference_function_sql(8, "claim_v2"))
    yield conn


calls_st = st.lists(st.tuples(st.sampled_from([1, 3, 10]),           # batch
                              st.sampled_from([2, 4, 7]),             # slots per service
                              st.sampled_from([0, 250, 2500]),        # lookahead, ms
                              st.sampled_from(["sent", "sent", "transient", None])),
                    min_size=5, max_size=20)


def drive(conn: psycopg.Connection[Any], fn: str,
          calls: list[tuple[int, int, int, str | None]]) -> list[Call]:
    """Claims every 0.5 s; what each claimed is then reported (or left leased when None)."""
    out: list[Call] = []
    for i, (batch, per_service, lookahead, outcome) in enumerate(calls):
        when: dt.datetime = at(0.5 * i)
        rows = conn.execute(f"SELECT subtask_id, service_id, user_id, task_id, attempt, send_at"
                            f" FROM {fn}('d1', %s, 600, %s, %s, %s, '{{}}')",
                            (batch, when, per_service, lookahead)).fetchall()
        out.append(rows)
        if rows and outcome is not None:
            complete(conn, when, [r[0] for r in rows], outcome,
                     code=451 if outcome == "transient" else 250)
    return out


# Every shaping layer of 0016 in use with room to spare (never binding): the
# claim then takes its shaped path (no batched fill, every layer checked and
# counted per slot) and must still decide exactly like the slot-by-slot claim.
IDLE_LAYERS = (
    "SELECT edm.set_site_domains('rcpt', ARRAY['rcpt.example'])",
    "SELECT edm.set_site_limits('rcpt', '[{\"name\": \"d\", \"kind\": \"calendar_day\","
    " \"max_count\": 100000000}]')",
    "SELECT edm.set_global_limits('[{\"name\": \"g\", \"kind\": \"rate\","
    " \"max_count\": 100000000, \"window_ms\": 2678400000, \"burst\": 100000}]')",
    "SELECT edm.set_user_limits(u.user_id, '[{\"name\": \"u\", \"kind\": \"rolling\","
    " \"max_count\": 100000000, \"window_ms\": 3600000}]') FROM edm.users u",
    "SELECT edm.set_task_limits(t.task_id, '[{\"name\": \"t\", \"kind\": \"rolling\","
    " \"max_count\": 100000000, \"window_ms\": 60000}]') FROM edm.tasks t",
)


@pytest.mark.slow  # 60 generated worlds; the fast lane has test_limits.py's batched fills
@pytest.mark.parametrize("layers", ["unshaped", "idle-layers"])
@pytest.mark.parametrize("small_pool", [0, 10_000], ids=["rotation-head", "grants"])
@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(n_users=users_st, services=services_st, tasks=tasks_st, calls=calls_st)
def test_batched_fill_decides_like_the_slot_by_slot_claim(
        ref_conn: psycopg.Connection[Any], dsn: str, small_pool: int, layers: str, n_users: int,
        services: list[tuple[float, set[int], int]], tasks: list[tuple[int, int, int]],
        calls: list[tuple[int, int, int, str | None]]) -> None:
    conn = ref_conn
    reset_database(conn)
    conn.execute("SELECT edm.config_set('queue.small_pool_grantees', %s::jsonb)",
                 (str(small_pool),))
    with Scheduler(dsn) as s:
        build(s, n_users, services, tasks)
    if layers == "idle-layers":
        for stmt in IDLE_LAYERS:
            conn.execute(stmt)

    def layers_counted(got: list[Any]) -> None:
        if layers == "idle-layers" and any(got):  # the layers were checked and counted
            row = conn.execute("SELECT tat IS NOT NULL FROM edm.shaping_limits"
                               " WHERE scope = 'global'").fetchone()
            assert row == (True,)

    expected, got = replay_on_both(conn, drive, "edm_ref.claim_v2", "edm.claim_v2", calls,
                                   layers_counted)
    for i, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert have == want, f"call {i}: slot by slot claimed {want}, batched claimed {have}"


# 0030's single-user pass: a service whose one grantee with work was served
# already in the call. Each world below makes the pass stop where the loop's
# order is not known from what it read: a task given all it was asked for
# ahead of a lower priority level, more tasks than slots (some empty), tasks
# served at another service of the same user earlier in the call.
SINGLE_USER_WORLDS = {
    # one task given its share (2 of 6) ahead of a lower level: the pass stops there
    "capped-before-lower-level": ([(0.0, {0}, 0)], [(0, 1, 10), (0, 6, 10), (0, 6, 0)]),
    # more tasks than slots, most of them with one recipient
    "more-tasks-than-slots": ([(0.0, {0}, 0)], [(0, 1, 0)] * 5 + [(0, 9, 0), (0, 2, 5)]),
    # the user's two services: its tasks are served at the first, then the pass at the second
    "two-services": ([(0.0, {0}, 0), (0.0, {0}, 0)], [(0, 3, 0), (0, 7, 0), (0, 4, 10)]),
    # an interval: the slots within the lookahead only
    "interval": ([(1.0, {0}, 0), (0.0, {1}, 0)], [(0, 5, 0), (0, 5, 0), (1, 8, 0)]),
}


@pytest.mark.parametrize("world", list(SINGLE_USER_WORLDS))
def test_single_user_pass_decides_like_the_slot_by_slot_claim(
        ref_conn: psycopg.Connection[Any], dsn: str, world: str) -> None:
    conn = ref_conn
    reset_database(conn)
    conn.execute("SELECT edm.config_set('queue.small_pool_grantees', '10000'::jsonb)")
    services, tasks = SINGLE_USER_WORLDS[world]
    with Scheduler(dsn) as s:
        build(s, 2, services, tasks)
    calls: list[tuple[int, int, int, str | None]] = [
        (10, 7, 0, "sent"), (3, 7, 2500, None), (10, 4, 2500, "transient"),
        (10, 16, 0, "sent"), (1, 7, 0, "sent"), (10, 7, 2500, "sent")]
    expected, got = replay_on_both(conn, drive, "edm_ref.claim_v2", "edm.claim_v2", calls)
    assert any(len(rows) > 2 for rows in got), "no call gave a service several slots"
    for i, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert have == want, f"call {i}: slot by slot claimed {want}, batched claimed {have}"
