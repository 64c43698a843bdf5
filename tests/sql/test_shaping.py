"""Traffic shaping (0016): layered limits, no head-of-line blocking, the transactional lane.

Driven through ``edm.claim_v2`` with a controlled clock (p_now). Each layer is
checked on its own, then together as a property: whatever the random limits
and claim times, the slots handed out never exceed any layer (recomputed
from the claimed rows, not from the limits' own state).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edm_sched import errors
from edm_sched.api import Scheduler
from tests.support.claim_worlds import shaping_limit_st
from tests.support.helpers import T0, TEMPLATE, at, complete, counters_match, make_service


@pytest.fixture
def sched(dsn: str) -> Iterator[Scheduler]:
    with Scheduler(dsn) as s:
        # exact clocks below: no arrival margin (its own test sets it)
        s.monitoring.config_set("queue.shaping_arrival_margin_ms", 0)
        yield s


def claim2(conn: psycopg.Connection[Any], now: dt.datetime, *, owner: str = "d1",
           batch: int = 50, per_service: int = 1, lookahead_ms: int = 0) -> list[dict[str, Any]]:
    cur = conn.execute(
        "SELECT subtask_id, task_id, service_id, user_id, email, send_at, edm.site_of(email)"
        " FROM edm.claim_v2(%s, %s, NULL, %s, %s, %s, '{}')",
        (owner, batch, now, per_service, lookahead_ms))
    return [dict(zip(("subtask_id", "task_id", "service_id", "user_id", "email", "send_at",
                      "site"), r, strict=True)) for r in cur.fetchall()]


def task(s: Scheduler, user: str, emails: list[str], *, name: str = "t",
         transactional: bool = False) -> int:
    return s.create_task({"user_id": user, "name": name, "templates": [TEMPLATE],
                          "scheduled_at": T0, "transactional": transactional,
                          "recipients": [{"email": e} for e in emails]}).task_id


def rate(name: str, n: int, window_s: float, burst: int = 1) -> dict[str, Any]:
    return {"name": name, "kind": "rate", "max_count": n, "window_seconds": window_s,
            "burst": burst}


def sites(rows: list[dict[str, Any]]) -> list[str | None]:
    return [r["site"] for r in rows]


GMAIL = [f"g{i}@gmail.com" for i in range(5)]
YAHOO = [f"y{i}@yahoo.com" for i in range(5)]


def test_a_site_without_headroom_is_skipped_not_waited_for(
        sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    """No head-of-line blocking: the task's next recipients are all gmail, gmail has
    one send a minute, its yahoo recipients still go."""
    sched.upsert_user("a")
    make_service(sched, "svc", interval=0, users=["a"])
    task(sched, "a", GMAIL + YAHOO)
    assert sched.set_site_limits("google", [rate("per_minute", 1, 60)]) == 1
    rows = claim2(conn, at(0), per_service=10, batch=10)
    assert sites(rows) == ["google"] + ["yahoo"] * 5
    assert claim2(conn, at(30), per_service=10) == []
    rows = claim2(conn, at(60), per_service=10)
    assert sites(rows) == ["google"]
    status = {r.limit_name: r for r in sched.shaping_limits("site")}
    assert status["per_minute"].site == "google" and status["per_minute"].max_count == 1
    assert counters_match(conn) == []


def test_a_site_limit_is_shared_by_every_service_in_one_claim(
        sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a")
    s1 = make_service(sched, "s1", interval=0, users=["a"])
    s2 = make_service(sched, "s2", interval=0, users=["a"])
    task(sched, "a", GMAIL + [f"g{i}@googlemail.com" for i in range(5)])
    sched.set_site_limits("google", [rate("burst", 3, 60, burst=3)])
    sched.set_site_limits("google", [rate("own", 2, 60, burst=2)], service_id=s2)
    rows = claim2(conn, at(0), per_service=10, batch=20)
    assert len(rows) == 3 and {r["service_id"] for r in rows} <= {s1, s2}
    assert sum(1 for r in rows if r["service_id"] == s2) <= 2
    # three sends counted once each, whichever service sent them (GCRA: 20 s apiece)
    assert conn.execute("SELECT tat FROM edm.shaping_limits WHERE name = 'burst'"
                        ).fetchone() == (at(60),)
    assert claim2(conn, at(1), per_service=10) == []


def test_a_suspended_site_is_skipped_on_that_service_only(
        sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a")
    s1 = make_service(sched, "s1", interval=0, users=["a"])
    tid = task(sched, "a", GMAIL + YAHOO)
    conn.execute("SELECT edm.suspend_site(%s, 'google', %s, 'test: 421 4.7.28')", (s1, at(60)))
    rows = claim2(conn, at(0), per_service=10)
    assert sites(rows) == ["yahoo"] * 5
    # everything left is gmail, suspended on the only service: the reason says so
    conn.execute("INSERT INTO edm.dispatchers (dispatcher_id, hostname, pid, heartbeat_at)"
                 " VALUES ('d1', 'h', 1, %s)", (at(1),))
    reason, until = conn.execute("SELECT * FROM edm.task_wait_reason(%s, %s)",
                                 (tid, at(1))).fetchone() or (None, None)
    assert reason.startswith("sites held back: google suspended") and until == at(60)
    s2 = make_service(sched, "s2", interval=0, users=["a"])
    rows = claim2(conn, at(2), per_service=10)
    assert {r["service_id"] for r in rows} == {s2} and sites(rows) == ["google"] * 5
    assert s1 != s2


def test_service_site_limits_apply_to_their_service_only(
        sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a")
    s1 = make_service(sched, "s1", interval=0, users=["a"])
    task(sched, "a", GMAIL)
    assert sched.set_site_limits("google", [rate("closed", 0, 1)], service_id=s1) == 1
    assert claim2(conn, at(0), per_service=10) == []
    s2 = make_service(sched, "s2", interval=0, users=["a"])
    rows = claim2(conn, at(0), per_service=2)
    assert [r["service_id"] for r in rows] == [s2, s2]
    site = conn.execute("SELECT limits, limited_until FROM edm.site_status"
                        " WHERE site = 'google'").fetchone()
    assert site is not None and site[0][0]["service_id"] == s1 and site[1] is None


def test_user_limits_skip_the_user_and_are_named(
        sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    for u in ("a", "b"):
        sched.upsert_user(u)
    make_service(sched, "svc", interval=0, users=["a", "b"])
    ta = task(sched, "a", [f"a{i}@x.example" for i in range(10)])
    task(sched, "b", [f"b{i}@x.example" for i in range(10)])
    sched.set_user_limits("a", [{"name": "per_hour", "kind": "rolling", "max_count": 2,
                                 "window_seconds": 3600}])
    rows = claim2(conn, at(0), per_service=20, batch=20)
    users = [r["user_id"] for r in rows]
    assert users.count("a") == 2 and users.count("b") == 10
    conn.execute("INSERT INTO edm.dispatchers (dispatcher_id, hostname, pid, heartbeat_at)"
                 " VALUES ('d1', 'h', 1, %s)", (at(1),))
    reason, until = conn.execute("SELECT * FROM edm.task_wait_reason(%s, %s)",
                                 (ta, at(1))).fetchone() or (None, None)
    assert reason.startswith("user limit of a per_hour") and until is not None
    assert until > at(3600)
    rows = claim2(conn, at(3700), per_service=20)
    assert [r["user_id"] for r in rows] == ["a", "a"]


def test_task_limits_skip_the_task_for_the_users_other_task(
        sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a")
    make_service(sched, "svc", interval=0, users=["a"])
    slow = task(sched, "a", [f"s{i}@x.example" for i in range(10)], name="slow")
    fast = task(sched, "a", [f"f{i}@x.example" for i in range(10)], name="fast")
    sched.set_task_limits(slow, [rate("per_10s", 1, 10)])
    tasks = [r["task_id"] for r in claim2(conn, at(0), per_service=8, batch=8)]
    assert tasks.count(slow) == 1 and tasks.count(fast) == 7
    tasks = [r["task_id"] for r in claim2(conn, at(5), per_service=8)]
    assert tasks == [fast, fast, fast]
    tasks = [r["task_id"] for r in claim2(conn, at(10), per_service=8)]
    assert tasks == [slow]


def test_the_global_limit_spaces_every_service_and_ends_the_claim(
        sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a")
    for n in range(3):
        make_service(sched, f"s{n}", interval=0, users=["a"])
    task(sched, "a", [f"r{i}@x.example" for i in range(30)])
    sched.set_global_limits([rate("per_second", 2, 1)])
    rows = claim2(conn, at(0), per_service=5, lookahead_ms=1000)
    slots = sorted((r["send_at"] - at(0)).total_seconds() for r in rows)
    assert slots == [0.0, 0.5, 1.0]
    assert claim2(conn, at(0.2), per_service=5, lookahead_ms=0) == []


def test_a_shared_limit_locked_by_another_claim_counts_as_no_headroom(
        sched: Scheduler, conn: psycopg.Connection[Any], dsn: str) -> None:
    """Claims never wait: a site limit row held by a concurrent claim is skipped."""
    sched.upsert_user("a")
    make_service(sched, "s1", interval=0, users=["a"])
    task(sched, "a", GMAIL + YAHOO)
    sched.set_site_limits("google", [rate("per_second", 100, 1, burst=100)])
    with psycopg.connect(dsn) as other:
        # what a concurrent claim that took a google slot holds until it commits
        other.execute("SELECT 1 FROM edm.shaping_limits WHERE site = 'google' FOR UPDATE")
        conn.execute("SET lock_timeout = '2s'")
        rows = claim2(conn, at(0), owner="d2", per_service=10)
        assert sites(rows) == ["yahoo"] * 5
        other.rollback()
    rows = claim2(conn, at(1), owner="d2", per_service=10)
    assert sites(rows) == ["google"] * 5


def test_transactional_work_goes_first_and_bulk_keeps_its_share(
        sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    for u in ("bulk", "app"):
        sched.upsert_user(u)
    make_service(sched, "svc", interval=1, users=["bulk", "app"])
    task(sched, "bulk", [f"b{i}@x.example" for i in range(50)])
    t0 = task(sched, "app", [f"n{i}@x.example" for i in range(30)], name="news")
    for i in range(12):
        sched.send_message("app", f"reset{i}@x.example",
                           {"subject": "Reset", "body_text": "Your code"}, scheduled_at=T0)
    kinds = []
    for k in range(20):
        rows = claim2(conn, at(k), per_service=1, lookahead_ms=0)
        assert len(rows) == 1
        r = rows[0]
        kinds.append("tx" if r["email"].startswith("reset") else
                     "bulk" if r["user_id"] == "bulk" else "news")
        complete(conn, at(k + 0.5), [r["subtask_id"]])
    # share 0.8: four transactional slots, then one in the fair rotation (app was
    # just served: bulk's turn), until the twelve messages are out
    assert kinds[:5] == ["tx"] * 4 + ["bulk"]
    assert kinds[5:10] == ["tx"] * 4 + ["bulk"]
    assert kinds[10:14] == ["tx"] * 4
    assert kinds[14:] == ["bulk", "news"] * 3
    assert t0 > 0
    with pytest.raises(errors.InvalidInput):
        sched.send_message("app", "not an address", {"subject": "x", "body_text": "y"})


def test_share_one_lets_transactional_work_take_every_slot(
        sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a")
    make_service(sched, "svc", interval=1, users=["a"])
    task(sched, "a", [f"b{i}@x.example" for i in range(5)])
    tx = task(sched, "a", [f"t{i}@x.example" for i in range(6)], name="tx", transactional=True)
    conn.execute("SELECT edm.config_set('queue.transactional_share', '1')")
    got = [claim2(conn, at(k))[0]["task_id"] for k in range(6)]
    assert got == [tx] * 6


def test_setters_replace_a_scope_keep_state_and_refuse_bad_input(
        sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a")
    make_service(sched, "svc", interval=0, users=["a"])
    tid = task(sched, "a", [f"r{i}@x.example" for i in range(5)])
    sched.set_user_limits("a", [rate("per_min", 1, 60)])
    flag = "SELECT has_limits FROM edm.users WHERE user_id = 'a'"
    assert conn.execute(flag).fetchone() == (True,)
    assert len(claim2(conn, at(0), per_service=5)) == 1
    # unchanged: keeps its state (no fresh burst); a new one is added
    assert sched.set_user_limits("a", [rate("per_min", 1, 60), rate("per_day", 100, 86400)]) == 2
    assert claim2(conn, at(1), per_service=5) == []
    assert sched.set_user_limits("a", []) == 0
    assert conn.execute(flag).fetchone() == (False,)
    bad: list[tuple[str, tuple[Any, ...], str]] = [
        ("SELECT edm.set_user_limits('a', %s)", ('[{"name": "x"}]',), "ED005"),
        ("SELECT edm.set_user_limits('a', %s)",
         ('[{"name": "x", "kind": "rate", "max_count": 1}]',), "ED005"),
        ("SELECT edm.set_user_limits('a', %s)",
         (json.dumps([{"name": "x", "kind": "calendar_day", "max_count": 1},
                      {"name": "x", "kind": "calendar_day", "max_count": 2}]),), "ED005"),
        ("SELECT edm.set_user_limits('nobody', '[]')", (), "ED001"),
        ("SELECT edm.set_task_limits(999999, '[]')", (), "ED001"),
        ("SELECT edm.set_site_limits('nosuchsite', '[]')", (), "ED001"),
        ("SELECT edm.set_site_limits('google', '[]', 999999)", (), "ED001"),
        ("SELECT edm.set_global_limits('{}')", (), "ED005"),
        ("SELECT edm.set_task_transactional(999999, true)", (), "ED001"),
    ]
    sched.set_global_limits([rate("keep", 5, 1)])
    for sql, params, code in bad:
        with pytest.raises(psycopg.Error) as err:
            conn.execute(sql, params or None)
        assert err.value.sqlstate == code, sql
    # nothing half-written
    assert [r.limit_name for r in sched.shaping_limits()] == ["keep"]
    with pytest.raises(errors.InvalidInput):
        sched.set_task_limits(tid, [{"name": "x", "kind": "rate", "max_count": 1}])
    with pytest.raises(errors.InvalidInput):
        sched.shaping_limits("planet")
    sched.cancel_task(tid)
    with pytest.raises(errors.InvalidTransition):
        sched.set_task_transactional(tid, True)


# ---------------------------------------------------------------------------
# Property: every layer holds, recomputed from the slots handed out
# ---------------------------------------------------------------------------

limit_st = shaping_limit_st(max_burst=2, max_rolling=6)
layers_st = st.fixed_dictionaries({
    "global": st.none() | limit_st,
    "google": st.none() | limit_st,
    "yahoo_s0": st.none() | limit_st,
    "user_a": st.none() | limit_st,
    "task_b0": st.none() | limit_st,
})


def _violations(slots: list[float], lim: dict[str, Any]) -> list[tuple[float, int]]:
    """Windows [t, t + w) holding more sends than the limit allows."""
    w = lim["window_seconds"]
    cap = lim["max_count"] + (lim.get("burst", 1) - 1 if lim["kind"] == "rate" else 0)
    s = sorted(slots)
    out = []
    for i, t in enumerate(s):
        n = sum(1 for x in s[i:] if x < t + w - 1e-6)
        if n > cap:
            out.append((t, n))
    return out


@pytest.mark.slow
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(layers=layers_st,
       claims=st.lists(st.tuples(st.integers(0, 1500), st.integers(1, 4), st.booleans()),
                       min_size=4, max_size=14))
def test_random_claims_never_exceed_any_layer(dsn: str, layers: dict[str, Any],
                                              claims: list[tuple[int, int, bool]]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn, Scheduler(dsn) as s:
        conn.execute("TRUNCATE edm.services, edm.users, edm.tasks, edm.subtasks,"
                     " edm.shaping_limits, edm.site_suspensions CASCADE")
        for u in ("a", "b"):
            s.upsert_user(u)
        svcs = [make_service(s, f"s{n}", interval=0, users=["a", "b"]) for n in range(2)]
        mix = [f"{{}}{i}@{d}" for i in range(8) for d in ("gmail.com", "yahoo.com", "x.example")]
        ta = task(s, "a", [m.format("a") for m in mix], name="a0")
        tb0 = task(s, "b", [m.format("b0") for m in mix], name="b0")
        task(s, "b", [m.format("b1") for m in mix], name="b1", transactional=True)

        def named(lim: dict[str, Any]) -> list[dict[str, Any]]:
            return [{"name": "l", **lim}]
        if layers["global"]:
            s.set_global_limits(named(layers["global"]))
        if layers["google"]:
            s.set_site_limits("google", named(layers["google"]))
        if layers["yahoo_s0"]:
            s.set_site_limits("yahoo", named(layers["yahoo_s0"]), service_id=svcs[0])
        if layers["user_a"]:
            s.set_user_limits("a", named(layers["user_a"]))
        if layers["task_b0"]:
            s.set_task_limits(tb0, named(layers["task_b0"]))
        t = 0.0
        got: list[dict[str, Any]] = []
        for gap, per, done in claims:
            t += gap / 1000
            rows = claim2(conn, at(t), per_service=per, batch=6, lookahead_ms=250)
            got += rows
            if done and rows:
                complete(conn, at(t), [r["subtask_id"] for r in rows])
        assert counters_match(conn) == []
    when = {id(r): (r["send_at"] - at(0)).total_seconds() for r in got}
    checks = {
        "global": [r for r in got],
        "google": [r for r in got if r["site"] == "google"],
        "yahoo_s0": [r for r in got if r["site"] == "yahoo" and r["service_id"] == svcs[0]],
        "user_a": [r for r in got if r["user_id"] == "a"],
        "task_b0": [r for r in got if r["task_id"] == tb0],
    }
    for layer, lim in layers.items():
        if lim:
            bad = _violations([when[id(r)] for r in checks[layer]], lim)
            assert not bad, (layer, lim, bad)
    assert len({r["subtask_id"] for r in got}) == len(got)
    assert ta > 0


def test_an_idle_shared_bucket_counts_a_send_as_arriving_up_to_the_margin_late(
        sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    """A provider's idle bucket starts from a send's arrival, which another lane may
    make a few ms after its slot: the claim counts it queue.shaping_arrival_margin_ms
    late, so the next on-time send is not early as the provider counts."""
    sched.monitoring.config_set("queue.shaping_arrival_margin_ms", 25)
    sched.upsert_user("a")
    make_service(sched, "svc", interval=0, users=["a"])
    task(sched, "a", GMAIL)
    # two per 2 s with a burst of 2: a tolerance of 1 s, so the whole margin applies
    assert sched.set_site_limits("google", [rate("per_2s", 2, 2, burst=2)]) == 1
    assert len(claim2(conn, at(0), per_service=10)) == 1  # without the margin: 2 at once
    assert claim2(conn, at(0.02), per_service=10) == []
    assert len(claim2(conn, at(0.025), per_service=10)) == 1
    # a limit without a burst has no tolerance to spend: no margin
    assert sched.set_site_limits("google", [rate("per_second", 1, 1)]) == 1
    assert len(claim2(conn, at(10), per_service=10)) == 1
    assert len(claim2(conn, at(11), per_service=10)) == 1
