"""edm-sched: a PostgreSQL-centric scheduler for the sending side of email marketing.

The rules (readiness, quotas, fair rotation, the atomic claim) live in SQL
functions of schema ``edm``; this package wraps them, runs the dispatcher loop
and the recovery sweeps.

One entry point::

    from edm_sched import Scheduler, AsyncScheduler, run_dispatcher, TaskSpec, InvalidInput

The errors are imported eagerly (they import nothing); everything else is
loaded on first use, so ``import edm_sched`` stays cheap (no psycopg, no
pydantic until a name that needs them is touched).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from edm_sched.errors import (
    AlreadyExists,
    ConfigRejected,
    ConfigurationError,
    DatabaseUnavailable,
    EdmSchedError,
    InvalidInput,
    InvalidTransition,
    LeaseLost,
    MigrationError,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
)

if TYPE_CHECKING:
    from edm_sched.api import AsyncScheduler, Scheduler
    from edm_sched.dispatcher import run_dispatcher
    from edm_sched.migrations import migrate
    from edm_sched.models import (
        Contact,
        ContactImport,
        CreatedTask,
        InvalidAddress,
        LimitStatus,
        Recipient,
        Service,
        ServiceLimit,
        ServiceSpec,
        ServiceUpdate,
        TagRule,
        TaskSpec,
        TaskStatus,
        Template,
        UserInfo,
    )
    from edm_sched.monitoring import ConfigEntry, Status
    from edm_sched.ops import InvalidRecipients

__version__ = "0.1.0"

_LAZY = {
    "Scheduler": "edm_sched.api",
    "AsyncScheduler": "edm_sched.api",
    "run_dispatcher": "edm_sched.dispatcher",
    "migrate": "edm_sched.migrations",
    "InvalidRecipients": "edm_sched.ops",
    "Status": "edm_sched.monitoring",
    "ConfigEntry": "edm_sched.monitoring",
    **{name: "edm_sched.models" for name in (
        "Contact", "ContactImport", "CreatedTask", "InvalidAddress", "LimitStatus", "Recipient",
        "Service", "ServiceLimit", "ServiceSpec", "ServiceUpdate", "TagRule", "TaskSpec",
        "TaskStatus", "Template", "UserInfo")},
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edm_sched' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AlreadyExists",
    "AsyncScheduler",
    "ConfigEntry",
    "ConfigRejected",
    "ConfigurationError",
    "Contact",
    "ContactImport",
    "CreatedTask",
    "DatabaseUnavailable",
    "EdmSchedError",
    "InvalidAddress",
    "InvalidInput",
    "InvalidRecipients",
    "InvalidTransition",
    "LeaseLost",
    "LimitStatus",
    "MigrationError",
    "NotFound",
    "PermissionDenied",
    "QuotaExceeded",
    "Recipient",
    "Scheduler",
    "Service",
    "ServiceLimit",
    "ServiceSpec",
    "ServiceUpdate",
    "Status",
    "TagRule",
    "TaskSpec",
    "TaskStatus",
    "Template",
    "UserInfo",
    "migrate",
    "run_dispatcher",
]
