"""Hostile input (I8): every public entry point answers malformed input with a typed
error and writes nothing. Hypothesis generates the input; the database is real."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edm_sched import errors
from edm_sched.api import Scheduler
from tests.support.helpers import fingerprint, make_service, make_task

HOSTILE = settings(max_examples=25, deadline=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture])

nasty_text = st.one_of(
    st.text(max_size=40),
    st.just(""),
    st.just("x" * 100_000),
    st.just("a\x00b"),
    st.just("evil\r\nBcc: victim@example.com"),
    st.just("\ud800lone surrogate"),
    st.just("\u202eRTL override"),
    st.just("💥" * 300),
    st.just("'; DROP TABLE edm.tasks; --"),
)
nasty_email = st.one_of(
    nasty_text,
    st.just("user@example.com\r\nBcc: x@y.example"),
    st.just("no-at-sign"),
    st.just("two@@example.com"),
    st.just("<a@b.example>"),
    st.just("a@b"),
    st.just("a" * 250 + "@b.example"),
)
nasty_int = st.one_of(st.integers(min_value=-(2**70), max_value=2**70),
                      st.sampled_from([-1, 0, 2**31, 2**63, -(2**63) - 1]))


@pytest.fixture(scope="module")
def world(module_dsn: str) -> Iterator[dict[str, Any]]:
    """One database for the module, as hypothesis already shares it between the examples
    of a test: every refusal is checked against the state just before it."""
    with Scheduler(module_dsn) as s, psycopg.connect(module_dsn, autocommit=True) as conn:
        s.upsert_user("tenant-a", quota_limit=1000)
        s.upsert_user("tenant-b", quota_limit=1000)
        svc = make_service(s, "svc", users=["tenant-a"])
        task_b = make_task(s, "tenant-b", 3)
        yield {"s": s, "conn": conn, "svc": svc, "task_b": task_b}


def refused_cleanly(world: dict[str, Any], call: Callable[[], Any]) -> bool:
    """Run ``call``; if it fails it must be a typed error and write nothing."""
    before = fingerprint(world["conn"])
    try:
        call()
    except errors.EdmSchedError:
        assert fingerprint(world["conn"]) == before
        return True
    return False


@HOSTILE
@given(user_id=nasty_text, name=st.one_of(st.none(), nasty_text), quota=st.one_of(st.none(),
                                                                                 nasty_int))
def test_upsert_user(world: dict[str, Any], user_id: str, name: str | None,
                     quota: int | None) -> None:
    refused_cleanly(world, lambda: world["s"].upsert_user(user_id, display_name=name,
                                                          quota_limit=quota))


@HOSTILE
@given(name=nasty_text, sender=nasty_email, interval=st.one_of(nasty_int, st.floats()),
       quota=nasty_int, tz=nasty_text, settings_=st.dictionaries(nasty_text, nasty_text,
                                                                 max_size=3))
def test_create_service(world: dict[str, Any], name: str, sender: str, interval: Any,
                        quota: int, tz: str, settings_: dict[str, str]) -> None:
    refused_cleanly(world, lambda: world["s"].create_service({
        "name": name, "from_addresses": [sender], "interval_seconds": interval,
        "daily_quota": quota, "quota_tz": tz, "settings": settings_}))


@HOSTILE
@given(emails=st.lists(nasty_email, min_size=1, max_size=5), subject=nasty_text,
       body=nasty_text, user=st.sampled_from(["tenant-a", "nobody", "tenant-b\x00"]),
       priority=nasty_int, when=st.one_of(st.none(), st.datetimes()))
def test_create_task(world: dict[str, Any], emails: list[str], subject: str, body: str,
                     user: str, priority: int, when: dt.datetime | None) -> None:
    refused = refused_cleanly(world, lambda: world["s"].create_task({
        "user_id": user, "name": "n", "priority": priority, "scheduled_at": when,
        "templates": [{"subject": subject, "body_text": body}],
        "recipients": [{"email": e} for e in emails]}))
    if not refused:  # accepted: then no recipient can carry a header break
        bad = world["conn"].execute(
            "SELECT count(*) FROM edm.subtasks WHERE email ~ '[\\r\\n]'").fetchone()
        assert bad == (0,)


@HOSTILE
@given(task_id=nasty_int,
       op=st.sampled_from(["pause_task", "resume_task", "cancel_task", "get_task"]))
def test_lifecycle_with_wrong_ids(world: dict[str, Any], task_id: int, op: str) -> None:
    s = world["s"]
    assert refused_cleanly(world, lambda: getattr(s, op)(task_id, user_id="tenant-a"))


@pytest.mark.parametrize("op", ["pause_task", "resume_task", "cancel_task", "get_task"])
def test_another_tenants_task_is_unknown(world: dict[str, Any], op: str) -> None:
    s = world["s"]
    before = fingerprint(world["conn"])
    with pytest.raises(errors.NotFound):
        getattr(s, op)(world["task_b"], user_id="tenant-a")
    assert fingerprint(world["conn"]) == before


@HOSTILE
@given(service_id=nasty_int, user=nasty_text, priority=nasty_int)
def test_grant(world: dict[str, Any], service_id: int, user: str, priority: int) -> None:
    refused_cleanly(world, lambda: world["s"].grant(service_id, user, priority=priority))


@HOSTILE
@given(emails=st.lists(nasty_email, min_size=1, max_size=4),
       tags=st.lists(nasty_text, max_size=3), attrs=st.dictionaries(nasty_text, nasty_text,
                                                                    max_size=2))
@example(emails=["a@b.example"], tags=[], attrs={"a\x00b": ""})  # \u0000 cannot go into jsonb
def test_upsert_contacts(world: dict[str, Any], emails: list[str], tags: list[str],
                         attrs: dict[str, str]) -> None:
    refused_cleanly(world, lambda: world["s"].upsert_contacts(
        "tenant-a", [{"email": e, "tags": tags, "attributes": attrs} for e in emails]))


SQL_CALLS = [
    ("SELECT * FROM edm.claim(%s::text, %s::integer)", st.tuples(nasty_text, nasty_int)),
    ("SELECT * FROM edm.complete(%s::text, %s::bigint[], %s::text[])",
     st.tuples(nasty_text, st.lists(nasty_int, max_size=3), st.lists(nasty_text, max_size=3))),
    ("SELECT edm.expire_leases(NULL, %s::integer)", st.tuples(nasty_int)),
    ("SELECT edm.config_set(%s::text, to_jsonb(%s::text))", st.tuples(nasty_text, nasty_text)),
    ("SELECT * FROM edm.task_wait_reason(%s::bigint)", st.tuples(nasty_int)),
    ("SELECT edm.set_user_quota(%s::text, %s::bigint)", st.tuples(nasty_text, nasty_int)),
    ("SELECT edm.add_suppression(%s::text, 'manual', %s::text)",
     st.tuples(nasty_email, nasty_text)),
    ("SELECT edm.update_service(%s::bigint, p_quota_tz => %s::text)",
     st.tuples(nasty_int, nasty_text)),
]


@pytest.mark.parametrize(("statement", "args"), SQL_CALLS, ids=[c[0][:40] for c in SQL_CALLS])
def test_sql_functions_fail_with_typed_sqlstates(world: dict[str, Any], statement: str,
                                                  args: st.SearchStrategy[Any]) -> None:
    conn = world["conn"]

    @HOSTILE
    @given(values=args)
    def check(values: tuple[Any, ...]) -> None:
        before = fingerprint(conn)
        try:
            with conn.transaction():
                conn.execute(statement.encode(), values)
        except (psycopg.DataError, UnicodeEncodeError, psycopg.errors.NumericValueOutOfRange):
            assert fingerprint(conn) == before  # refused before or at parameter binding
        except psycopg.Error as exc:
            state = exc.sqlstate or ""
            # ED = our typed errors; 22 = bad data; 23 = constraint: never internal errors
            assert state[:2] in {"ED", "22", "23"}, (state, str(exc))
            assert fingerprint(conn) == before
        else:
            conn.execute("SELECT edm.config_set(key, default_value) FROM edm.config")

    check()
