"""The jobs feature says user_id like the rest of edm-sched; tenant_id still works, and warns."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from edm_sched import errors
from edm_sched.api import Scheduler
from edm_sched.jobs import JobSpec
from edm_sched.jobs.kinds import JobContext

SPEC = {"name": "nightly", "cron": "0 3 * * *", "target": {"kind": "function", "function": "noop"}}


@pytest.fixture
def sched(dsn: str) -> Iterator[Scheduler]:
    with Scheduler(dsn) as s:
        yield s


def test_a_spec_takes_the_older_word_and_warns() -> None:
    with pytest.warns(DeprecationWarning, match="tenant_id is deprecated: say user_id"):
        spec = JobSpec.model_validate({**SPEC, "tenant_id": "acme"})
    assert spec.user_id == "acme"
    with pytest.warns(DeprecationWarning):
        assert spec.tenant_id == "acme"
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="differ"):
        JobSpec.model_validate({**SPEC, "tenant_id": "acme", "user_id": "globex"})
    assert "tenant_id" not in JobSpec.model_json_schema()["properties"]


def test_calls_take_the_older_keyword_and_warn(sched: Scheduler) -> None:
    job = sched.jobs.create_job({**SPEC, "user_id": "acme"})
    assert job.user_id == "acme"
    with pytest.warns(DeprecationWarning, match="user_id"):
        assert job.tenant_id == "acme"
    with pytest.warns(DeprecationWarning, match="tenant_id= is deprecated"):
        assert sched.jobs.get_job(job.job_id, tenant_id="acme").job_id == job.job_id
    with pytest.warns(DeprecationWarning), pytest.raises(errors.NotFound):
        sched.jobs.get_job(job.job_id, tenant_id="globex")  # still scoped to that user
    with pytest.warns(DeprecationWarning), pytest.raises(errors.InvalidInput):
        sched.jobs.list_jobs(user_id="acme", tenant_id="globex")
    stats = sched.jobs.stats(user_id="acme")
    assert stats.user_id == "acme"
    with pytest.warns(DeprecationWarning):
        assert stats.tenant_id == "acme"
    execution = sched.jobs.trigger_job(job.job_id, user_id="acme")
    assert execution.user_id == "acme"
    with pytest.warns(DeprecationWarning):
        assert execution.tenant_id == "acme"


def test_a_job_function_reads_the_user() -> None:
    def ctx(**who: str) -> JobContext:
        return JobContext(execution_id=1, job_id=1, job_name="j", trigger="manual",
                          scheduled_for=None, retry_count=0, args={}, timeout_seconds=1.0, **who)

    assert ctx(user_id="acme").user_id == "acme"
    with pytest.warns(DeprecationWarning):
        old = ctx(tenant_id="acme")
    assert old.user_id == "acme"
    with pytest.warns(DeprecationWarning):
        assert old.tenant_id == "acme"


def test_job_finish_is_the_older_name_of_job_complete(sched: Scheduler,
                                                      conn: psycopg.Connection[Any]) -> None:
    job = sched.jobs.create_job({**SPEC, "user_id": "acme", "max_concurrent": 2})
    first = sched.jobs.trigger_job(job.job_id).execution_id
    second = sched.jobs.trigger_job(job.job_id).execution_id
    claimed = {r[0] for r in conn.execute(
        "SELECT execution_id FROM edm.job_claim('w1', 10)").fetchall()}
    assert claimed == {first, second}
    assert conn.execute("SELECT accepted FROM edm.job_finish(%s, 'w1', 'succeeded')",
                        [first]).fetchone() == (True,)
    assert conn.execute("SELECT accepted FROM edm.job_complete(%s, 'w1', 'succeeded')",
                        [second]).fetchone() == (True,)
    assert {e.status for e in sched.jobs.list_executions(job_id=job.job_id)} == {"succeeded"}


def test_the_allowlist_reads_users_and_the_older_tenants() -> None:
    from edm_sched.jobs import guard

    allow = guard.Allowlist.parse('{"users": {"acme": ["10.0.0.0/8"]}, '
                                  '"tenants": {"acme": ["crm.acme.test"], "globex": ["::1"]}}')
    assert allow.entries_for("acme") == ("10.0.0.0/8", "crm.acme.test")
    assert allow.entries_for("globex") == ("::1",)
    with pytest.warns(DeprecationWarning, match="Allowlist.tenants is deprecated"):
        assert allow.tenants == allow.users
    with pytest.warns(DeprecationWarning, match="parse_tenant_list is deprecated"):
        assert guard.parse_tenant_list('["acme"]') == guard.parse_user_list('["acme"]')
