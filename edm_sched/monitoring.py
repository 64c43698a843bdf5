"""Monitoring: the SQL views as pydantic models, and config access.

Everything here reads ``edm.system_health``, ``edm.task_progress``,
``edm.service_status``, ``edm.task_wait_reasons`` and ``edm.alerts`` — the same
views a DBA queries in psql.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from typing import Any

from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from pydantic import BaseModel, ConfigDict

from edm_sched import db, errors
from edm_sched.sqlfiles import query


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


def status(dsn: str, *, limit: int = 50) -> Status:
    """System health, recent tasks, services, waiting reasons and open alerts."""
    with db.connect(dsn) as conn, db.translate():
        cur = conn.cursor(row_factory=dict_row)
        health = cur.execute(query("system_health")).fetchone()
        return Status(
            health=SystemHealth.model_validate(health),
            tasks=[TaskProgress.model_validate(r)
                   for r in cur.execute(query("task_progress"), (limit,)).fetchall()],
            services=[ServiceState.model_validate(r)
                      for r in cur.execute(query("service_status"), (limit,)).fetchall()],
            waiting=[WaitReason.model_validate(r)
                     for r in cur.execute(query("task_wait_reasons"), (limit,)).fetchall()],
            alerts=[Alert.model_validate(r)
                    for r in cur.execute(query("open_alerts"), (limit,)).fetchall()],
        )


def config_list(dsn: str) -> list[ConfigEntry]:
    with db.connect(dsn) as conn, db.translate():
        rows = conn.cursor(row_factory=dict_row).execute(query("config_list")).fetchall()
    return [ConfigEntry.model_validate(r) for r in rows]


def config_get(dsn: str, key: str) -> ConfigEntry:
    with db.connect(dsn) as conn, db.translate():
        row = conn.cursor(row_factory=dict_row).execute(query("config_get"), (key,)).fetchone()
    if row is None:
        raise errors.NotFound(f"unknown config key {key!r}")
    return ConfigEntry.model_validate(row)


def config_set(dsn: str, key: str, value: Any, *, actor: str | None = None) -> Any:
    """Set a config value; refused values raise :class:`errors.ConfigRejected`.

    ``value`` may be a Python value or its text form (``"60"``, ``"true"``):
    text is read as JSON when it parses, else kept as a string.
    """
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = json.loads(value)
    with db.connect(dsn) as conn, db.translate():  # ED006 -> ConfigRejected
        row = conn.execute(query("config_set"), (key, Jsonb(value), actor)).fetchone()
    return None if row is None else row[0]
