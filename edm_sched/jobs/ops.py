"""The operations of the recurring-jobs API, once (see :mod:`edm_sched.core`).

``JobScheduler`` (one short connection per call), ``Scheduler.jobs`` and
``AsyncScheduler.jobs`` all run these. Each operation validates its input,
yields the named statements of ``sql/jobs_queries.sql`` and maps the rows onto
the models of :mod:`edm_sched.jobs.models`; database errors thrown back into it
are narrowed to the job errors by :func:`translate`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import psycopg
import psycopg.errors
import pydantic
from psycopg.types.json import Jsonb

from edm_sched import db, errors
from edm_sched.core import Commit, Fetch, Op
from edm_sched.jobs import guard, schedule
from edm_sched.jobs.errors import (
    DestinationNotAllowed,
    ExecutionNotFound,
    InvalidJobConfig,
    JobNotFound,
    LockAcquisitionFailed,
)
from edm_sched.jobs.models import (
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

Clock = Callable[[], dt.datetime | None]
M = TypeVar("M", bound=pydantic.BaseModel)
_SCHEDULE_FIELDS = frozenset({"cron", "timezone", "start_at", "end_at"})
_NO_ID = 2**62
_OPTIMISTIC_ATTEMPTS = 5


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
        if exc.diag.constraint_name == "jobs_user_name_unique":
            raise InvalidJobConfig("a job with this name already exists for this user") from exc
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


def job_json(spec: JobSpec, *, status: str | None = None) -> Any:
    """The settings of ``spec`` as the JSON object edm.job_create / edm.job_update take
    (keys are column names of edm.jobs)."""
    target = spec.target.model_dump(mode="json")
    data: dict[str, Any] = {
        "user_id": spec.user_id,
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


def lock_timeout_setup(lock_timeout: float) -> Fetch:
    """The statement that bounds row-lock waits in the jobs API's own transactions."""
    if not 0 < lock_timeout <= 600:
        raise errors.ConfigurationError("lock_timeout must be between 0 and 600 seconds")
    return Fetch(query("jobs_lock_timeout"), {"timeout": f"{int(lock_timeout * 1000)}ms"})


def _q(name: str, params: Any, *, rows: Any = "one") -> Op[Any]:
    with translate():
        return (yield Fetch(query(name), params, rows=rows, dicts=True))


def _first(row: Mapping[str, Any] | None) -> Any:
    assert row is not None
    return next(iter(row.values()))


def _db_now(clock: Clock) -> Op[dt.datetime]:
    return _first((yield from _q("jobs_db_now", {"now": clock()})))  # type: ignore[no-any-return]


def _read_job(job_id: int, user_id: str | None) -> Op[Job]:
    row = yield from _q("job_get", {"job_id": job_id, "user_id": user_id})
    if row is None:
        raise JobNotFound(f"job {job_id} not found")
    return job_from_row(row)


def _read_execution(execution_id: int, user_id: str | None) -> Op[Execution]:
    row = yield from _q("execution_get", {"execution_id": execution_id, "user_id": user_id})
    if row is None:
        raise ExecutionNotFound(f"execution {execution_id} not found")
    return Execution.model_validate(row)


# ---------------------------------------------------------------------- jobs


def _check_destinations(specs: list[JobSpec]) -> Op[None]:
    """The outbound guard at the door: an ``http`` job whose URL is a refused address
    (in any spelling) or a loopback name, not opened by ``jobs.http_allow`` for its
    user, raises DestinationNotAllowed. Host names are resolved only at run time."""
    http_specs = [s for s in specs if isinstance(s.target, HttpTarget)]
    if not http_specs:
        return
    rows = yield from _q("jobs_security_config", None, rows="all")
    values = {r["key"]: r["value"] for r in rows}
    try:
        allowlist = guard.Allowlist.parse(values.get("jobs.http_allow"))
    except ValueError:
        allowlist = guard.Allowlist()  # malformed: open nothing
    for spec in http_specs:
        assert isinstance(spec.target, HttpTarget)
        try:
            guard.check_url(spec.target.url, allowlist.scope(spec.user_id))
        except guard.Blocked as exc:
            raise DestinationNotAllowed(
                f"job {spec.name!r}: destination refused: {exc}",
                detail="the host may open it in jobs.http_allow") from None


def create_jobs(specs: list[JobSpec] | list[Mapping[str, Any]], clock: Clock) -> Op[list[Job]]:
    """Create many jobs in one transaction: all of them, or none."""
    checked = [validate_model(JobSpec, spec) for spec in specs]
    scheds = [schedule.parse(spec.cron, spec.timezone) for spec in checked]
    created: list[Job] = []
    yield from _check_destinations(checked)
    now = yield from _db_now(clock)
    for spec, sched in zip(checked, scheds, strict=True):
        nxt = None
        if spec.status == "active":
            nxt = schedule.first_run(sched, now=now, start_at=spec.start_at, end_at=spec.end_at)
            if nxt is None:
                raise InvalidJobConfig(
                    f"job {spec.name!r}: the schedule {spec.cron!r} has no occurrence "
                    "between now (or start_at) and end_at")
        row = yield from _q("job_create", {
            "job": job_json(spec, status=spec.status), "next_run_at": nxt, "now": now})
        created.append((yield from _read_job(int(_first(row)), None)))
    return created


def create_job(spec: JobSpec | Mapping[str, Any], clock: Clock) -> Op[Job]:
    jobs = yield from create_jobs([validate_model(JobSpec, spec)], clock)
    return jobs[0]


def update_job(job_id: int, changes: JobUpdate | Mapping[str, Any], user_id: str | None,
               clock: Clock) -> Op[Job]:
    """Optimistic: read, change, write back only if nobody changed it meanwhile (5 tries)."""
    update = validate_model(JobUpdate, changes)
    given = update.model_fields_set
    for _ in range(_OPTIMISTIC_ATTEMPTS):
        job = yield from _read_job(job_id, user_id)
        merged = job.spec().model_dump()
        for name in given:
            value = getattr(update, name)
            merged[name] = value.model_dump() if isinstance(value, pydantic.BaseModel) else value
        spec = validate_model(JobSpec, merged)
        if "target" in given:
            yield from _check_destinations([spec])
        sched = schedule.parse(spec.cron, spec.timezone)
        now = yield from _db_now(clock)
        reschedule = job.status == "active" and bool(given & _SCHEDULE_FIELDS)
        nxt = schedule.first_run(sched, now=now, start_at=spec.start_at,
                                 end_at=spec.end_at) if reschedule else None
        row = yield from _q("job_update", {
            "job_id": job_id, "job": job_json(spec), "reschedule": reschedule,
            "next_run_at": nxt, "expected_updated_at": job.updated_at,
            "user_id": user_id, "now": now,
        })
        if row is not None and _first(row):
            return (yield from _read_job(job_id, user_id))
        yield Commit()
    raise LockAcquisitionFailed(f"job {job_id} kept changing while being updated; try again")


def get_job(job_id: int, user_id: str | None) -> Op[Job]:
    return (yield from _read_job(job_id, user_id))


def list_jobs(user_id: str | None, status: str | None, tag: str | None, limit: int,
              after_id: int) -> Op[list[Job]]:
    if not 1 <= limit <= 10000:
        raise errors.InvalidInput("limit must be between 1 and 10000")
    rows = yield from _q("jobs_list", {"user_id": user_id, "status": status, "tag": tag,
                                       "limit": limit, "after_id": after_id}, rows="all")
    return [job_from_row(r) for r in rows]


def delete_job(job_id: int, user_id: str | None, force: bool) -> Op[None]:
    yield from _q("job_delete", {"job_id": job_id, "user_id": user_id, "force": force})


def pause_job(job_id: int, user_id: str | None) -> Op[Job]:
    yield from _q("job_pause", {"job_id": job_id, "user_id": user_id})
    return (yield from _read_job(job_id, None))


def resume_job(job_id: int, user_id: str | None, clock: Clock) -> Op[Job]:
    for _ in range(_OPTIMISTIC_ATTEMPTS):
        job = yield from _read_job(job_id, user_id)
        nxt = None
        if job.status != "active":
            sched = schedule.parse(job.cron, job.timezone)
            now = yield from _db_now(clock)
            nxt = schedule.first_run(sched, now=now, start_at=job.start_at, end_at=job.end_at)
        row = yield from _q("job_resume", {
            "job_id": job_id, "next_run_at": nxt, "expected_updated_at": job.updated_at,
            "user_id": user_id, "now": clock(),
        })
        if row is not None and _first(row):
            return (yield from _read_job(job_id, user_id))
        yield Commit()
    raise LockAcquisitionFailed(f"job {job_id} kept changing while being resumed; try again")


def stop_job(job_id: int, user_id: str | None, cancel_running: bool, clock: Clock) -> Op[Job]:
    yield from _q("job_stop", {"job_id": job_id, "user_id": user_id,
                               "cancel_running": cancel_running, "now": clock()})
    return (yield from _read_job(job_id, None))


def trigger_job(job_id: int, user_id: str | None, clock: Clock) -> Op[Execution]:
    row = yield from _q("job_trigger", {"job_id": job_id, "user_id": user_id,
                                        "now": clock()})
    return (yield from _read_execution(int(_first(row)), None))


# ---------------------------------------------------------------- executions


def cancel_execution(execution_id: int, user_id: str | None, clock: Clock) -> Op[Execution]:
    yield from _q("job_cancel_execution", {"execution_id": execution_id,
                                           "user_id": user_id, "now": clock()})
    return (yield from _read_execution(execution_id, None))


def get_execution(execution_id: int, user_id: str | None) -> Op[Execution]:
    return (yield from _read_execution(execution_id, user_id))


def list_executions(job_id: int | None, user_id: str | None, status: str | None, limit: int,
                    before_id: int | None) -> Op[list[Execution]]:
    if not 1 <= limit <= 10000:
        raise errors.InvalidInput("limit must be between 1 and 10000")
    rows = yield from _q("executions_list", {
        "job_id": job_id, "user_id": user_id, "status": status, "limit": limit,
        "before_id": before_id if before_id is not None else _NO_ID,
    }, rows="all")
    return [Execution.model_validate(r) for r in rows]


def stats(user_id: str | None, since: dt.datetime | None, clock: Clock) -> Op[JobStats]:
    if since is None:
        since = (yield from _db_now(clock)) - dt.timedelta(hours=24)
    with translate():
        job_rows = yield Fetch(query("jobs_stats_jobs"), {"user_id": user_id}, rows="all")
        ex_rows = yield Fetch(query("jobs_stats_executions"),
                              {"user_id": user_id, "since": since}, rows="all")
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
        since=since, user_id=user_id, jobs_by_status=jobs_by_status,
        executions_by_status=by_status, executions_by_trigger=by_trigger,
        running=running, pending=pending,
        success_rate=by_status.get("succeeded", 0) / done if done else None,
        duration_ms_avg=total[3], duration_ms_p95=total[4],
        firing_delay_ms_p50=total[5], firing_delay_ms_p99=total[6],
        retries=by_trigger.get("retry", 0), misfires=int(total[7] or 0),
    )


def purge_executions(clock: Clock) -> Op[int]:
    """Delete history past its retention in batches of 10000, each batch one unit of work."""
    deleted = 0
    while True:
        with translate():
            row = yield Fetch(query("job_purge"), {"now": clock()})
        n = int(row[0]) if row else 0
        deleted += n
        if n < 10000:
            return deleted
        yield Commit()
