"""The host-facing Python API of recurring jobs.

``Scheduler(dsn).jobs`` and ``AsyncScheduler(dsn).jobs`` (the same methods,
sync and async, on the scheduler's pool, each taking an optional ``conn=`` to
run inside the caller's transaction), and the older ``JobScheduler(dsn)``
(deprecated: one short connection per call). All three run the operations of
:mod:`edm_sched.jobs.ops`; anything the database must keep consistent across
processes is a SQL function of ``sql/migrations/0005_jobs.sql``.
"""

from __future__ import annotations

import datetime as dt
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import psycopg

from edm_sched import core, db, errors
from edm_sched.jobs import ops, schedule
from edm_sched.jobs.models import (
    CronPreview,
    Execution,
    Job,
    JobSpec,
    JobStats,
    JobUpdate,
)
from edm_sched.jobs.ops import job_from_row, translate, validate_model

Clock = Callable[[], dt.datetime]
T = TypeVar("T")


def validate_cron(expr: str, timezone: str = "UTC", *, count: int = 5,
                  after: dt.datetime | None = None) -> CronPreview:
    """Check ``expr`` with cronsim; its next ``count`` occurrences after ``after`` (now).

    Raises InvalidCronExpression (INVALID_CRON_EXPRESSION) with the reason.
    """
    sched = schedule.parse(expr, timezone)
    start = after or dt.datetime.now(dt.UTC)
    runs = schedule.upcoming(sched, start, max(0, min(count, 1000)))
    tz = sched.tz
    return CronPreview(
        expression=sched.expr, timezone=timezone, fields=sched.fields,
        wall_clock=sched.wall_clock, description=sched.describe(), next_runs=runs,
        next_runs_local=[r.astimezone(tz).isoformat() for r in runs],
    )


def _user(user_id: str | None, tenant_id: str | None) -> str | None:
    """The owning user of a call: ``user_id``, or the deprecated ``tenant_id`` (warns)."""
    if tenant_id is None:
        return user_id
    warnings.warn("tenant_id= is deprecated: the jobs API says user_id= like the rest of "
                  "edm-sched", DeprecationWarning, stacklevel=3)
    if user_id is not None and user_id != tenant_id:
        raise errors.InvalidInput("user_id and tenant_id name different users")
    return tenant_id


class _JobsBase:
    def __init__(self, *, now: Clock | None, lock_timeout: float, actor: str | None) -> None:
        self._now = now
        self.lock_timeout = lock_timeout
        self._session = core.Session.for_actor(actor, ops.lock_timeout_setup(lock_timeout))

    def _clock(self) -> dt.datetime | None:
        return self._now() if self._now is not None else None

    validate_cron = staticmethod(validate_cron)


class Jobs(_JobsBase):
    """Recurring jobs through a :class:`edm_sched.Scheduler` (``scheduler.jobs``).

    ``now`` injects a clock (tests, simulations); by default the database's
    time is used. ``lock_timeout`` bounds how long a change waits for a job a
    runner is firing or another session holds (LOCK_ACQUISITION_FAILED beyond
    it); under ``conn=`` your transaction's own lock_timeout applies instead.
    """

    def __init__(self, runner: core.SyncRunner, *, now: Clock | None = None,
                 lock_timeout: float = 5.0, actor: str | None = None) -> None:
        super().__init__(now=now, lock_timeout=lock_timeout, actor=actor)
        self._runner = runner

    def _run(self, op: core.Op[T], conn: psycopg.Connection[Any] | None) -> T:
        return self._runner(op, conn, self._session)

    def create_job(self, spec: JobSpec | Mapping[str, Any], *,
                   conn: psycopg.Connection[Any] | None = None) -> Job:
        """Create a job; its first run is the first occurrence after now (and start_at)."""
        return self._run(ops.create_job(spec, self._clock), conn)

    def create_jobs(self, specs: list[JobSpec] | list[Mapping[str, Any]], *,
                    conn: psycopg.Connection[Any] | None = None) -> list[Job]:
        """Create many jobs in one transaction: all of them, or none (bulk imports)."""
        return self._run(ops.create_jobs(specs, self._clock), conn)

    def update_job(self, job_id: int, changes: JobUpdate | Mapping[str, Any], *,
                   user_id: str | None = None, tenant_id: str | None = None,
                   conn: psycopg.Connection[Any] | None = None) -> Job:
        """Change the fields given in ``changes``; a new schedule recomputes the next run."""
        return self._run(
            ops.update_job(job_id, changes, _user(user_id, tenant_id), self._clock), conn)

    def get_job(self, job_id: int, *, user_id: str | None = None, tenant_id: str | None = None,
                conn: psycopg.Connection[Any] | None = None) -> Job:
        return self._run(ops.get_job(job_id, _user(user_id, tenant_id)), conn)

    def list_jobs(self, *, user_id: str | None = None,
                  tenant_id: str | None = None, status: str | None = None,
                  tag: str | None = None, limit: int = 100, after_id: int = 0,
                  conn: psycopg.Connection[Any] | None = None) -> list[Job]:
        """Jobs by id (pages: pass the last job_id as ``after_id``)."""
        return self._run(
            ops.list_jobs(_user(user_id, tenant_id), status, tag, limit, after_id), conn)

    def delete_job(self, job_id: int, *, user_id: str | None = None,
                   tenant_id: str | None = None, force: bool = False,
                   conn: psycopg.Connection[Any] | None = None) -> None:
        """Delete a job and its history; JOB_ALREADY_RUNNING while it runs, unless ``force``."""
        return self._run(ops.delete_job(job_id, _user(user_id, tenant_id), force), conn)

    def pause_job(self, job_id: int, *, user_id: str | None = None, tenant_id: str | None = None,
                  conn: psycopg.Connection[Any] | None = None) -> Job:
        """No more scheduled runs until resumed; queued retries wait; running ones continue."""
        return self._run(ops.pause_job(job_id, _user(user_id, tenant_id)), conn)

    def resume_job(self, job_id: int, *, user_id: str | None = None, tenant_id: str | None = None,
                   conn: psycopg.Connection[Any] | None = None) -> Job:
        """Activate a paused or inactive job from the first occurrence after now."""
        return self._run(ops.resume_job(job_id, _user(user_id, tenant_id), self._clock), conn)

    def stop_job(self, job_id: int, *, user_id: str | None = None, tenant_id: str | None = None,
                 cancel_running: bool = False,
                 conn: psycopg.Connection[Any] | None = None) -> Job:
        """Make the job inactive and cancel its queued executions (and running ones if asked)."""
        return self._run(
            ops.stop_job(job_id, _user(user_id, tenant_id), cancel_running, self._clock), conn)

    def trigger_job(self, job_id: int, *, user_id: str | None = None, tenant_id: str | None = None,
                    conn: psycopg.Connection[Any] | None = None) -> Execution:
        """Queue a run now (trigger type manual); JOB_ALREADY_RUNNING at max_concurrent."""
        return self._run(ops.trigger_job(job_id, _user(user_id, tenant_id), self._clock), conn)

    def cancel_execution(self, execution_id: int, *, user_id: str | None = None,
                         tenant_id: str | None = None,
                         conn: psycopg.Connection[Any] | None = None) -> Execution:
        """Cancel a pending or running execution; a running one's runner kills it."""
        return self._run(
            ops.cancel_execution(execution_id, _user(user_id, tenant_id), self._clock), conn)

    def get_execution(self, execution_id: int, *, user_id: str | None = None,
                      tenant_id: str | None = None,
                      conn: psycopg.Connection[Any] | None = None) -> Execution:
        return self._run(ops.get_execution(execution_id, _user(user_id, tenant_id)), conn)

    def list_executions(self, *, job_id: int | None = None, user_id: str | None = None,
                        tenant_id: str | None = None,
                        status: str | None = None, limit: int = 50,
                        before_id: int | None = None,
                        conn: psycopg.Connection[Any] | None = None) -> list[Execution]:
        """Executions newest first (pages: pass the last execution_id as ``before_id``)."""
        return self._run(
            ops.list_executions(job_id, _user(user_id, tenant_id), status, limit, before_id), conn)

    def stats(self, *, user_id: str | None = None,
              tenant_id: str | None = None, since: dt.datetime | None = None,
              conn: psycopg.Connection[Any] | None = None) -> JobStats:
        """Jobs by status and executions finished since ``since`` (default: the last 24 h)."""
        return self._run(ops.stats(_user(user_id, tenant_id), since, self._clock), conn)

    def purge_executions(self, *, conn: psycopg.Connection[Any] | None = None) -> int:
        """Delete history older than ``jobs.execution_retention_days`` now; returns the count."""
        return self._run(ops.purge_executions(self._clock), conn)


class AsyncJobs(_JobsBase):
    """Recurring jobs through a :class:`edm_sched.AsyncScheduler`: the methods of
    :class:`Jobs`, awaited."""

    def __init__(self, runner: core.AsyncRunner, *, now: Clock | None = None,
                 lock_timeout: float = 5.0, actor: str | None = None) -> None:
        super().__init__(now=now, lock_timeout=lock_timeout, actor=actor)
        self._runner = runner

    async def _run(self, op: core.Op[T], conn: psycopg.AsyncConnection[Any] | None) -> T:
        return await self._runner(op, conn, self._session)

    async def create_job(self, spec: JobSpec | Mapping[str, Any], *,
                         conn: psycopg.AsyncConnection[Any] | None = None) -> Job:
        return await self._run(ops.create_job(spec, self._clock), conn)

    async def create_jobs(self, specs: list[JobSpec] | list[Mapping[str, Any]], *,
                          conn: psycopg.AsyncConnection[Any] | None = None) -> list[Job]:
        return await self._run(ops.create_jobs(specs, self._clock), conn)

    async def update_job(self, job_id: int, changes: JobUpdate | Mapping[str, Any], *,
                         user_id: str | None = None, tenant_id: str | None = None,
                         conn: psycopg.AsyncConnection[Any] | None = None) -> Job:
        return await self._run(
            ops.update_job(job_id, changes, _user(user_id, tenant_id), self._clock), conn)

    async def get_job(self, job_id: int, *, user_id: str | None = None,
                      tenant_id: str | None = None,
                      conn: psycopg.AsyncConnection[Any] | None = None) -> Job:
        return await self._run(ops.get_job(job_id, _user(user_id, tenant_id)), conn)

    async def list_jobs(self, *, user_id: str | None = None,
                        tenant_id: str | None = None, status: str | None = None,
                        tag: str | None = None, limit: int = 100, after_id: int = 0,
                        conn: psycopg.AsyncConnection[Any] | None = None) -> list[Job]:
        return await self._run(
            ops.list_jobs(_user(user_id, tenant_id), status, tag, limit, after_id), conn)

    async def delete_job(self, job_id: int, *, user_id: str | None = None,
                         tenant_id: str | None = None,
                         force: bool = False,
                         conn: psycopg.AsyncConnection[Any] | None = None) -> None:
        return await self._run(ops.delete_job(job_id, _user(user_id, tenant_id), force), conn)

    async def pause_job(self, job_id: int, *, user_id: str | None = None,
                        tenant_id: str | None = None,
                        conn: psycopg.AsyncConnection[Any] | None = None) -> Job:
        return await self._run(ops.pause_job(job_id, _user(user_id, tenant_id)), conn)

    async def resume_job(self, job_id: int, *, user_id: str | None = None,
                         tenant_id: str | None = None,
                         conn: psycopg.AsyncConnection[Any] | None = None) -> Job:
        return await self._run(ops.resume_job(job_id, _user(user_id, tenant_id), self._clock), conn)

    async def stop_job(self, job_id: int, *, user_id: str | None = None,
                       tenant_id: str | None = None,
                       cancel_running: bool = False,
                       conn: psycopg.AsyncConnection[Any] | None = None) -> Job:
        return await self._run(
            ops.stop_job(job_id, _user(user_id, tenant_id), cancel_running, self._clock),
                               conn)

    async def trigger_job(self, job_id: int, *, user_id: str | None = None,
                          tenant_id: str | None = None,
                          conn: psycopg.AsyncConnection[Any] | None = None) -> Execution:
        return await self._run(
            ops.trigger_job(job_id, _user(user_id, tenant_id), self._clock), conn)

    async def cancel_execution(self, execution_id: int, *, user_id: str | None = None,
                               tenant_id: str | None = None,
                               conn: psycopg.AsyncConnection[Any] | None = None) -> Execution:
        return await self._run(
            ops.cancel_execution(execution_id, _user(user_id, tenant_id), self._clock), conn)

    async def get_execution(self, execution_id: int, *, user_id: str | None = None,
                            tenant_id: str | None = None,
                            conn: psycopg.AsyncConnection[Any] | None = None) -> Execution:
        return await self._run(ops.get_execution(execution_id, _user(user_id, tenant_id)), conn)

    async def list_executions(self, *, job_id: int | None = None, user_id: str | None = None,
                              tenant_id: str | None = None,
                              status: str | None = None, limit: int = 50,
                              before_id: int | None = None,
                              conn: psycopg.AsyncConnection[Any] | None = None
                              ) -> list[Execution]:
        return await self._run(
            ops.list_executions(job_id, _user(user_id, tenant_id), status, limit, before_id), conn)

    async def stats(self, *, user_id: str | None = None,
                    tenant_id: str | None = None, since: dt.datetime | None = None,
                    conn: psycopg.AsyncConnection[Any] | None = None) -> JobStats:
        return await self._run(ops.stats(_user(user_id, tenant_id), since, self._clock), conn)

    async def purge_executions(self, *,
                               conn: psycopg.AsyncConnection[Any] | None = None) -> int:
        return await self._run(ops.purge_executions(self._clock), conn)


class JobScheduler(Jobs):
    """Deprecated: use ``Scheduler(dsn).jobs`` (a pool, and ``conn=``). Same methods.

    Every call opens a short connection to ``dsn`` and runs in its own
    transaction(s); ``conn=`` runs it in the caller's transaction instead.
    """

    def __init__(self, dsn: str, *, now: Clock | None = None, lock_timeout: float = 5.0) -> None:
        self.dsn = db.check_dsn(dsn)

        def runner(op: core.Op[T], conn: psycopg.Connection[Any] | None,
                   session: core.Session) -> T:
            if conn is not None:
                return core.run_sync(op, conn=conn, session=session)
            return core.run_on(self.dsn, op, session=session)

        super().__init__(runner, now=now, lock_timeout=lock_timeout)


__all__ = ["AsyncJobs", "JobScheduler", "Jobs", "job_from_row", "translate", "validate_cron",
           "validate_model"]
