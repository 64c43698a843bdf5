"""The monitoring views as pydantic models (what ``Scheduler.monitoring`` returns).

They mirror ``edm.system_health``, ``edm.task_progress``,
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
    sent_pct: float | None = None  # sent share, rounded down: never 100 while one failed
    outcome: str | None = None  # finished tasks: all sent, partly sent, none sent, cancelled...


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


__all__ = ["Alert", "ConfigEntry", "ServiceState", "Status", "SystemHealth", "TaskProgress",
           "WaitReason"]
