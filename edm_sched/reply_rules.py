"""Reply rules: what a provider's answer to a failed send means (issue 15, point 2).

The rules are data in SQL (``edm.reply_rules``, applied by ``edm.complete``;
see migration 0017). When a send fails with a reply, the first enabled rule
(lowest ``priority``) whose every given criterion matches decides:

=================== ================================================================
action              effect
=================== ================================================================
``suspend_site``    the (service, recipient's site) pair stops for ``duration_s``,
                    escalating on repeats (``duration_s * escalation_factor **
                    (level - 1)``, at most ``max_duration_s``; back to level 1 after
                    ``reset_after_s`` of calm); the subtask returns to pending with
                    no attempt, quota unit or service failure spent. A recipient
                    whose domain maps to no site is retried after ``duration_s``
                    instead (also spending nothing).
``suspend_service`` the service backs off for ``duration_s``; the subtask returns to
                    pending like a ``service`` outcome
``bounce``          the subtask fails for good
``retry``           the recipient is retried after ``duration_s`` (one attempt spent)
=================== ================================================================

Criteria: ``smtp_code`` (exact), ``enhanced_code`` (exact, or a class prefix
ending with a dot such as ``"4.7."``), ``pattern`` (a case-insensitive
PostgreSQL regular expression on the reply text), ``transport_code`` (a
non-SMTP transport's error code, ``kind:code`` such as ``http:429``), and
``site`` (only for recipients of that site).

What a rule sees is what the transport reported: the SMTP code and the detail
text, e.g. ``"RCPT TO: 421 4.7.28 ... unusual rate ..."`` (the enhanced code is
read from it). A non-SMTP transport reports its error code in
:attr:`edm_sched.transports.base.SendResult.error_code`; the dispatcher puts it
in front of the detail in brackets (:func:`reply_detail`), where
``edm.reply_transport_code`` finds it.

Every application is logged in ``edm.shaping_actions``; suspensions are listed
with their rule and reply by ``edm.site_suspension_status``
(:func:`suspensions_op`).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from edm_sched import errors
from edm_sched.core import Fetch, Op
from edm_sched.models import validate
from edm_sched.ops import check_id
from edm_sched.sqlfiles import query

Action = Literal["suspend_site", "suspend_service", "bounce", "retry"]
RuleName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.:-]{0,99}$")]
SiteName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")]
_TRANSPORT_CODE = re.compile(r"^[A-Za-z0-9_-]{1,20}:[A-Za-z0-9_.-]{1,80}$")
MAX_SECONDS = 30 * 86400


class ReplyRuleSpec(BaseModel):
    """A reply rule to create or replace (by ``name``); see the module doc."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="reply rule")

    name: RuleName
    action: Action
    smtp_code: int | None = Field(default=None, ge=200, le=599)
    enhanced_code: Annotated[str, StringConstraints(
        pattern=r"^[245]\.([0-9]{1,3}\.([0-9]{1,3})?)?$")] | None = None
    pattern: Annotated[str, StringConstraints(min_length=1, max_length=500)] | None = None
    transport_code: Annotated[str, StringConstraints(
        pattern=_TRANSPORT_CODE.pattern)] | None = None
    site: SiteName | None = None
    priority: int = Field(default=100, ge=0, le=1_000_000)
    duration_seconds: int | None = Field(default=None, ge=1, le=MAX_SECONDS)
    escalation_factor: float = Field(default=1.0, ge=1, le=100)
    max_duration_seconds: int | None = Field(default=None, ge=1, le=MAX_SECONDS)
    reset_after_seconds: int = Field(default=3600, ge=0, le=MAX_SECONDS)
    enabled: bool = True
    description: Annotated[str, StringConstraints(max_length=500)] = ""

    @model_validator(mode="after")
    def _shape(self) -> ReplyRuleSpec:
        if (self.smtp_code is None and self.enhanced_code is None and self.pattern is None
                and self.transport_code is None):
            raise ValueError("give at least one of smtp_code, enhanced_code, pattern, "
                             "transport_code (a rule matching every reply is refused)")
        if (self.action == "bounce") != (self.duration_seconds is None):
            raise ValueError("bounce takes no duration_seconds; the other actions need one")
        if self.max_duration_seconds is not None and (
                self.duration_seconds is None
                or self.max_duration_seconds < self.duration_seconds):
            raise ValueError("max_duration_seconds must be at least duration_seconds")
        return self

    def as_sql(self) -> dict[str, Any]:
        return {
            "name": self.name, "action": self.action, "smtp_code": self.smtp_code,
            "enhanced_code": self.enhanced_code, "pattern": self.pattern,
            "transport_code": self.transport_code, "site": self.site,
            "priority": self.priority, "duration_s": self.duration_seconds,
            "escalation_factor": self.escalation_factor,
            "max_duration_s": self.max_duration_seconds,
            "reset_after_s": self.reset_after_seconds, "enabled": self.enabled,
            "description": self.description,
        }


class ReplyRule(BaseModel):
    """One row of ``edm.reply_rules``."""

    model_config = ConfigDict(frozen=True)

    rule_id: int
    name: str
    priority: int
    enabled: bool
    source: Literal["shipped", "admin"]
    site: str | None
    smtp_code: int | None
    enhanced_code: str | None
    pattern: str | None
    transport_code: str | None
    action: Action
    duration_s: int | None
    escalation_factor: float
    max_duration_s: int | None
    reset_after_s: int
    description: str
    updated_at: dt.datetime


class SiteSuspension(BaseModel):
    """One row of ``edm.site_suspension_status``: a (service, site) pair's suspension."""

    model_config = ConfigDict(frozen=True)

    service_id: int
    service_name: str
    site: str
    until: dt.datetime
    level: int
    in_force: bool
    created_at: dt.datetime
    reason: str
    rule_id: int | None
    rule_name: str | None
    last_reply_at: dt.datetime | None
    last_code: int | None
    last_reply: str | None


class ShapingAction(BaseModel):
    """One row of ``edm.shaping_actions``: a reply rule applied to one completed send."""

    model_config = ConfigDict(frozen=True)

    action_id: int
    at: dt.datetime
    rule_id: int | None
    rule_name: str
    service_id: int
    site: str | None
    subtask_id: int | None
    action: Action
    until: dt.datetime | None
    level: int | None
    code: int | None
    reply: str | None


def reply_detail(detail: str | None, error_code: str | None) -> str | None:
    """The detail ``edm.complete`` gets for a result: a transport error code goes in
    front, in brackets (``"[http:429] Too Many Requests"``), where reply rules find it.

    A malformed code (not ``kind:code`` of letters, digits, ``_ . -``) is left out.
    """
    if error_code is None or not _TRANSPORT_CODE.match(error_code):
        return detail
    return f"[{error_code}] {detail}" if detail else f"[{error_code}]"


# -------------------------------------------------------------------------- ops


_RULE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.:-]{0,99}$")


def _name(name: str) -> str:
    if not isinstance(name, str) or not _RULE_NAME.match(name):
        raise errors.InvalidInput(f"reply rule name must be 1 to 100 of a-z 0-9 _ . : -, "
                                  f"got {name!r}")
    return name


def reply_rules_op() -> Op[list[ReplyRule]]:
    rows = yield Fetch(query("reply_rules"), None, rows="all", dicts=True)
    return [ReplyRule.model_validate(r) for r in rows]


def set_reply_rule_op(spec: ReplyRuleSpec | Mapping[str, Any]) -> Op[int]:
    rule = validate(ReplyRuleSpec, spec)
    row = yield Fetch(query("set_reply_rule"), rule.as_sql())
    assert row is not None
    return int(row[0])


def enable_reply_rule_op(name: str, enabled: bool = True) -> Op[None]:
    yield Fetch(query("enable_reply_rule"), (_name(name), bool(enabled)))


def delete_reply_rule_op(name: str) -> Op[None]:
    yield Fetch(query("delete_reply_rule"), (_name(name),))


def match_reply_rule_op(code: int | None, detail: str,
                        site: str | None = None) -> Op[str | None]:
    row = yield Fetch(query("match_reply_rule"), (code, detail, site))
    return None if row is None else str(row[0])


def suspensions_op(service_id: int | None = None, *,
                   in_force: bool = False) -> Op[list[SiteSuspension]]:
    sid = None if service_id is None else check_id(service_id, "service_id")
    rows = yield Fetch(query("site_suspensions"), {"service_id": sid, "in_force": in_force},
                       rows="all", dicts=True)
    return [SiteSuspension.model_validate(r) for r in rows]


def lift_suspension_op(service_id: int, site: str) -> Op[bool]:
    row = yield Fetch(query("lift_site_suspension"), (check_id(service_id, "service_id"), site))
    return bool(row and row[0])


def shaping_actions_op(service_id: int | None = None, *,
                       limit: int = 100) -> Op[list[ShapingAction]]:
    sid = None if service_id is None else check_id(service_id, "service_id")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
        raise errors.InvalidInput(f"limit must be 1 to 10000, got {limit!r}")
    rows = yield Fetch(query("shaping_actions"), {"service_id": sid, "limit": limit},
                       rows="all", dicts=True)
    return [ShapingAction.model_validate(r) for r in rows]
