"""Typed errors of recurring jobs, carrying the codes of the task-scheduling service.

SQL functions of ``sql/migrations/0005_jobs.sql`` raise SQLSTATEs ED010..ED015,
mapped onto these classes by :mod:`edm_sched.db` (registered below: the core
never imports this feature package). Each class also derives from
the generic edm-sched error of the same family (``InvalidInput``, ``NotFound``,
``QuotaExceeded``), so callers may catch either.
"""

from __future__ import annotations

from edm_sched import db, errors


class InvalidCronExpression(errors.InvalidInput):
    """A cron expression cronsim rejects, or one that never fires."""

    code = "INVALID_CRON_EXPRESSION"


class JobNotFound(errors.NotFound):
    """No job with this id (or none of this user)."""

    code = "JOB_NOT_FOUND"


class ExecutionNotFound(errors.NotFound):
    """No execution with this id (or none of this user)."""

    code = "EXECUTION_NOT_FOUND"


class JobAlreadyRunning(errors.EdmSchedError):
    """The job already has ``max_concurrent`` executions pending or running."""

    code = "JOB_ALREADY_RUNNING"


class InvalidJobConfig(errors.InvalidInput):
    """A job definition the library or the database refuses; nothing was written."""

    code = "INVALID_JOB_CONFIG"


class DestinationNotAllowed(InvalidJobConfig):
    """An ``http`` job's URL points where the outbound guard refuses to go (loopback,
    private, link-local... in any spelling) and the host's ``jobs.http_allow`` does not
    open it; nothing was written."""

    code = "DESTINATION_NOT_ALLOWED"


class LockAcquisitionFailed(errors.EdmSchedError):
    """A job or execution stayed locked by another session past the lock timeout."""

    code = "LOCK_ACQUISITION_FAILED"


class JobQuotaExceeded(errors.QuotaExceeded):
    """The user already owns ``jobs.max_jobs_per_user`` jobs."""

    code = "QUOTA_EXCEEDED"


class PermanentJobError(Exception):
    """Raise from a job function to fail the execution without any retry."""


__all__ = [
    "DestinationNotAllowed",
    "ExecutionNotFound",
    "InvalidCronExpression",
    "InvalidJobConfig",
    "JobAlreadyRunning",
    "JobNotFound",
    "JobQuotaExceeded",
    "LockAcquisitionFailed",
    "PermanentJobError",
]

# Recurring jobs' SQLSTATEs (sql/migrations/0005_jobs.sql).
db.register_sqlstates({
    "ED010": JobNotFound,
    "ED011": JobAlreadyRunning,
    "ED012": InvalidJobConfig,
    "ED013": LockAcquisitionFailed,
    "ED014": JobQuotaExceeded,
    "ED015": ExecutionNotFound,
})
