"""Migration 0021 renames the jobs feature's "tenant" to "user" in SQL: a database
holding jobs upgrades from 0020 with its data and behaviour unchanged, and the
old names (settings, the spec key, the overview column, grants) still work."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest
from psycopg import conninfo, sql

from edm_sched.api import Scheduler
from edm_sched.jobs import JobQuotaExceeded, JobScheduler
from edm_sched.migrations import migrate


def _job(c: psycopg.Connection[Any], name: str, tenant: str | None) -> int:
    """A job created the 0020 way: the spec's key is tenant_id."""
    spec = {"name": name, "cron_expr": "0 3 * * *", "kind": "function",
            "target": {"kind": "function", "function": "noop"}}
    if tenant is not None:
        spec["tenant_id"] = tenant
    row = c.execute("SELECT edm.job_create(%s::jsonb, now() + interval '1 day')",
                    [psycopg.types.json.Jsonb(spec)]).fetchone()
    assert row is not None
    return int(row[0])


def test_a_database_with_jobs_upgrades_from_0020_keeping_data_and_old_names(
        empty_dsn: str) -> None:
    migrate(empty_dsn, target=20)
    tag = uuid.uuid4().hex[:8]
    group = {"dispatcher": f"t_gd_{tag}", "app": f"t_ga_{tag}", "monitor": f"t_gm_{tag}"}
    login = f"t_app_{tag}"
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        # Roles under names of the host's choosing: the upgrade must keep their grants.
        c.execute("SELECT edm.install_roles(%s, %s, %s)",
                  [group["dispatcher"], group["app"], group["monitor"]])
        c.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
            sql.Identifier(login), sql.Identifier(group["app"])))
        try:
            acme = _job(c, "acme-nightly", "acme")
            other = _job(c, "acme-weekly", "acme")
            platform = _job(c, "vacuum", None)
            globex = _job(c, "globex-nightly", "globex")
            c.execute("SELECT edm.job_trigger(%s, 'acme')", [acme])
            c.execute("SELECT edm.job_trigger(%s, NULL)", [platform])
            c.execute("SELECT edm.config_set('jobs.max_jobs_per_tenant', '3')")
            c.execute("SELECT edm.config_set('jobs.max_running_per_tenant', '2')")
            c.execute("SELECT edm.config_set('jobs.shell_tenants', to_jsonb(%s::text))",
                      ['["acme"]'])
            c.execute("SELECT edm.config_set('jobs.http_allow', to_jsonb(%s::text))",
                      ['{"tenants": {"acme": ["10.1.2.0/24"]}}'])
            before_jobs = c.execute("SELECT job_id, tenant_id, name, status, next_run_at "
                                    "FROM edm.jobs ORDER BY job_id").fetchall()
            before_runs = c.execute("SELECT execution_id, job_id, tenant_id, status "
                                    "FROM edm.job_executions ORDER BY execution_id").fetchall()

            assert migrate(empty_dsn).newly_applied[0] == 21

            # The data: every row as it was, under the new column name.
            assert c.execute("SELECT job_id, user_id, name, status, next_run_at "
                             "FROM edm.jobs ORDER BY job_id").fetchall() == before_jobs
            assert c.execute("SELECT execution_id, job_id, user_id, status "
                             "FROM edm.job_executions ORDER BY execution_id"
                             ).fetchall() == before_runs
            assert [r[2] for r in before_runs] == ["acme", None]
            gone = c.execute("SELECT count(*) FROM information_schema.columns WHERE "
                             "table_schema = 'edm' AND table_name IN ('jobs', 'job_executions') "
                             "AND column_name = 'tenant_id'").fetchone()
            assert gone == (0,)

            # The settings: renamed in place with their values; the old names still answer.
            values = dict(c.execute("SELECT key, value #>> '{}' FROM edm.config "
                                    "WHERE key LIKE 'jobs.%'").fetchall())
            assert values["jobs.max_jobs_per_user"] == "3"
            assert values["jobs.max_running_per_user"] == "2"
            assert values["jobs.shell_users"] == '["acme"]'
            assert not {"jobs.max_jobs_per_tenant", "jobs.max_running_per_tenant",
                        "jobs.shell_tenants"} & set(values)
            assert c.execute("SELECT edm.config_key('jobs.max_jobs_per_tenant'), "
                             "edm.config_key('jobs.max_jobs_per_user')").fetchone() == (
                "jobs.max_jobs_per_user", "jobs.max_jobs_per_user")
            c.execute("SELECT edm.config_set('jobs.max_running_per_tenant', '5')")
            assert c.execute("SELECT edm.config_int('jobs.max_running_per_user')"
                             ).fetchone() == (5,)
            with Scheduler(empty_dsn) as s:
                with pytest.warns(DeprecationWarning, match="jobs.max_jobs_per_user"):
                    entry = s.monitoring.config_get("jobs.max_jobs_per_tenant")
                assert (entry.key, entry.value) == ("jobs.max_jobs_per_user", 3)
                with pytest.warns(DeprecationWarning, match="jobs.max_running_per_user"):
                    s.monitoring.config_set("jobs.max_running_per_tenant", 2)
            assert c.execute("SELECT edm.config_int('jobs.max_running_per_user')"
                             ).fetchone() == (2,)

            # Behaviour: the quota of 3 jobs per user still holds, and a spec with the
            # older key tenant_id still creates a job of that user (not a platform job).
            third = _job(c, "acme-monthly", "acme")
            with pytest.raises(JobQuotaExceeded):
                JobScheduler(empty_dsn).create_job(
                    {"name": "acme-4", "cron": "0 3 * * *", "user_id": "acme",
                     "target": {"kind": "function", "function": "noop"}})
            assert JobScheduler(empty_dsn).create_job(
                {"name": "globex-2", "cron": "0 3 * * *", "user_id": "globex",
                 "target": {"kind": "function", "function": "noop"}}).user_id == "globex"
            with pytest.raises(psycopg.Error, match="different users"):
                c.execute("SELECT edm.job_create(%s::jsonb, NULL)", [psycopg.types.json.Jsonb(
                    {"name": "y", "cron_expr": "0 3 * * *", "kind": "function",
                     "target": {"kind": "function", "function": "noop"},
                     "tenant_id": "acme", "user_id": "globex"})])
            # The overview keeps tenant_id beside user_id for a release.
            assert c.execute("SELECT user_id, tenant_id FROM edm.jobs_overview WHERE job_id = %s",
                             [third]).fetchone() == ("acme", "acme")
            # The runner's claim says user_id; the per-user cap (now 2) still counts.
            claimed = c.execute("SELECT user_id FROM edm.job_claim('w1', 10)").fetchall()
            assert sorted(claimed, key=str) == sorted([("acme",), (None,)], key=str)
            # jobs.http_allow written with "tenants" still opens acme's network.
            from edm_sched.jobs import guard
            allow = c.execute("SELECT value #>> '{}' FROM edm.config "
                              "WHERE key = 'jobs.http_allow'").fetchone()
            assert allow is not None
            assert guard.Allowlist.parse(allow[0]).entries_for("acme") == ("10.1.2.0/24",)

            # The grants of roles named by the host survive the functions being recreated
            # (their parameter p_tenant_id is p_user_id now).
            as_app = JobScheduler(conninfo.make_conninfo(empty_dsn, user=login))
            assert as_app.pause_job(acme, user_id="acme").status == "paused"
            with pytest.warns(DeprecationWarning):
                assert as_app.resume_job(acme, tenant_id="acme").status == "active"
            assert as_app.get_job(other, user_id="acme").user_id == "acme"
            with pytest.raises(Exception, match="not found"):
                as_app.pause_job(globex, user_id="acme")
            assert platform > 0
        finally:
            for role in (login, *group.values()):
                c.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                c.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
