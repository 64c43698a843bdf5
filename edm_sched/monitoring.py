"""Monitoring: the SQL views as pydantic models, and config access.

Everything here reads ``edm.system_health``, ``edm.task_progress``,
``edm.service_status``, ``edm.task_wait_reasons`` and ``edm.alerts`` — the same
views a DBA queries in psql.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel, ConfigDict


class _View(BaseModel):
    model_config = ConfigDict(frozen=True)


class SystemHealth(_View):
    services_total: int
    services_enabled: int
    services_available: int
    services_active_last_minute: int
    pending_subtasks: int
    leased_subtasks: int
    active_tasks: int
    sent_last_minute: int
    error_rate_last_hour: float
    open_alerts: int
    dispatchers_alive: int


class TaskProgress(_View):
    task_id: int
    user_id: str
    name: str
    status: str
    priority: int
    scheduled_at: dt.datetime
    total: int
    sent: int
    pending: int
    leased: int
    failed: int
    cancelled: int
    progress_pct: float
    first_send_wait_s: float | None
    sends_per_s: float | None
    eta_s: float | None
    last_activity_at: dt.datetime | None
    stuck_since: dt.datetime | None


class ServiceState(_View):
    service_id: int
    name: str
    transport: str
    enabled: bool
    state: str
    next_available_at: dt.datetime | None
    interval_ms: int
    daily_quota: int
    sent_today: int
    quota_used_pct: float
    sent_last_hour: int
    success_rate: float
    avg_response_ms: float | None
    health: str
    consecutive_failures: int
    backoff_until: dt.datetime | None
    last_error: str | None
    total_sent: int
    total_failed: int


class WaitReason(_View):
    task_id: int
    user_id: str
    name: str
    status: str
    reason: str
    until: dt.datetime | None


class Alert(_View):
    alert_id: int
    raised_at: dt.datetime
    kind: str
    severity: str
    task_id: int | None
    service_id: int | None
    user_id: str | None
    message: str


class Status(_View):
    health: SystemHealth
    tasks: list[TaskProgress]
    services: list[ServiceState]
    waiting: list[WaitReason]
    alerts: list[Alert]


class ConfigEntry(_View):
    key: str
    value: Any
    default_value: Any
    category: str
    value_type: str
    min_value: float | None
    max_value: float | None
    allowed_values: list[str] | None
    unit: str | None
    description: str
    updated_at: dt.datetime
    updated_by: str | None


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
