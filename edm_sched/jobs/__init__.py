"""Recurring jobs on the same PostgreSQL: cron schedules with time zones, run exactly once.

The host creates jobs with :class:`JobScheduler` (or ``edm-sched jobs ...``)
and runs :func:`run_jobs` (in a thread, an asyncio task via ``to_thread``, or
its own process) with a registry of its functions. See ``docs/jobs.md``.

The errors are imported eagerly (``edm_sched.db`` maps SQLSTATEs onto them);
everything else is loaded on first use, so importing this package from
``edm_sched.db`` creates no import cycle.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from edm_sched.jobs.errors import (
    DestinationNotAllowed,
    ExecutionNotFound,
    InvalidCronExpression,
    InvalidJobConfig,
    JobAlreadyRunning,
    JobNotFound,
    JobQuotaExceeded,
    LockAcquisitionFailed,
    PermanentJobError,
)

if TYPE_CHECKING:
    from edm_sched.jobs.api import JobScheduler
    from edm_sched.jobs.kinds import LAUNCH_CAMPAIGN, JobContext, JobRegistry
    from edm_sched.jobs.models import (
        BasicAuth,
        CronPreview,
        Execution,
        FunctionTarget,
        HttpTarget,
        Job,
        JobSpec,
        JobStats,
        JobUpdate,
        LaunchCampaignTarget,
        RetryPolicy,
        SecretRef,
        ShellTarget,
    )
    from edm_sched.jobs.outbound import SecretResolver
    from edm_sched.jobs.runner import JobRunner, RunnerStats, run_jobs

_LAZY = {
    "JobScheduler": "edm_sched.jobs.api",
    "LAUNCH_CAMPAIGN": "edm_sched.jobs.kinds",
    "JobContext": "edm_sched.jobs.kinds",
    "JobRegistry": "edm_sched.jobs.kinds",
    "CronPreview": "edm_sched.jobs.models",
    "Execution": "edm_sched.jobs.models",
    "FunctionTarget": "edm_sched.jobs.models",
    "HttpTarget": "edm_sched.jobs.models",
    "Job": "edm_sched.jobs.models",
    "JobSpec": "edm_sched.jobs.models",
    "JobStats": "edm_sched.jobs.models",
    "JobUpdate": "edm_sched.jobs.models",
    "LaunchCampaignTarget": "edm_sched.jobs.models",
    "RetryPolicy": "edm_sched.jobs.models",
    "ShellTarget": "edm_sched.jobs.models",
    "BasicAuth": "edm_sched.jobs.models",
    "SecretRef": "edm_sched.jobs.models",
    "SecretResolver": "edm_sched.jobs.outbound",
    "JobRunner": "edm_sched.jobs.runner",
    "RunnerStats": "edm_sched.jobs.runner",
    "run_jobs": "edm_sched.jobs.runner",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edm_sched.jobs' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "LAUNCH_CAMPAIGN",
    "BasicAuth",
    "CronPreview",
    "DestinationNotAllowed",
    "Execution",
    "ExecutionNotFound",
    "FunctionTarget",
    "HttpTarget",
    "InvalidCronExpression",
    "InvalidJobConfig",
    "Job",
    "JobAlreadyRunning",
    "JobContext",
    "JobNotFound",
    "JobQuotaExceeded",
    "JobRegistry",
    "JobRunner",
    "JobScheduler",
    "JobSpec",
    "JobStats",
    "JobUpdate",
    "LaunchCampaignTarget",
    "LockAcquisitionFailed",
    "PermanentJobError",
    "RetryPolicy",
    "RunnerStats",
    "SecretRef",
    "SecretResolver",
    "ShellTarget",
    "run_jobs",
]
