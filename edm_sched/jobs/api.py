"""The host-facing Python API of recurring jobs: ``JobScheduler(dsn)``.

Every method opens a short connection, runs one transaction and returns
pydantic models. Anything the database must keep consistent across processes
is a SQL function of ``sql/migrations/0005_jobs.sql``; this class validates
input, computes next runs with cronsim (``schedule``) and calls them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import psycopg
import psycopg.errors
import pydantic
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from edm_sched import db, errors
from edm_sched.jobs import guard, schedule
from edm_sched.jobs.errors import (
    DestinationNotAllowed,
    ExecutionNotFound,
    InvalidJobConfig,
    JobNotFound,
    LockAcquisitionFailed,
)
from edm_sched.jobs.models import (
    CronPreview,
    Execution,
    HttpTarget,
    Job,
    JobSpec,
    JobStats,
    JobUpdate,
    RetryPolicy,
)
from edm_sched.jobs.sql import query
from edm_sched.models import validate

Clock = Callable[[], dt.datetime]
M = TypeVar("M", bound=pydantic.BaseModel)
_SCHEDULE_FIELDS = frozenset({"cron", "timezone", "start_at", "end_at"})
_NO_ID = 2**62


@contextlib.contextmanager
def translate() -> Iterator[None]:
    """Database errors as typed job errors (generic ones narrowed to the job codes)."""
    try:
        yield
    except psycopg.errors.LockNotAvailable as exc:
        raise LockAcquisitionFailed(
            f"a job row stayed locked by another session: {exc.diag.message_primary}"
        ) from exc
    except psycopg.errors.UniqueViolation as exc:
        if exc.diag.constraint_name == "jobs_tenant_name_unique":
            raise InvalidJobConfig("a job with this name already exists for this tenant") from exc
        raise
    except psycopg.Error as exc:
        typed = db.to_typed(exc)
        if typed is None:
            raise
        if type(typed) is errors.InvalidInput:
            raise InvalidJobConfig(typed.message, detail=typed.detail) from exc
        raise typed from exc


def validate_model(cls: type[M], value: M | Mapping[str, Any]) -> M:
    """``value`` as a ``cls``; a pydantic error becomes InvalidJobConfig."""
    return validate(cls, value, error=InvalidJobConfig, what="job definition")


def job_from_row(row: Mapping[str, Any]) -> Job:
    data = dict(row)
    data["cron"] = data.pop("cron_expr")
    data["retry"] = RetryPolicy(
        max_retries=data.pop("max_retries"),
        delay_seconds=data.pop("retry_delay_seconds"),
        backoff=data.pop("retry_backoff"),
        max_delay_seconds=data.pop("retry_max_delay_seconds"),
        retry_on=data.pop("retry_on"),
    )
    return Job.model_validate(data)


def _job_json(spec: JobSpec, *, status: str | None = None) -> Jsonb:
    """The settings of ``spec`` as the JSON object edm.job_create / edm.job_update take
    (keys are column names of edm.jobs)."""
    target = spec.target.model_dump(mode="json")
    data: dict[str, Any] = {
        "tenant_id": spec.tenant_id,
        "name": spec.name,
        "description": spec.description,
        "kind": target["kind"],
        "target": target,
        "cron_expr": " ".join(spec.cron.split()),
        "timezone": spec.timezone,
        "start_at": spec.start_at.isoformat() if spec.start_at else None,
        "end_at": spec.end_at.isoformat() if spec.end_at else None,
        "max_executions": spec.max_executions,
        "priority": spec.priority,
        "max_concurrent": spec.max_concurrent,
        "timeout_seconds": spec.timeout_seconds,
        "max_retries": spec.retry.max_retries,
        "retry_delay_seconds": spec.retry.delay_seconds,
        "retry_backoff": spec.retry.backoff,
        "retry_max_delay_seconds": spec.retry.max_delay_seconds,
        "retry_on": list(spec.retry.retry_on),
        "misfire_policy": spec.misfire_policy,
        "misfire_grace_seconds": spec.misfire_grace_seconds,
        "tags": list(spec.tags),
    }
    if status is not None:
        data["status"] = status
    return Jsonb(data)


_OPTIMISTIC_ATTEMPTS = 5


class JobScheduler:
    """Create, change, trigger and inspect recurring jobs in the ``edm`` schema at ``dsn``.

    ``now`` injects a clock (tests, simulations); by default the database's
    time is used. ``lock_timeout`` bounds how long a change waits for a job a
    runner is firing or another session holds; beyond it
    LockAcquisitionFailed (LOCK_ACQUISITION_FAILED) is raised.
    """

    def __init__(self, dsn: str, *, now: Clock | None = None, lock_timeout: float = 5.0) -> None:
        self.dsn = db.check_dsn(dsn)
        self._now = now
        if not 0 < lock_timeout <= 600:
            raise errors.ConfigurationError("lock_timeout must be between 0 and 600 seconds")
        self.lock_timeout = lock_timeout

    # -- plumbing ---------------------------------------------------------

    def _clock(self) -> dt.datetime | None:
        return self._now() if self._now is not None else None

    @contextlib.contextmanager
    def _tx(self) -> Iterator[psycopg.Connection[dict[str, Any]]]:
        with db.connect(self.dsn, row_factory=dict_row) as conn, translate(), conn.transaction():
            conn.execute(query("jobs_lock_timeout"),
                         {"timeout": f"{int(self.lock_timeout * 1000)}ms"})
            yield conn

    def _db_now(self, conn: psycopg.Connection[dict[str, Any]]) -> dt.datetime:
        row = conn.execute(query("jobs_db_now"), {"now": self._clock()}).fetchone()
        assert row is not None
        return next(iter(row.values()))  # type: ignore[no-any-return]

    @staticmethod
    def _check_destinations(conn: psycopg.Connection[dict[str, Any]],
                            specs: list[JobSpec]) -> None:
        """The outbound guard at the door: an ``http`` job whose URL is a refused address
        (in any spelling) or a loopback name, not opened by ``jobs.http_allow`` for its
        tenant, raises DestinationNotAllowed. Host names are resolved only at run time."""
        http_specs = [s for s in specs if isinstance(s.target, HttpTarget)]
        if not http_specs:
            return
        values = {r["key"]: r["value"] for r in conn.execute(
            query("jobs_security_config")).fetchall()}
        try:
            allowlist = guard.Allowlist.parse(values.get("jobs.http_allow"))
        except ValueError:
            allowlist = guard.Allowlist()  # malformed: open nothing
        for spec in http_specs:
            assert isinstance(spec.target, HttpTarget)
            try:
                guard.check_url(spec.target.url, allowlist.scope(spec.tenant_id))
            except guard.Blocked as exc:
                raise DestinationNotAllowed(
                    f"job {spec.name!r}: destination refused: {exc}",
                    detail="the host may open it in jobs.http_allow") from None

    def _read_job(self, conn: psycopg.Connection[dict[str, Any]], job_id: int,
                  tenant_id: str | None) -> Job:
        row = conn.execute(query("job_get"), {"job_id": job_id, "tenant_id": tenant_id}).fetchone()
        if row is None:
            raise JobNotFound(f"job {job_id} not found")
        return job_from_row(row)

    # -- schedules --------------------------------------------------------

    @staticmethod
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

    # -- jobs -------------------------------------------------------------

    def create_job(self, spec: JobSpec | Mapping[str, Any]) -> Job:
        """Create a job; its first run is the first occurrence after now (and start_at)."""
        return self.create_jobs([validate_model(JobSpec, spec)])[0]

    def create_jobs(self, specs: list[JobSpec] | list[Mapping[str, Any]]) -> list[Job]:
        """Create many jobs in one transaction: all of them, or none (bulk imports)."""
        checked = [validate_model(JobSpec, spec) for spec in specs]
        scheds = [schedule.parse(spec.cron, spec.timezone) for spec in checked]
        created: list[Job] = []
        with self._tx() as conn:
            self._check_destinations(conn, checked)
            now = self._db_now(conn)
            for spec, sched in zip(checked, scheds, strict=True):
                nxt = None
                if spec.status == "active":
                    nxt = schedule.first_run(sched, now=now, start_at=spec.start_at,
                                             end_at=spec.end_at)
                    if nxt is None:
                        raise InvalidJobConfig(
                            f"job {spec.name!r}: the schedule {spec.cron!r} has no occurrence "
                            "between now (or start_at) and end_at")
                row = conn.execute(query("job_create"), {
                    "job": _job_json(spec, status=spec.status), "next_run_at": nxt, "now": now,
                }).fetchone()
                assert row is not None
                created.append(self._read_job(conn, int(next(iter(row.values()))), None))
        return created

    def update_job(self, job_id: int, changes: JobUpdate | Mapping[str, Any], *,
                   tenant_id: str | None = None) -> Job:
        """Change the fields given in ``changes``; a new schedule recomputes the next run.

        Optimistic: the job is read, changed and written back only if nobody changed
        it meanwhile (else read again, up to 5 times; then LOCK_ACQUISITION_FAILED).
        """
        update = validate_model(JobUpdate, changes)
        given = update.model_fields_set
        for _ in range(_OPTIMISTIC_ATTEMPTS):
            with self._tx() as conn:
                job = self._read_job(conn, job_id, tenant_id)
                merged = job.spec().model_dump()
                for field in given:
                    value = getattr(update, field)
                    merged[field] = value.model_dump() if isinstance(value, pydantic.BaseModel) \
                        else value
                spec = validate_model(JobSpec, merged)
                if "target" in given:
                    self._check_destinations(conn, [spec])
                sched = schedule.parse(spec.cron, spec.timezone)
                now = self._db_now(conn)
                reschedule = job.status == "active" and bool(given & _SCHEDULE_FIELDS)
                nxt = schedule.first_run(sched, now=now, start_at=spec.start_at,
                                         end_at=spec.end_at) if reschedule else None
                row = conn.execute(query("job_update"), {
                    "job_id": job_id, "job": _job_json(spec), "reschedule": reschedule,
                    "next_run_at": nxt, "expected_updated_at": job.updated_at,
                    "tenant_id": tenant_id, "now": now,
                }).fetchone()
                if row is not None and next(iter(row.values())):
                    return self._read_job(conn, job_id, tenant_id)
        raise LockAcquisitionFailed(
            f"job {job_id} kept changing while being updated; try again")

    def get_job(self, job_id: int, *, tenant_id: str | None = None) -> Job:
        with db.connect(self.dsn, row_factory=dict_row) as conn, translate():
            row = conn.execute(query("job_get"),
                               {"job_id": job_id, "tenant_id": tenant_id}).fetchone()
        if row is None:
            raise JobNotFound(f"job {job_id} not found")
        return job_from_row(row)

    def list_jobs(self, *, tenant_id: str | None = None, status: str | None = None,
                  tag: str | None = None, limit: int = 100, after_id: int = 0) -> list[Job]:
        """Jobs by id (pages: pass the last job_id as ``after_id``)."""
        if not 1 <= limit <= 10000:
            raise errors.InvalidInput("limit must be between 1 and 10000")
        with db.connect(self.dsn, row_factory=dict_row) as conn, translate():
            rows = conn.execute(query("jobs_list"), {
                "tenant_id": tenant_id, "status": status, "tag": tag, "limit": limit,
                "after_id": after_id,
            }).fetchall()
        return [job_from_row(r) for r in rows]

    def delete_job(self, job_id: int, *, tenant_id: str | None = None,
                   force: bool = False) -> None:
        """Delete a job and its history; JOB_ALREADY_RUNNING while it runs, unless ``force``."""
        with self._tx() as conn:
            conn.execute(query("job_delete"),
                         {"job_id": job_id, "tenant_id": tenant_id, "force": force})

    def pause_job(self, job_id: int, *, tenant_id: str | None = None) -> Job:
        """No more scheduled runs until resumed; queued retries wait; running ones continue."""
        with self._tx() as conn:
            conn.execute(query("job_pause"), {"job_id": job_id, "tenant_id": tenant_id})
        return self.get_job(job_id)

    def resume_job(self, job_id: int, *, tenant_id: str | None = None) -> Job:
        """Activate a paused or inactive job from the first occurrence after now.

        Occurrences that fell while it was paused are not run (pausing is not
        downtime). INVALID_TRANSITION when no occurrence is left (end_at or
        max_executions reached: change them first).
        """
        for _ in range(_OPTIMISTIC_ATTEMPTS):
            with self._tx() as conn:
                job = self._read_job(conn, job_id, tenant_id)
                nxt = None
                if job.status != "active":
                    sched = schedule.parse(job.cron, job.timezone)
                    now = self._db_now(conn)
                    nxt = schedule.first_run(sched, now=now, start_at=job.start_at,
                                             end_at=job.end_at)
                row = conn.execute(query("job_resume"), {
                    "job_id": job_id, "next_run_at": nxt, "expected_updated_at": job.updated_at,
                    "tenant_id": tenant_id, "now": self._clock(),
                }).fetchone()
                if row is not None and next(iter(row.values())):
                    return self._read_job(conn, job_id, tenant_id)
        raise LockAcquisitionFailed(f"job {job_id} kept changing while being resumed; try again")

    def stop_job(self, job_id: int, *, tenant_id: str | None = None,
                 cancel_running: bool = False) -> Job:
        """Make the job inactive and cancel its queued executions (and running ones if asked)."""
        with self._tx() as conn:
            conn.execute(query("job_stop"), {
                "job_id": job_id, "tenant_id": tenant_id, "cancel_running": cancel_running,
                "now": self._clock(),
            })
        return self.get_job(job_id)

    def trigger_job(self, job_id: int, *, tenant_id: str | None = None) -> Execution:
        """Queue a run now (trigger type manual); JOB_ALREADY_RUNNING at max_concurrent."""
        with self._tx() as conn:
            row = conn.execute(query("job_trigger"), {
                "job_id": job_id, "tenant_id": tenant_id, "now": self._clock(),
            }).fetchone()
        assert row is not None
        return self.get_execution(int(next(iter(row.values()))))

    # -- executions -------------------------------------------------------

    def cancel_execution(self, execution_id: int, *, tenant_id: str | None = None) -> Execution:
        """Cancel a pending or running execution; a running one's runner kills it."""
        with self._tx() as conn:
            conn.execute(query("job_cancel_execution"), {
                "execution_id": execution_id, "tenant_id": tenant_id, "now": self._clock(),
            })
        return self.get_execution(execution_id)

    def get_execution(self, execution_id: int, *, tenant_id: str | None = None) -> Execution:
        with db.connect(self.dsn, row_factory=dict_row) as conn, translate():
            row = conn.execute(query("execution_get"), {
                "execution_id": execution_id, "tenant_id": tenant_id,
            }).fetchone()
        if row is None:
            raise ExecutionNotFound(f"execution {execution_id} not found")
        return Execution.model_validate(row)

    def list_executions(self, *, job_id: int | None = None, tenant_id: str | None = None,
                        status: str | None = None, limit: int = 50,
                        before_id: int | None = None) -> list[Execution]:
        """Executions newest first (pages: pass the last execution_id as ``before_id``)."""
        if not 1 <= limit <= 10000:
            raise errors.InvalidInput("limit must be between 1 and 10000")
        with db.connect(self.dsn, row_factory=dict_row) as conn, translate():
            rows = conn.execute(query("executions_list"), {
                "job_id": job_id, "tenant_id": tenant_id, "status": status, "limit": limit,
                "before_id": before_id if before_id is not None else _NO_ID,
            }).fetchall()
        return [Execution.model_validate(r) for r in rows]

    def stats(self, *, tenant_id: str | None = None,
              since: dt.datetime | None = None) -> JobStats:
        """Jobs by status and executions finished since ``since`` (default: the last 24 h)."""
        with db.connect(self.dsn) as conn, translate():
            if since is None:
                now_row = conn.execute(query("jobs_db_now"), {"now": self._clock()}).fetchone()
                assert now_row is not None
                since = now_row[0] - dt.timedelta(hours=24)
            job_rows = conn.execute(query("jobs_stats_jobs"), {"tenant_id": tenant_id}).fetchall()
            ex_rows = conn.execute(query("jobs_stats_executions"),
                                   {"tenant_id": tenant_id, "since": since}).fetchall()
        jobs_by_status = {str(r[0]): int(r[1]) for r in job_rows}
        running = sum(int(r[2]) for r in job_rows)
        pending = int(job_rows[0][3]) if job_rows else 0
        by_status: dict[str, int] = {}
        by_trigger: dict[str, int] = {}
        total: tuple[Any, ...] = (None, None, 0, None, None, None, None, 0)
        for r in ex_rows:
            if r[0] is None:
                total = tuple(r)
                continue
            by_status[r[0]] = by_status.get(r[0], 0) + int(r[2])
            by_trigger[r[1]] = by_trigger.get(r[1], 0) + int(r[2])
        done = by_status.get("succeeded", 0) + by_status.get("failed", 0) \
            + by_status.get("timed_out", 0)
        return JobStats(
            since=since, tenant_id=tenant_id, jobs_by_status=jobs_by_status,
            executions_by_status=by_status, executions_by_trigger=by_trigger,
            running=running, pending=pending,
            success_rate=by_status.get("succeeded", 0) / done if done else None,
            duration_ms_avg=total[3], duration_ms_p95=total[4],
            firing_delay_ms_p50=total[5], firing_delay_ms_p99=total[6],
            retries=by_trigger.get("retry", 0), misfires=int(total[7] or 0),
        )

    def purge_executions(self) -> int:
        """Delete history older than ``jobs.execution_retention_days`` now; returns the count."""
        deleted = 0
        with db.connect(self.dsn) as conn, translate():
            while True:
                row = conn.execute(query("job_purge"), {"now": self._clock()}).fetchone()
                n = int(row[0]) if row else 0
                deleted += n
                if n < 10000:
                    return deleted


__all__ = ["JobScheduler", "job_from_row", "translate", "validate_model"]
