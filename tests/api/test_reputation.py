"""The reputation breaker (issue 16, I10): bounce and complaint rates per service
and per user over a rolling window, judged only on enough sends; pauses with a named
reason and an alert; resumed only by an explicit API or CLI call. Real PostgreSQL:
sends go through edm.claim / edm.complete, feedback through edm.record_feedback."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from edm_sched import errors, feedback, reputation, sweeps
from edm_sched.api import Scheduler
from edm_sched.feedback import FeedbackEvent
from edm_sched.unsubscribe import UnsubscribeConfig, make_token
from tests.support.helpers import T0, at, claim, complete, counters_match

TEMPLATE = {"subject": "s", "body_text": "b"}


def sends(conn: psycopg.Connection[Any], n: int,
          when: dt.datetime | None = None) -> list[dict[str, Any]]:
    """Claim and complete n subtasks as sent, one claim at a time, at ``when``."""
    when = when or at(1)
    done: list[dict[str, Any]] = []
    while len(done) < n and (rows := claim(conn, when, batch=1)):
        complete(conn, when, [r["subtask_id"] for r in rows])
        done += rows
    # the sweeps' roll-up
    conn.execute("SELECT edm.roll_up_metrics(%s)", (when + dt.timedelta(seconds=100),))
    return done


def mid(row: dict[str, Any]) -> str:
    return f"<edm.{row['task_id']}.{row['subtask_id']}@s1.example>"


@pytest.fixture
def world(dsn: str, conn: psycopg.Connection[Any]) -> Iterator[dict[str, Any]]:
    with Scheduler(dsn) as s:
        for u in ("bad", "good"):
            s.upsert_user(u)
        s1 = s.create_service({"name": "s1", "from_addresses": ["news@s1.example"],
                               "interval_seconds": 0, "daily_quota": 100_000, "transport": "null"})
        s.grant(s1, "bad")
        conn.execute("SELECT edm.config_set('reputation.min_sends', '50')")

        def task(user: str, name: str, n: int, **kw: Any) -> int:
            return s.create_task({"user_id": user, "name": name, "templates": [TEMPLATE],
                                  "scheduled_at": T0, **kw,
                                  "recipients": [{"email": f"{name}{i}@rcpt.example"}
                                                 for i in range(n)]}).task_id

        yield {"s": s, "conn": conn, "dsn": dsn, "s1": s1, "task": task}


def test_hard_bounces_pause_the_service_and_the_users_bulk_tasks(world: dict[str, Any]) -> None:
    s, conn, task = world["s"], world["conn"], world["task"]
    bulk = task("bad", "bulk", 100)
    sent = sends(conn, 60)
    receipts = task("bad", "receipts", 3, list_unsubscribe=False)
    later = task("bad", "later", 3, scheduled_at=at(86400))
    feedback.record_many(conn, [FeedbackEvent("hard_bounce", mid(r)) for r in sent[:4]],
                         now=at(100))

    assert reputation.check(conn, now=at(120)) == 2  # the service and the user: 4/60 = 6.7 %
    svc = conn.execute("SELECT enabled, paused_reason FROM edm.services").fetchone()
    assert svc is not None and svc[0] is False
    assert "6.667% hard bounces (4)" in svc[1] and "60 sends" in svc[1]
    statuses = dict(conn.execute("SELECT task_id, status FROM edm.tasks").fetchall())
    assert (statuses[bulk], statuses[later]) == ("paused", "paused")
    assert statuses[receipts] == "scheduled"  # transactional mail is not paused
    reasons = conn.execute("SELECT DISTINCT pause_reason FROM edm.tasks WHERE status = 'paused'"
                           ).fetchall()
    assert len(reasons) == 1 and "hard bounces" in reasons[0][0]
    alerts = conn.execute("SELECT severity, service_id, user_id FROM edm.alerts"
                          " WHERE kind = 'reputation' ORDER BY alert_id").fetchall()
    assert alerts == [("critical", world["s1"], None), ("critical", None, "bad")]
    assert reputation.check(conn, now=at(121)) == 0  # paced: less than a minute ago
    assert reputation.check(conn, now=at(200)) == 0  # already paused: nothing new

    # held: a hand resume is refused, a new bulk task does not start
    with pytest.raises(errors.InvalidTransition, match="reputation"):
        s.resume_task(bulk)
    fresh = task("bad", "fresh", 2)
    conn.execute("SELECT edm.start_due_tasks(%s)", (at(130),))
    assert s.get_task(fresh).status == "paused"
    assert counters_match(conn) == []

    # explicit resume: the window restarts, the breaker's pauses are lifted
    assert reputation.resume_user(world["dsn"], "bad", now=at(300)) == 3
    statuses = dict(conn.execute("SELECT task_id, status FROM edm.tasks").fetchall())
    assert (statuses[bulk], statuses[fresh], statuses[later]) == ("sending", "sending",
                                                                   "scheduled")
    assert reputation.resume_service(world["dsn"], world["s1"], now=at(300)) is True
    assert conn.execute("SELECT enabled, paused_reason FROM edm.services").fetchone() == (
        True, None)
    assert conn.execute("SELECT count(*) FROM edm.alerts WHERE kind = 'reputation'"
                        " AND resolved_at IS NULL").fetchone() == (0,)
    assert reputation.check(conn, now=at(400)) == 0  # old bounces no longer count
    assert reputation.resume_service(world["dsn"], world["s1"]) is False
    with pytest.raises(errors.NotFound):
        reputation.resume_user(world["dsn"], "nobody")


def test_complaints_pause_at_a_third_of_a_percent(world: dict[str, Any]) -> None:
    conn, task = world["conn"], world["task"]
    task("bad", "bulk", 60)
    sent = sends(conn, 60)
    feedback.record(conn, FeedbackEvent("complaint", mid(sent[0])), now=at(100))  # 1.7 %
    assert reputation.check(conn, now=at(120)) == 2
    rows = {r.subject: r for r in reputation.status(conn, now=at(120))}
    assert rows["user"].complaint_pct == pytest.approx(1.667)
    assert rows["user"].paused_reason is not None and "complaints (1)" in rows["user"].paused_reason


def test_a_small_sample_is_never_judged(world: dict[str, Any]) -> None:
    conn, task = world["conn"], world["task"]
    conn.execute("SELECT edm.config_set('reputation.min_sends', '1000')")  # the default
    task("bad", "bulk", 3)
    sent = sends(conn, 3)
    feedback.record(conn, FeedbackEvent("hard_bounce", mid(sent[0])), now=at(100))  # 33 %
    assert reputation.check(conn, now=at(120)) == 0
    (row, _) = sorted(reputation.status(conn, now=at(120)), key=lambda r: r.subject)
    assert (row.sends, row.hard_bounces, row.judged) == (3, 1, False)
    assert conn.execute("SELECT enabled FROM edm.services").fetchone() == (True,)


def test_warnings_below_the_pause_threshold(world: dict[str, Any]) -> None:
    conn, task = world["conn"], world["task"]
    task("bad", "bulk", 100)
    sent = sends(conn, 100)
    feedback.record_many(conn, [FeedbackEvent("hard_bounce", mid(r)) for r in sent[:3]],
                         now=at(100))  # 3 %: warn at 2, pause at 5
    assert reputation.check(conn, now=at(120)) == 2
    assert conn.execute("SELECT DISTINCT severity FROM edm.alerts").fetchall() == [("warning",)]
    assert conn.execute("SELECT enabled FROM edm.services").fetchone() == (True,)
    assert reputation.check(conn, now=at(200)) == 0  # the open warnings are not raised again
    conn.execute("SELECT edm.config_set('reputation.bounce_warn_pct', '4')")
    reputation.check(conn, now=at(300))
    assert conn.execute("SELECT count(*) FROM edm.alerts WHERE resolved_at IS NULL"
                        ).fetchone() == (0,)


def test_the_sweep_runs_the_breaker_and_the_cli_resumes(world: dict[str, Any]) -> None:
    conn, task = world["conn"], world["task"]
    task("bad", "bulk", 70)
    sent = sends(conn, 60, dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))
    feedback.record_many(conn, [FeedbackEvent("hard_bounce", mid(r)) for r in sent[:10]])
    report = sweeps.sweep(world["dsn"])
    assert report["reputation_raised"] == 2
    assert {a["kind"] for a in report["alerts"]} >= {"reputation"}

    def cli(*args: str) -> dict[str, Any]:
        proc = subprocess.run([sys.executable, "-m", "edm_sched.cli", "reputation", *args,
                               "--dsn", world["dsn"], "--json"], capture_output=True, text=True,
                              timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return out

    assert {r["subject"] for r in cli("status")["rows"] if r["paused_reason"]} == {"service",
                                                                                  "user"}
    assert cli("resume", "--service", str(world["s1"]))["was_paused"] is True
    assert cli("resume", "--user", "bad")["tasks_resumed"] == 1
    assert conn.execute("SELECT count(*) FROM edm.alerts WHERE resolved_at IS NULL"
                        " AND kind = 'reputation'").fetchone() == (0,)


def test_each_role_may_do_its_part(roles: dict[str, str]) -> None:
    """The app records feedback, unsubscribes and resumes; the dispatcher's sweep runs the
    breaker; monitoring reads the rates (edm.install_roles grants the 0009 functions)."""
    with Scheduler(roles["app"]) as app:
        app.upsert_user("u1")
        svc = app.create_service({"name": "s", "from_addresses": ["n@s.example"],
                                  "interval_seconds": 0, "daily_quota": 10, "transport": "null"})
        app.grant(svc, "u1")
        task = app.create_task({"user_id": "u1", "name": "n", "templates": [TEMPLATE],
                                "scheduled_at": T0, "recipients": [{"email": "a@r.example"}]})
        got = app.record_feedback(
            FeedbackEvent("hard_bounce", f"<edm.{task.task_id}.1@s.example>"))
        assert got.suppressed
        config = UnsubscribeConfig(key=b"k" * 32, url="https://u.example/")
        assert app.unsubscribe(config, make_token(config, "u1", "b@r.example")).suppressed
        assert app.resume_service_reputation(svc) is False
        assert app.resume_user_reputation("u1") == 0
        assert isinstance(app.reputation(), list)
    assert "reputation_raised" in sweeps.sweep(roles["dispatcher"])
    with psycopg.connect(roles["monitor"], autocommit=True) as c:
        assert c.execute("SELECT count(*) FROM edm.reputation_status").fetchone() is not None
