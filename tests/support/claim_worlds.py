"""Small random worlds for the claim equivalence tests: users, services with grants, tasks."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from hypothesis import strategies as st

from edm_sched import sqlfiles
from edm_sched.api import Scheduler
from tests.support.helpers import make_service, make_task

users_st = st.integers(min_value=1, max_value=5)
services_st = st.lists(
    st.tuples(st.sampled_from([0.0, 1.0, 2.0]),          # interval, seconds
              st.sets(st.integers(0, 4), max_size=5),     # grantees (user indexes)
              st.sampled_from([0, 0, 5])),                # grant priority
    min_size=1, max_size=6)
tasks_st = st.lists(
    st.tuples(st.integers(0, 4),                          # owner (user index)
              st.integers(1, 6),                          # recipients
              st.sampled_from([0, 0, 10])),               # task priority
    min_size=1, max_size=8)

C = TypeVar("C")


def shaping_limit_st(max_burst: int, max_rolling: int) -> st.SearchStrategy[dict[str, Any]]:
    """A shaping limit as the API takes it: a rate of 1-4 per 1, 2 or 5 s with a burst of
    up to ``max_burst``, or a rolling window of 2, 5 or 10 s with up to ``max_rolling``."""
    return st.one_of(
        st.builds(lambda n, w, b: {"kind": "rate", "max_count": n, "window_seconds": w,
                                   "burst": min(b, n)},
                  st.integers(1, 4), st.sampled_from([1, 2, 5]), st.integers(1, max_burst)),
        st.builds(lambda n, w: {"kind": "rolling", "max_count": n, "window_seconds": w},
                  st.integers(1, max_rolling), st.sampled_from([2, 5, 10])),
    )


def build(s: Scheduler, n_users: int, services: list[tuple[float, set[int], int]],
          tasks: list[tuple[int, int, int]]) -> None:
    users = [f"u{i}" for i in range(n_users)]
    for u in users:
        s.upsert_user(u)
    for k, (interval, grantees, prio) in enumerate(services):
        make_service(s, f"s{k}", interval=interval, priority=prio,
                     users=[users[i] for i in sorted(grantees) if i < n_users])
    for k, (owner, n, prio) in enumerate(tasks):
        make_task(s, users[owner % n_users], n, name=f"t{k}", priority=prio)


def reference_function_sql(version: int, name: str) -> str:
    """Migration ``version``'s ``edm.<name>`` as ``edm_ref.<name>``: the oracle an
    equivalence test compares the installed function with."""
    text = next(m for m in sqlfiles.migrations() if m.version == version).sql
    found = re.search(rf"CREATE (?:OR REPLACE )?FUNCTION edm\.{name}\(.*?\n\$\$;", text, re.S)
    assert found, f"migration {version:04d} no longer defines edm.{name}: update this oracle"
    head = found.group(0).index(f"edm.{name}(")
    return (f"CREATE OR REPLACE FUNCTION edm_ref.{name}("
            + found.group(0)[head + len(f"edm.{name}("):])


def replay_on_both(conn: psycopg.Connection[Any],
                   drive: Callable[[psycopg.Connection[Any], str, C], list[Any]],
                   reference: str, installed: str, calls: C,
                   inspect: Callable[[list[Any]], None] | None = None
                   ) -> tuple[list[Any], list[Any]]:
    """Drive the ``reference`` function, then the ``installed`` one, through the same
    ``calls`` on the same world (rolled back in between and after): what each claimed.
    ``inspect(got)`` runs before the last rollback, to look at what the installed one
    wrote."""
    conn.autocommit = False
    try:
        conn.execute("SAVEPOINT world")
        expected = drive(conn, reference, calls)
        conn.execute("ROLLBACK TO SAVEPOINT world")
        got = drive(conn, installed, calls)
        if inspect is not None:
            inspect(got)
    finally:
        conn.rollback()
        conn.autocommit = True
    return expected, got
