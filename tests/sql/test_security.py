"""Least privilege, SECURITY DEFINER hardening, the audit trail and secrets."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest
from psycopg import conninfo, sql

from edm_sched import errors
from edm_sched.api import Scheduler
from edm_sched.dispatcher import run_dispatcher
from edm_sched.migrations import migrate
from edm_sched.testing.smtp_sink import SmtpSink
from edm_sched.transports.null import NullTransport
from edm_sched.transports.smtp import SmtpTransport
from tests.support.helpers import make_service, make_task

SECRET = "s3cr3t-Pa55w0rd"


def test_writing_functions_are_security_definer_with_fixed_search_path(
        conn: psycopg.Connection[Any]) -> None:
    loose = conn.execute("""
        SELECT p.oid::regprocedure::text FROM pg_proc p
        WHERE p.pronamespace = 'edm'::regnamespace AND p.provolatile = 'v' AND p.prokind = 'f'
          AND p.prorettype <> 'trigger'::regtype
          AND p.proname NOT IN ('harden_functions', 'install_roles', 'share_staged')
          AND NOT (p.prosecdef AND p.proconfig @> ARRAY['search_path=pg_catalog, pg_temp'])
        """).fetchall()
    assert loose == []
    public = conn.execute("""
        SELECT p.oid::regprocedure::text FROM pg_proc p
        WHERE p.pronamespace = 'edm'::regnamespace
          AND has_function_privilege('public', p.oid, 'EXECUTE')""").fetchall()
    assert public == []


def _refused(dsn: str, statement: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c, pytest.raises(
            psycopg.errors.InsufficientPrivilege):
        c.execute(statement.encode())


def test_each_role_can_do_its_job_and_nothing_more(roles: dict[str, str]) -> None:
    # The host application: users, services, grants, tasks (COPY staging), lifecycle.
    with Scheduler(roles["app"], actor="alice@host") as app:
        app.upsert_user("u1", quota_limit=100)
        svc = make_service(app, "svc", interval=0, users=["u1"])
        task = make_task(app, "u1", 5)
        app.upsert_contacts("u1", [{"email": "c@r.example", "tags": ["t"]}])
        assert app.get_task(task).total_count == 5
        app.pause_task(task)
        app.resume_task(task)
    from edm_sched.jobs.api import JobScheduler

    job = JobScheduler(roles["app"]).create_job(
        {"name": "nightly", "cron": "0 3 * * *", "target": {"kind": "function",
                                                           "function": "cleanup"}})
    assert job.job_id > 0
    for statement in ("UPDATE edm.tasks SET status = 'completed'",
                      "DELETE FROM edm.subtasks",
                      "SELECT * FROM edm.claim('x', 1)",
                      "SELECT * FROM edm.suppressions",
                      "UPDATE edm.services SET daily_quota = 1"):
        _refused(roles["app"], statement)

    # The dispatcher: claims, completes, sweeps, renders — through a real run.
    stop = threading.Event()
    th = threading.Thread(target=run_dispatcher, args=(roles["dispatcher"], NullTransport()),
                          kwargs={"stop_event": stop, "handle_signals": False})
    th.start()
    try:
        with Scheduler(roles["app"]) as app:
            deadline = time.monotonic() + 20
            while app.get_task(task).status != "completed" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert app.get_task(task).sent_count == 5
    finally:
        stop.set()
        th.join(30)
    with psycopg.connect(roles["dispatcher"], autocommit=True) as c:
        assert c.execute("SELECT edm.run_sweeps()").fetchone() is not None
    for statement in ("SELECT edm.create_service('x', ARRAY['a@b.example'], 0, 1)",
                      f"SELECT edm.pause_task({task})",
                      "SELECT edm.config_set('sweep.interval', '2')",
                      "UPDATE edm.services SET enabled = false",
                      "SELECT * FROM edm.suppressions",
                      "DELETE FROM edm.tasks"):
        _refused(roles["dispatcher"], statement)

    # Monitoring: reads everything, changes nothing.
    with psycopg.connect(roles["monitor"], autocommit=True) as c:
        assert c.execute("SELECT count(*) FROM edm.task_wait_reasons").fetchone() is not None
        assert c.execute("SELECT services_total FROM edm.system_health").fetchone() == (1,)
        assert c.execute("SELECT count(*) FROM edm.audit_log").fetchone() is not None
    for statement in ("SELECT * FROM edm.claim('x', 1)",
                      f"SELECT edm.cancel_task({task})",
                      f"UPDATE edm.services SET enabled = false WHERE service_id = {svc}",
                      "INSERT INTO edm.users (user_id) VALUES ('intruder')"):
        _refused(roles["monitor"], statement)


def test_non_superuser_schema_owner(empty_dsn: str, edm_pg_server: Any) -> None:
    """Installed by an ordinary role, the definer functions still read COPY staging tables."""
    tag = uuid.uuid4().hex[:8]
    owner, app = f"t_owner_{tag}", f"t_app_{tag}"
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        c.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(owner)))
        c.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
            sql.Identifier(c.info.dbname), sql.Identifier(owner)))
    try:
        migrate(conninfo.make_conninfo(empty_dsn, user=owner))
        with psycopg.connect(empty_dsn, autocommit=True) as c:
            c.execute("SELECT edm.install_roles()")
            c.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE edm_app").format(sql.Identifier(app)))
        with Scheduler(conninfo.make_conninfo(empty_dsn, user=app)) as s:
            s.upsert_user("u")
            created = s.create_task({"user_id": "u", "name": "n",
                                     "templates": [{"subject": "s", "body_text": "b"}],
                                     "recipients": [{"email": "a@r.example"}]})
            assert created.recipients == 1
            s.upsert_contacts("u", [{"email": "x@r.example"}])
    finally:
        with psycopg.connect(empty_dsn, autocommit=True) as c:
            for role in (app, owner):
                c.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                c.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_audit_trail_records_administrative_changes(dsn: str,
                                                    conn: psycopg.Connection[Any]) -> None:
    # what the migrations changed is there too (0024 moved a setting's default)
    row = conn.execute("SELECT max(audit_id) FROM edm.audit_log").fetchone()
    before = row[0] if row and row[0] is not None else 0
    with Scheduler(dsn, actor="ops@host") as s:
        s.upsert_user("u", quota_limit=50)
        s.set_user_quota("u", 80)
        svc = make_service(s, "svc", interval=1, users=["u"])
        s.disable_service(svc)
        task = make_task(s, "u", 3)
        s.pause_task(task)
        s.resume_task(task)
        s.cancel_task(task)
    conn.execute("SELECT edm.config_set('sweep.interval', '3', 'cli')")
    conn.execute("UPDATE edm.users SET last_served_seq = 99")  # runtime state: not audited
    rows = conn.execute("SELECT actor, action, object_type, object_id, before, after "
                        "FROM edm.audit_log WHERE audit_id > %s ORDER BY audit_id",
                        (before,)).fetchall()
    kinds = [(r[2], r[1]) for r in rows]
    assert kinds == [("user", "insert"), ("user", "update"), ("service", "insert"),
                     ("grant", "insert"), ("service", "update"), ("task", "insert"),
                     ("task", "update"), ("task", "update"), ("task", "update"),
                     ("config", "update")]
    assert {r[0] for r in rows[:-1]} == {"ops@host"}
    quota = rows[1]
    assert (quota[4]["quota_limit"], quota[5]["quota_limit"]) == (50, 80)
    assert [r[5]["status"] for r in rows[6:9]] == ["paused", "sending", "cancelled"]
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("DELETE FROM edm.audit_log")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("UPDATE edm.audit_log SET actor = 'someone else'")


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_secrets_never_stored_or_shown(dsn: str, conn: psycopg.Connection[Any],
                                       caplog: pytest.LogCaptureFixture) -> None:
    with Scheduler(dsn) as s, pytest.raises(errors.InvalidInput, match="must not hold secrets"):
        s.create_service({"name": "x", "from_addresses": ["a@b.example"],
                          "interval_seconds": 0, "daily_quota": 1,
                          "settings": {"host": "h", "password": SECRET}})
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("SELECT edm.create_service('x', ARRAY['a@b.example'], 0, 1, 'smtp', "
                     "%s::jsonb)", (f'{{"password": "{SECRET}"}}',))
    caplog.set_level(logging.DEBUG)
    with SmtpSink(credentials={"mailer": "the-right-one"}) as sink, Scheduler(dsn) as s:
        s.upsert_user("u")
        sid = s.create_service({"name": "auth", "from_addresses": ["m@x.example"],
                                "interval_seconds": 0, "daily_quota": 10,
                                "credential_ref": "SMTP_PASSWORD_AUTH",
                                "settings": {"host": "127.0.0.1", "port": sink.port,
                                             "username": "mailer"}})
        s.grant(sid, "u")
        task = make_task(s, "u", 1)
        stop = threading.Event()
        transport = SmtpTransport(lambda ref: SECRET if ref == "SMTP_PASSWORD_AUTH" else None)
        th = threading.Thread(target=run_dispatcher, args=(dsn, {"smtp": transport}),
                              kwargs={"stop_event": stop, "handle_signals": False})
        th.start()
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                row = conn.execute("SELECT health FROM edm.services WHERE service_id = %s",
                                   (sid,)).fetchone()
                if row == ("backoff",):
                    break
                time.sleep(0.05)
        finally:
            stop.set()
            th.join(30)
        assert s.get_task(task).pending_count == 1  # a service failure uses no attempt
    dump = conn.execute("""
        SELECT string_agg(x::text, ' ') FROM (
          SELECT to_jsonb(s) x FROM edm.services s UNION ALL
          SELECT to_jsonb(e) FROM edm.send_events e UNION ALL
          SELECT to_jsonb(a) FROM edm.audit_log a UNION ALL
          SELECT to_jsonb(v) FROM edm.service_status v UNION ALL
          SELECT to_jsonb(st) FROM edm.subtasks st) t""").fetchone()
    assert dump is not None and dump[0]
    assert "535" in dump[0]  # the authentication failure is recorded...
    assert SECRET not in dump[0]  # ...without the password
    assert SECRET not in caplog.text


def test_job_runs_are_not_audited_but_job_changes_are(dsn: str,
                                                      conn: psycopg.Connection[Any]) -> None:
    from edm_sched.jobs.api import JobScheduler

    jobs = JobScheduler(dsn)
    job = jobs.create_job({"name": "j", "cron": "* * * * *",
                           "target": {"kind": "function", "function": "f"}})
    jobs.trigger_job(job.job_id)
    conn.execute("UPDATE edm.jobs SET run_count = run_count + 5, next_run_at = now()")
    jobs.pause_job(job.job_id)
    actions = conn.execute("SELECT action, after ->> 'status' FROM edm.audit_log "
                           "WHERE object_type = 'job' ORDER BY audit_id").fetchall()
    assert actions == [("insert", "active"), ("update", "paused")]
