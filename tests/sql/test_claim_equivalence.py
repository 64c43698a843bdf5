"""The batched ``edm.claim`` (0007) makes the same decisions as the row-by-row one of 0002.

0007 rewrote the claim for speed: one read of the rotation head per call,
one write per table per call, rotation inside the call tracked in arrays
(docs/performance.md, P1). The row-by-row version of 0002 saw its own writes
after every subtask and is the plain reading of docs/explanation/fairness.md, so it is kept
here, installed from the migration's own text as ``edm_ref.claim``, as the
oracle: on hypothesis-generated worlds (users, shared and dedicated services
with and without intervals, grant priority tiers, task priorities) both are
driven through the same sequence of claims and completions with a controlled
clock, and must return the same subtasks, services, users and tasks, in the
same order, call by call. 0007 finds a service's next user in one of two
ways (from a small pool's own grants, or from the head of the rotation), so
every example runs with ``queue.small_pool_grantees`` at 0 (every service
takes the rotation head) and at 10,000 (every service reads its grants).

Each example runs the sequence twice inside one transaction, rolled back to a
savepoint in between: both runs start from the same rows. ``edm.serve_seq``
is not rolled back, but only the order of its values matters to the claim.
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

# Property-based runs of the claim on many generated worlds: the slow lane.
pytestmark = pytest.mark.slow

Call = list[tuple[Any, ...]]


@pytest.fixture
def ref_conn(conn: psycopg.Connection[Any]) -> Iterator[psycopg.Connection[Any]]:
    conn.execute("CREATE SCHEMA IF NOT EXISTS edm_ref")
    conn.execute(reference_function_sql(2, "claim"))
    yield conn


calls_st = st.lists(st.tuples(st.sampled_from([1, 3, 10]),           # batch
                              st.sampled_from(["sent", "sent", "transient", None])),
                    min_size=5, max_size=25)


def drive(conn: psycopg.Connection[Any], fn: str,
          calls: list[tuple[int, str | None]]) -> list[Call]:
    """Claims every 0.5 s; what each claimed is then reported (or left leased when None)."""
    out: list[Call] = []
    for i, (batch, outcome) in enumerate(calls):
        when: dt.datetime = at(0.5 * i)
        rows = conn.execute(f"SELECT subtask_id, service_id, user_id, task_id, attempt"
                            f" FROM {fn}('d1', %s, 600, %s)", (batch, when)).fetchall()
        out.append(rows)
        if rows and outcome is not None:
            complete(conn, when, [r[0] for r in rows], outcome,
                     code=451 if outcome == "transient" else 250)
    return out


@pytest.mark.parametrize("small_pool", [0, 10_000], ids=["rotation-head", "grants"])
@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(n_users=users_st, services=services_st, tasks=tasks_st, calls=calls_st)
def test_batched_claim_decides_like_the_row_by_row_claim(
        ref_conn: psycopg.Connection[Any], dsn: str, small_pool: int, n_users: int,
        services: list[tuple[float, set[int], int]], tasks: list[tuple[int, int, int]],
        calls: list[tuple[int, str | None]]) -> None:
    conn = ref_conn
    reset_database(conn)
    conn.execute("SELECT edm.config_set('queue.small_pool_grantees', %s::jsonb)",
                 (str(small_pool),))
    with Scheduler(dsn) as s:
        build(s, n_users, services, tasks)
    expected, got = replay_on_both(conn, drive, "edm_ref.claim", "edm.claim", calls)
    for i, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert have == want, f"call {i}: row-by-row claimed {want}, batched claimed {have}"

