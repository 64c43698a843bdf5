"""Monitoring: the SQL views as pydantic models, and config access.

The models live in :mod:`edm_sched.views` (re-exported here); the free
functions below are the deprecated one-shot forms of ``Scheduler.monitoring``.
"""

from __future__ import annotations

from typing import Any

from edm_sched.views import (
    Alert,
    ConfigEntry,
    ServiceState,
    Status,
    SystemHealth,
    TaskProgress,
    WaitReason,
)

# The one-shot functions below predate ``Scheduler.monitoring`` and stay for
# compatibility (deprecated): same operations, one short connection per call.


def status(dsn: str, *, limit: int = 50) -> Status:
    """System health, recent tasks, services, waiting reasons and open alerts.

    Deprecated: ``Scheduler(dsn).monitoring.status()``.
    """
    from edm_sched import core, ops

    return core.run_on(dsn, ops.status(limit))


def config_list(dsn: str) -> list[ConfigEntry]:
    """Deprecated: ``Scheduler(dsn).monitoring.config_list()``."""
    from edm_sched import core, ops

    return core.run_on(dsn, ops.config_list())


def config_get(dsn: str, key: str) -> ConfigEntry:
    """Deprecated: ``Scheduler(dsn).monitoring.config_get(key)``."""
    from edm_sched import core, ops

    return core.run_on(dsn, ops.config_get(key))


def config_set(dsn: str, key: str, value: Any, *, actor: str | None = None) -> Any:
    """Set a config value; refused values raise :class:`errors.ConfigRejected`.

    ``value`` may be a Python value or its text form (``"60"``, ``"true"``):
    text is read as JSON when it parses, else kept as a string.
    Deprecated: ``Scheduler(dsn, actor=...).monitoring.config_set(key, value)``.
    """
    from edm_sched import core, ops

    return core.run_on(dsn, ops.config_set(key, value, actor))


__all__ = ["Alert", "ConfigEntry", "ServiceState", "Status", "SystemHealth", "TaskProgress",
           "WaitReason", "config_get", "config_list", "config_set", "status"]
