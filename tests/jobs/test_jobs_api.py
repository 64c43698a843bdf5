"""The Python API of recurring jobs against a real database: definitions, actions, error codes."""

from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg
import pytest

from edm_sched import db, errors
from edm_sched.jobs import (
    InvalidCronExpression,
    InvalidJobConfig,
    JobAlreadyRunning,
    JobNotFound,
    JobQuotaExceeded,
    JobScheduler,
    LockAcquisitionFailed,
)
from edm_sched.jobs.errors import ExecutionNotFound

T0 = dt.datetime(2026, 1, 5, 10, 1, tzinfo=dt.UTC)


class Clock:
    def __init__(self, t: dt.datetime = T0) -> None:
        self.t = t

    def __call__(self) -> dt.datetime:
        return self.t


def fn_job(name: str = "j", cron: str = "*/10 * * * *", **extra: Any) -> dict[str, Any]:
    return {"name": name, "cron": cron, "target": {"kind": "function", "function": "noop"},
            **extra}


@pytest.fixture
def sched(dsn: str) -> JobScheduler:
    return JobScheduler(dsn, now=Clock())


def test_create_computes_and_stores_the_next_run(sched: JobScheduler,
                                                 conn: psycopg.Connection[Any]) -> None:
    job = sched.create_job(fn_job(cron="30 2 * * *", timezone="Europe/Paris", user_id="t1",
                                  tags=["nightly"], priority=5))
    assert job.status == "active"
    assert job.next_run_at == dt.datetime(2026, 1, 6, 1, 30, tzinfo=dt.UTC)  # 02:30 CET
    row = conn.execute("SELECT next_run_at, timezone, kind FROM edm.jobs WHERE job_id = %s",
                       (job.job_id,)).fetchone()
    assert row == (job.next_run_at, "Europe/Paris", "function")
    assert sched.get_job(job.job_id) == job


def test_create_paused_and_future_start(sched: JobScheduler) -> None:
    paused = sched.create_job(fn_job("p", status="paused"))
    assert paused.status == "paused" and paused.next_run_at is None
    later = sched.create_job(fn_job("later", start_at=dt.datetime(2026, 2, 1, tzinfo=dt.UTC)))
    assert later.next_run_at == dt.datetime(2026, 2, 1, tzinfo=dt.UTC)


def test_invalid_definitions_have_typed_codes(sched: JobScheduler) -> None:
    with pytest.raises(InvalidCronExpression, match="Bad minute") as info:
        sched.create_job(fn_job(cron="99 * * * *"))
    assert info.value.code == "INVALID_CRON_EXPRESSION"
    cases: list[dict[str, Any]] = [
        fn_job(timezone="Nowhere/City"),
        fn_job(target={"kind": "function", "function": "bad name"}),
        fn_job(target={"kind": "http", "url": "ftp://example.com/"}),
        fn_job(target={"kind": "teleport"}),
        fn_job(start_at=T0, end_at=T0 - dt.timedelta(days=1)),
        fn_job(max_concurrent=0),
        fn_job(retry={"retry_on": ["not-a-kind"]}),
        fn_job(end_at=T0 - dt.timedelta(days=1)),  # no occurrence left
        fn_job(start_at=dt.datetime(2026, 1, 1)),  # naive datetime
    ]
    for spec in cases:
        with pytest.raises(InvalidJobConfig) as err:
            sched.create_job(spec)
        assert err.value.code == "INVALID_JOB_CONFIG"
    sched.create_job(fn_job("dup"))
    with pytest.raises(InvalidJobConfig, match="already exists"):
        sched.create_job(fn_job("dup"))
    assert sched.list_jobs() and len(sched.list_jobs()) == 1  # nothing half-written


def test_shell_jobs_need_the_setting(sched: JobScheduler, conn: psycopg.Connection[Any]) -> None:
    shell = fn_job("sh", target={"kind": "shell", "command": ["true"]})
    with pytest.raises(InvalidJobConfig, match=r"jobs\.shell_enabled"):
        sched.create_job(shell)
    conn.execute("UPDATE edm.config SET value = 'true' WHERE key = 'jobs.shell_enabled'")
    assert sched.create_job(shell).kind == "shell"


def test_tenant_quota(sched: JobScheduler, conn: psycopg.Connection[Any]) -> None:
    conn.execute("UPDATE edm.config SET value = '2' WHERE key = 'jobs.max_jobs_per_user'")
    sched.create_job(fn_job("a", user_id="t1"))
    sched.create_job(fn_job("b", user_id="t1"))
    with pytest.raises(JobQuotaExceeded) as info:
        sched.create_job(fn_job("c", user_id="t1"))
    assert info.value.code == "QUOTA_EXCEEDED"
    assert isinstance(info.value, errors.QuotaExceeded)
    sched.create_job(fn_job("c", user_id="t2"))  # other tenants are not affected


def test_unknown_and_foreign_ids(sched: JobScheduler) -> None:
    job = sched.create_job(fn_job(user_id="t1"))
    for call in (lambda: sched.get_job(999), lambda: sched.get_job(job.job_id, user_id="t2"),
                 lambda: sched.trigger_job(999), lambda: sched.pause_job(999),
                 lambda: sched.resume_job(999), lambda: sched.stop_job(999),
                 lambda: sched.delete_job(999), lambda: sched.update_job(999, {"priority": 1})):
        with pytest.raises(JobNotFound) as info:
            call()
        assert info.value.code == "JOB_NOT_FOUND"
    with pytest.raises(ExecutionNotFound):
        sched.get_execution(12345)
    with pytest.raises(ExecutionNotFound):
        sched.cancel_execution(12345)


def test_trigger_respects_max_concurrent(sched: JobScheduler) -> None:
    job = sched.create_job(fn_job(max_concurrent=1))
    ex = sched.trigger_job(job.job_id)
    assert (ex.trigger, ex.status, ex.scheduled_for) == ("manual", "pending", None)
    with pytest.raises(JobAlreadyRunning) as info:
        sched.trigger_job(job.job_id)
    assert info.value.code == "JOB_ALREADY_RUNNING"
    sched.cancel_execution(ex.execution_id)
    assert sched.trigger_job(job.job_id).status == "pending"


def test_locked_job_raises_lock_acquisition_failed(dsn: str) -> None:
    sched = JobScheduler(dsn, now=Clock(), lock_timeout=0.2)
    job = sched.create_job(fn_job())
    with psycopg.connect(dsn) as holder:
        holder.execute("SELECT 1 FROM edm.jobs WHERE job_id = %s FOR UPDATE", (job.job_id,))
        for call in (lambda: sched.update_job(job.job_id, {"priority": 3}),
                     lambda: sched.trigger_job(job.job_id),
                     lambda: sched.pause_job(job.job_id),
                     lambda: sched.resume_job(job.job_id)):
            with pytest.raises(LockAcquisitionFailed) as info:
                call()
            assert info.value.code == "LOCK_ACQUISITION_FAILED"
        holder.rollback()
    assert sched.update_job(job.job_id, {"priority": 3}).priority == 3


def test_update_recomputes_next_run_only_for_schedule_changes(sched: JobScheduler) -> None:
    job = sched.create_job(fn_job())
    assert job.next_run_at == dt.datetime(2026, 1, 5, 10, 10, tzinfo=dt.UTC)
    same = sched.update_job(job.job_id, {"priority": 7, "tags": ["x"], "retry": {"max_retries": 2}})
    assert same.next_run_at == job.next_run_at
    assert (same.priority, same.tags, same.retry.max_retries) == (7, ["x"], 2)
    moved = sched.update_job(job.job_id, {"cron": "0 9 * * *", "timezone": "America/New_York"})
    assert moved.next_run_at == dt.datetime(2026, 1, 5, 14, tzinfo=dt.UTC)
    ended = sched.update_job(job.job_id, {"end_at": T0 + dt.timedelta(minutes=1)})
    assert (ended.status, ended.inactive_reason, ended.next_run_at) == (
        "inactive", "end_at reached", None)
    with pytest.raises(InvalidCronExpression):
        sched.update_job(job.job_id, {"cron": "nope"})


def test_pause_resume_stop(sched: JobScheduler) -> None:
    clock = sched._now
    assert isinstance(clock, Clock)
    job = sched.create_job(fn_job())
    paused = sched.pause_job(job.job_id)
    assert (paused.status, paused.next_run_at) == ("paused", None)
    assert sched.pause_job(job.job_id).status == "paused"  # idempotent
    clock.t = T0 + dt.timedelta(hours=3)
    resumed = sched.resume_job(job.job_id)
    # Occurrences during the pause are not runs to catch up: next is after now.
    assert resumed.next_run_at == dt.datetime(2026, 1, 5, 13, 10, tzinfo=dt.UTC)
    pending = sched.trigger_job(job.job_id)
    stopped = sched.stop_job(job.job_id)
    assert (stopped.status, stopped.inactive_reason) == ("inactive", "stopped")
    assert sched.get_execution(pending.execution_id).status == "cancelled"
    with pytest.raises(errors.InvalidTransition):
        sched.pause_job(job.job_id)
    assert sched.resume_job(job.job_id).status == "active"


def test_resume_refuses_exhausted_jobs(sched: JobScheduler, conn: psycopg.Connection[Any]) -> None:
    job = sched.create_job(fn_job(max_executions=1))
    conn.execute("UPDATE edm.jobs SET run_count = 1 WHERE job_id = %s", (job.job_id,))
    sched.stop_job(job.job_id)
    with pytest.raises(errors.InvalidTransition, match="max_executions"):
        sched.resume_job(job.job_id)


def test_delete_refuses_running_jobs_unless_forced(sched: JobScheduler,
                                                   conn: psycopg.Connection[Any]) -> None:
    job = sched.create_job(fn_job())
    sched.trigger_job(job.job_id)
    conn.execute("SELECT * FROM edm.job_claim('w1', 1, %s)", (T0,))
    with pytest.raises(JobAlreadyRunning, match="running"):
        sched.delete_job(job.job_id)
    sched.delete_job(job.job_id, force=True)
    with pytest.raises(JobNotFound):
        sched.get_job(job.job_id)
    assert conn.execute("SELECT count(*) FROM edm.job_executions").fetchone() == (0,)


def test_listing_filters_and_pages(sched: JobScheduler) -> None:
    for i in range(5):
        sched.create_job(fn_job(f"j{i}", user_id="a" if i % 2 else "b",
                                tags=["odd"] if i % 2 else []))
    assert [j.name for j in sched.list_jobs(user_id="a")] == ["j1", "j3"]
    assert [j.name for j in sched.list_jobs(tag="odd")] == ["j1", "j3"]
    first = sched.list_jobs(limit=2)
    assert [j.name for j in sched.list_jobs(limit=10, after_id=first[-1].job_id)] == [
        "j2", "j3", "j4"]
    assert sched.list_jobs(status="paused") == []


def test_validate_cron_preview() -> None:
    preview = JobScheduler.validate_cron("0 30 2 * * *", "Europe/Paris", count=2,
                                         after=dt.datetime(2024, 3, 30, 12, tzinfo=dt.UTC))
    assert preview.fields == 6 and preview.wall_clock
    assert preview.next_runs_local == ["2024-03-31T03:00:00+02:00", "2024-04-01T02:30:00+02:00"]


def test_retention_purges_old_history(sched: JobScheduler, conn: psycopg.Connection[Any]) -> None:
    job = sched.create_job(fn_job(max_concurrent=5))
    old = sched.trigger_job(job.job_id)
    new = sched.trigger_job(job.job_id)
    for ex in (old, new):
        sched.cancel_execution(ex.execution_id)
    conn.execute("UPDATE edm.config SET value = '7' WHERE key = 'jobs.execution_retention_days'")
    conn.execute("UPDATE edm.job_executions SET finished_at = %s WHERE execution_id = %s",
                 (T0 - dt.timedelta(days=8), old.execution_id))
    assert sched.purge_executions() == 1
    assert [e.execution_id for e in sched.list_executions(job_id=job.job_id)] == [new.execution_id]


def test_sqlstates_map_to_job_errors(conn: psycopg.Connection[Any]) -> None:
    for state, cls in (("ED010", JobNotFound), ("ED011", JobAlreadyRunning),
                       ("ED012", InvalidJobConfig), ("ED013", LockAcquisitionFailed),
                       ("ED014", JobQuotaExceeded)):
        with pytest.raises(psycopg.Error) as info:
            conn.execute(f"DO $$ BEGIN RAISE EXCEPTION 'x' USING ERRCODE = '{state}'; END $$")
        typed = db.to_typed(info.value)
        assert type(typed) is cls


def test_jobs_work_with_the_least_privilege_roles(conn: psycopg.Connection[Any], dsn: str) -> None:
    """Every write goes through a SQL function, so the host role (edm_app) and the runner
    role (edm_dispatcher) of edm.install_roles() need no table rights beyond SELECT."""
    import uuid

    from psycopg import conninfo, sql

    from edm_sched.jobs import JobRunner

    if conn.execute("SELECT to_regproc('edm.install_roles')").fetchone() == (None,):
        pytest.skip("no edm.install_roles() in this schema")
    conn.execute("SELECT edm.install_roles()")
    tag = uuid.uuid4().hex[:8]
    logins = {"app": f"t_jobs_app_{tag}", "dispatcher": f"t_jobs_disp_{tag}"}
    for group, login in logins.items():
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
            sql.Identifier(login), sql.Identifier(f"edm_{group}")))
    try:
        app_dsn = conninfo.make_conninfo(dsn, user=logins["app"])
        clock = Clock(T0)
        host = JobScheduler(app_dsn, now=clock)
        job = host.create_job(fn_job(user_id="t1", max_concurrent=2))
        host.update_job(job.job_id, {"priority": 2, "cron": "*/5 * * * *"})
        host.pause_job(job.job_id)
        host.resume_job(job.job_id)
        host.trigger_job(job.job_id)
        runs: list[int] = []
        runner = JobRunner(conninfo.make_conninfo(dsn, user=logins["dispatcher"]),
                           {"noop": lambda ctx: runs.append(ctx.execution_id)}, now=clock)
        try:
            clock.t = T0 + dt.timedelta(minutes=5)
            runner.step()
            assert runner.step().claimed == [] and len(runs) == 2  # manual + scheduled
        finally:
            runner.close()
        assert host.stats(since=T0 - dt.timedelta(days=1)).executions_by_status == {
            "succeeded": 2}
        with psycopg.connect(app_dsn, autocommit=True) as c, pytest.raises(
                psycopg.errors.InsufficientPrivilege):
            c.execute("UPDATE edm.jobs SET priority = 9")
        host.stop_job(job.job_id)
        host.delete_job(job.job_id)
    finally:
        for login in logins.values():
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(login)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(login)))
