"""Traffic shaping: layered limits and the transactional lane (issue 15).

Besides a service's own limits (``set_service_limits``), the claim holds
limits of the same form (rate with burst, rolling window, calendar day; see
:class:`~edm_sched.models.ServiceLimit`) on five more layers, all at once:

============  ============================================  ==========================
scope         what it limits                                without headroom
============  ============================================  ==========================
global        every send of every service                   the slots wait or stop
site          one destination site across all services      its recipients are skipped
service_site  one service to one site                       its recipients are skipped
user          one tenant (a plan: per hour, per day...)     the user is skipped
task          one campaign (its maximum rate)               the task is skipped
============  ============================================  ==========================

A skipped recipient, user or task gives its slot to the next one, so a site
with no headroom never blocks the others (no head-of-line blocking). The rules
are SQL's (``edm.shaping_limits``, ``edm.claim_v2``, migration 0016); this
module only validates and calls them. A transactional task (``TaskSpec``
``transactional=True``, :func:`set_task_transactional_op`, or one message from
``Scheduler.send_message``) is claimed ahead of bulk work, for at most
``queue.transactional_share`` of a service's slots while bulk work waits.
See docs/explanation/traffic-shaping.md.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from psycopg.types.json import Jsonb

from edm_sched import errors
from edm_sched.core import Fetch, Op
from edm_sched.models import CreatedTask, LimitStatus, ServiceLimit, Template, validate
from edm_sched.ops import check_id, create_task
from edm_sched.sqlfiles import query

Scope = Literal["global", "site", "service_site", "user", "task"]
SCOPES: tuple[str, ...] = ("global", "site", "service_site", "user", "task")


class ShapingLimitStatus(LimitStatus):
    """One row of edm.shaping_limit_status: a shaping limit (the columns of a service's
    limit status) and the scope it limits."""

    scope: str
    site: str | None
    service_id: int | None
    user_id: str | None
    task_id: int | None


def _limits_json(limits: Iterable[ServiceLimit | Mapping[str, Any]]) -> Jsonb:
    if isinstance(limits, (str, bytes, Mapping)):
        raise errors.InvalidInput("limits must be a list of limits")
    return Jsonb([validate(ServiceLimit, lim).as_sql() for lim in limits])


def _one(sql: Any, params: Any) -> Op[Any]:
    row = yield Fetch(sql, params)
    return None if row is None else row[0]


def _check_text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= 200:
        raise errors.InvalidInput(f"{what} must be a string of 1 to 200 characters, got {value!r}")
    return value


def set_global_limits_op(limits: Iterable[ServiceLimit | Mapping[str, Any]]) -> Op[int]:
    body = _limits_json(limits)
    return int((yield from _one(query("set_global_limits"), (body,))))


def set_site_limits_op(site: str, limits: Iterable[ServiceLimit | Mapping[str, Any]],
                       service_id: int | None = None) -> Op[int]:
    _check_text(site, "site")
    body = _limits_json(limits)
    sid = None if service_id is None else check_id(service_id, "service_id")
    return int((yield from _one(query("set_site_limits"), (site, body, sid))))


def set_user_limits_op(user_id: str, limits: Iterable[ServiceLimit | Mapping[str, Any]]) -> Op[int]:
    _check_text(user_id, "user_id")
    body = _limits_json(limits)
    return int((yield from _one(query("set_user_limits"), (user_id, body))))


def set_task_limits_op(task_id: int, limits: Iterable[ServiceLimit | Mapping[str, Any]]) -> Op[int]:
    tid = check_id(task_id, "task_id")
    body = _limits_json(limits)
    return int((yield from _one(query("set_task_limits"), (tid, body))))


def set_task_transactional_op(task_id: int, transactional: bool) -> Op[bool]:
    tid = check_id(task_id, "task_id")
    if not isinstance(transactional, bool):
        raise errors.InvalidInput(f"transactional must be True or False, got {transactional!r}")
    return bool((yield from _one(query("set_task_transactional"), (tid, transactional))))


def shaping_limits_op(scope: str | None = None) -> Op[list[ShapingLimitStatus]]:
    if scope is not None and scope not in SCOPES:
        raise errors.InvalidInput(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    rows = yield Fetch(query("shaping_limits"), {"scope": scope}, rows="all", dicts=True)
    return [ShapingLimitStatus.model_validate(r) for r in rows]


def send_message_op(user_id: str, to: str, template: Template | Mapping[str, Any], *,
                    vars: Mapping[str, Any] | None = None, name: str | None = None,
                    scheduled_at: dt.datetime | None = None) -> Op[CreatedTask]:
    """One message as a one-recipient transactional task (create_task does the rest:
    validation, suppressions, quota)."""
    tpl = template.model_dump() if isinstance(template, Template) else dict(template)
    tpl.setdefault("list_unsubscribe", False)
    spec: dict[str, Any] = {
        "user_id": user_id, "name": name or "message", "templates": [tpl],
        "recipients": [{"email": to, "vars": None if vars is None else dict(vars)}],
        "transactional": True, "list_unsubscribe": False,
    }
    if scheduled_at is not None:
        spec["scheduled_at"] = scheduled_at
    return (yield from create_task(spec))
