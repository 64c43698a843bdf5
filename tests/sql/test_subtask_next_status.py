"""One rule in one place: what a subtask becomes after an outcome (edm.subtask_next_status),
the rule edm.complete and edm.expire_leases both call."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

# (outcome, task status, attempts, max attempts) -> next status, as edm.complete and
# edm.expire_leases wrote it, each with its own copy, before migration 0021.
RETRIED = ("transient", "retry", "uncertain")
NOTHING_SPENT = ("service", "released", "throttled", "throttled_service")


@pytest.fixture(scope="module")
def mconn(module_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """These tests only read: one database for the module."""
    with psycopg.connect(module_dsn, autocommit=True) as c:
        yield c


def expected(outcome: str, task: str, attempts: int | None, most: int) -> str:
    last = attempts is not None and attempts >= most
    cancelled = task == "cancelled"
    if outcome == "sent":
        return "sent"
    if outcome in ("permanent", "render_error"):
        return "failed"
    if outcome in RETRIED:
        return "failed" if last else "cancelled" if cancelled else "pending"
    if outcome == "lease_expired":
        return "cancelled" if cancelled else "failed" if last else "pending"
    return "cancelled" if cancelled else "pending"


def test_every_outcome_follows_the_one_rule(mconn: psycopg.Connection[Any]) -> None:
    cases = [(o, t, a) for o in ("sent", "permanent", "render_error", *RETRIED,
                                 "lease_expired", *NOTHING_SPENT)
             for t in ("sending", "paused", "cancelled") for a in (None, 1, 2, 3, 4)]
    got = mconn.execute(
        "SELECT edm.subtask_next_status(c.o, c.t, c.a, 3) "
        "FROM unnest(%s::text[], %s::text[], %s::int[]) WITH ORDINALITY c(o, t, a, n) "
        "ORDER BY c.n", [[c[0] for c in cases], [c[1] for c in cases],
                         [c[2] for c in cases]]).fetchall()
    assert len(got) == len(cases)
    for case, (status,) in zip(cases, got, strict=True):
        assert status == expected(case[0], case[1], case[2], 3), case


def test_the_rule_is_inlined_so_the_callers_plan_as_before(
        mconn: psycopg.Connection[Any]) -> None:
    plan = "\n".join(r[0] for r in mconn.execute(
        "EXPLAIN (VERBOSE) SELECT edm.subtask_next_status(o, 'sending', a, 3) "
        "FROM (VALUES ('transient', 1), ('sent', 2)) v(o, a)").fetchall())
    assert "subtask_next_status" not in plan and "CASE" in plan, plan


def test_complete_and_expire_leases_call_it(mconn: psycopg.Connection[Any]) -> None:
    for fn in ("edm.complete", "edm.expire_leases"):
        src = mconn.execute("SELECT prosrc FROM pg_proc WHERE oid = %s::regproc",
                           [fn]).fetchone()
        assert src is not None and "edm.subtask_next_status(" in src[0], fn
        assert "v_max_attempts THEN 'failed'" not in src[0], fn
