"""Pydantic models at the boundary: what the host passes in and gets back.

Input models validate shape and ranges before anything reaches the database;
the SQL functions check again (they are the authority, reachable from plain
SQL too). Output models are built from named columns, never ``SELECT *``.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import jinja2
import pydantic
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from edm_sched import errors, rendering

M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], value: M | Mapping[str, Any], *,
             error: type[errors.EdmSchedError] = errors.InvalidInput,
             what: str | None = None) -> M:
    """``value`` as ``model``; a pydantic error becomes ``error`` (InvalidInput by default),
    naming every problem: ``invalid <what>: field: message; ...``."""
    if isinstance(value, model):
        return value
    try:
        return model.model_validate(value)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'value'}: "
            f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors()
        )
        # The model's title, when it has one, is the name users see (internal
        # argument models are private classes: their names mean nothing to a user).
        name = what or model.model_config.get("title") or model.__name__
        # A validator that raised a specific typed error (InvalidTemplate, InvalidHeader...)
        # names the kind of the refusal: the first such error's class is raised.
        typed = [e["ctx"]["error"] for e in exc.errors()
                 if isinstance(e.get("ctx", {}).get("error"), errors.EdmSchedError)]
        raise (type(typed[0]) if typed else error)(f"invalid {name}: {problems}") from None

_CTRL = re.compile(r"[\x00-\x1f\x7f]")


def _no_control(value: str) -> str:
    if _CTRL.search(value):
        raise ValueError("must not contain control characters (CR, LF, NUL...)")
    return value


def _timezone(value: str) -> str:
    if len(value) > 64:  # as edm.is_valid_timezone; longer names also overflow file names
        raise ValueError("unknown time zone (names are at most 64 characters)")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise ValueError(f"unknown time zone {value!r}") from exc
    return value


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    if value is not None and value.tzinfo is None:
        raise ValueError("datetimes must be timezone-aware")
    return value


_SingleLine = AfterValidator(_no_control)
UserId = Annotated[str, StringConstraints(min_length=1, max_length=128), _SingleLine]
Name = Annotated[str, StringConstraints(min_length=1, max_length=200), _SingleLine]
TaskName = Annotated[str, StringConstraints(min_length=1, max_length=300), _SingleLine]
DisplayName = Annotated[str, StringConstraints(max_length=200), _SingleLine]
Email = Annotated[str, StringConstraints(min_length=3, max_length=254), _SingleLine]
Tag = Annotated[str, StringConstraints(min_length=1, max_length=100), _SingleLine]
TimeZone = Annotated[str, AfterValidator(_timezone)]
AwareDatetime = Annotated[dt.datetime | None, AfterValidator(_aware)]

# Size limits at the door (docs/reference/python.md, "Limits"). Each is far above
# what a campaign needs and far below what would hurt a dispatcher or a mailbox.
MAX_SUBJECT_CHARS = 998  # RFC 5322's line limit; a subject template longer is refused
MAX_BODY_CHARS = 1_000_000  # each of body_text and body_html, as templates
MAX_TEMPLATES_CHARS = 10_000_000  # all templates of one task together
MAX_VARS_BYTES = 65_536  # one recipient's variables, or one contact's attributes, as JSON


def _json_size(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":"),
                          default=str).encode("utf-8", "surrogatepass"))


def _json_may_exceed(value: dict[str, Any], limit: int) -> bool:
    """False when a flat mapping surely takes at most ``limit`` bytes as JSON: a bound
    of 6 bytes per character (the longest escape) spares the exact measure (a
    json.dumps, 3x the cost of validating a recipient) for the usual small vars."""
    bound = 2
    for key, item in value.items():
        if isinstance(item, str):
            bound += 6 * (len(key) + len(item)) + 8
        elif item is None or isinstance(item, (bool, int, float)):
            bound += 6 * len(key) + 40
        else:
            return True  # nested: measure
        if bound > limit:
            return True
    return False


def _small_json(what: str) -> AfterValidator:
    def check(value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value and _json_may_exceed(value, MAX_VARS_BYTES) and (
                _json_size(value) > MAX_VARS_BYTES):
            raise errors.PayloadTooLarge(
                f"{what} take more than {MAX_VARS_BYTES} bytes as JSON")
        return value
    return AfterValidator(check)


def _header_text(what: str) -> AfterValidator:
    """A header-bound text: no CR, LF, NUL, other line breaks or control characters."""
    def check(value: str | None) -> str | None:
        if value is not None and rendering.header_break(value):
            raise errors.InvalidHeader(
                f"{what} contains a line break, NUL or a control character: {value!r:.60}")
        return value
    return AfterValidator(check)


def _headers(value: dict[str, str]) -> dict[str, str]:
    try:
        rendering.check_headers(value, "headers")
    except ValueError as exc:
        raise errors.InvalidHeader(str(exc)) from None
    return value


Headers = Annotated[dict[str, str], AfterValidator(_headers)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


# --------------------------------------------------------------------- services


class ServiceLimit(_In):
    """One limit of a service beyond its interval and daily quota (edm.service_limits).

    ``rate``: at most ``max_count`` per ``window_seconds``, in bursts of at most
    ``burst`` (a token bucket); ``rolling``: at most ``max_count`` in any window
    of ``window_seconds`` (e.g. 86400 for a rolling 24 hours); ``calendar_day``:
    at most ``max_count`` per calendar day in ``time_zone`` (default: the
    service's quota_tz). See docs/explanation/rate-limits.md.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, title="service limit")

    name: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")]
    kind: Literal["rate", "rolling", "calendar_day"]
    max_count: int = Field(ge=0, le=100_000_000)
    window_seconds: float | None = Field(default=None, gt=0, le=31 * 86400)
    burst: int = Field(default=1, ge=1, le=100_000)
    time_zone: TimeZone | None = None

    @model_validator(mode="after")
    def _shape(self) -> ServiceLimit:
        if self.kind == "calendar_day":
            if self.window_seconds is not None or self.burst != 1:
                raise ValueError("a calendar_day limit takes no window_seconds or burst")
        elif self.window_seconds is None:
            raise ValueError(f"a {self.kind} limit needs window_seconds")
        elif self.time_zone is not None:
            raise ValueError(f"a {self.kind} limit takes no time_zone")
        if self.kind == "rolling" and (self.burst != 1 or (self.window_seconds or 0) < 1):
            raise ValueError("a rolling limit takes no burst and a window of at least 1 s")
        if self.kind == "rate" and self.burst > max(self.max_count, 1):
            raise ValueError("burst cannot exceed max_count")
        return self

    def as_sql(self) -> dict[str, Any]:
        """The JSON object edm.set_service_limits takes."""
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "max_count": self.max_count,
                               "burst": self.burst}
        if self.window_seconds is not None:
            out["window_ms"] = round(self.window_seconds * 1000)
        if self.time_zone is not None:
            out["time_zone"] = self.time_zone
        return out


class LimitStatus(_Out):
    """One row of edm.service_limit_status: a limit, its use and headroom."""

    limit_name: str
    kind: str
    max_count: int
    window_ms: int | None
    burst: int
    used: int
    headroom: int
    next_free_at: dt.datetime | None


class ServiceSpec(_In):
    name: Name
    from_addresses: list[Email] = Field(min_length=1, max_length=100)
    interval_seconds: float = Field(ge=0, le=86400, description="least time between send starts")
    daily_quota: int = Field(ge=0, le=2_000_000_000)
    transport: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}$")] = "smtp"
    settings: dict[str, Any] = Field(default_factory=dict)
    credential_ref: Annotated[str, StringConstraints(max_length=500)] | None = None
    quota_tz: TimeZone = "UTC"
    enabled: bool = True
    limits: list[ServiceLimit] = Field(default_factory=list, max_length=20,
                                       description="extra limits (edm.service_limits)")

    @model_validator(mode="after")
    def _service_headers(self) -> ServiceSpec:
        _settings_headers(self.settings)
        return self

    @model_validator(mode="after")
    def _no_secrets(self) -> ServiceSpec:
        secret = {"password", "secret", "api_key", "token", "passwd"} & set(self.settings)
        if secret:
            raise ValueError(
                f"settings must not hold secrets ({', '.join(sorted(secret))}); "
                "set credential_ref and resolve the secret in the host"
            )
        return self


class ServiceUpdate(_In):
    name: Name | None = None
    from_addresses: list[Email] | None = Field(default=None, min_length=1, max_length=100)
    interval_seconds: float | None = Field(default=None, ge=0, le=86400)
    daily_quota: int | None = Field(default=None, ge=0, le=2_000_000_000)
    settings: dict[str, Any] | None = None
    credential_ref: Annotated[str, StringConstraints(max_length=500)] | None = None
    quota_tz: TimeZone | None = None
    enabled: bool | None = None

    @model_validator(mode="after")
    def _service_headers(self) -> ServiceUpdate:
        _settings_headers(self.settings)
        return self


def _settings_headers(settings: dict[str, Any] | None) -> None:
    """``settings["headers"]``: the service's custom header fields, added to every message."""
    if settings and "headers" in settings:
        headers = settings["headers"]
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            raise errors.InvalidHeader("settings.headers must map header names to strings")
        _headers(headers)


class Service(_Out):
    service_id: int
    name: str
    transport: str
    settings: dict[str, Any]
    credential_ref: str | None
    from_addresses: list[str]
    interval_ms: int
    daily_quota: int
    quota_tz: str
    enabled: bool
    health: str
    next_available_at: dt.datetime | None
    sent_today: int
    quota_day: dt.date | None
    total_sent: int
    total_failed: int
    success_rate: float
    avg_response_ms: float | None


# --------------------------------------------------------------------- contacts


class Contact(_In):
    email: Email
    attributes: Annotated[dict[str, Any], _small_json("contact attributes")] = Field(
        default_factory=dict)
    tags: list[Tag] = Field(default_factory=list, max_length=1000)
    unsubscribed: bool = False


class ContactImport(_Out):
    inserted: int
    updated: int


# --------------------------------------------------------------------- tasks


class Template(_In):
    """One content variant of a task. Refused at the door: a subject or body that does
    not compile with the renderer's sandboxed Jinja environment (InvalidTemplate), a
    line break or control character in the subject or from_name (InvalidHeader),
    content over the size limits (PayloadTooLarge), forbidden or malformed headers."""

    subject: Annotated[str, StringConstraints(max_length=MAX_SUBJECT_CHARS),
                       _header_text("subject")]
    body_text: Annotated[str, StringConstraints(max_length=MAX_BODY_CHARS)] | None = None
    body_html: Annotated[str, StringConstraints(max_length=MAX_BODY_CHARS)] | None = None
    from_name: Annotated[str, StringConstraints(max_length=200),
                         _header_text("from_name")] | None = None
    reply_to: Email | None = None
    headers: Headers = Field(default_factory=dict, description=(
        "Custom header fields of this template (the task's headers are merged in)."))
    list_unsubscribe: bool = Field(default=True, description=(
        "False for transactional mail: no List-Unsubscribe header even when configured."))
    required_variables: list[Annotated[str, StringConstraints(max_length=200)]] | None = Field(
        default=None, max_length=1000, description=(
            "Variables every recipient must have; set from the templates by "
            "TaskSpec(strict_variables=True), checked by the database at creation."))

    @model_validator(mode="after")
    def _has_body(self) -> Template:
        if self.body_text is None and self.body_html is None:
            raise ValueError("a template needs body_text or body_html")
        return self

    @model_validator(mode="after")
    def _compiles(self) -> Template:
        for field, source, html in (("subject", self.subject, False),
                                    ("body_text", self.body_text, False),
                                    ("body_html", self.body_html, True)):
            if source is None:
                continue
            try:
                rendering.check_template(source, html=html)
            except jinja2.TemplateSyntaxError as exc:
                raise errors.InvalidTemplate(
                    f"{field} does not compile: line {exc.lineno}: {exc.message}") from None
        return self

    def variables(self) -> frozenset[str]:
        """Variables this template needs from every recipient (see
        :func:`edm_sched.rendering.required_variables`)."""
        return frozenset().union(*(
            rendering.required_variables(source, html=html)
            for source, html in ((self.subject, False), (self.body_text, False),
                                 (self.body_html, True)) if source is not None))


class Recipient(_In):
    email: Annotated[str, StringConstraints(max_length=1000)]
    vars: Annotated[dict[str, Any] | None, _small_json("recipient variables")] = None


class TagRule(_In):
    include_any: list[Tag] = Field(default_factory=list, max_length=100)
    include_all: list[Tag] = Field(default_factory=list, max_length=100)
    exclude: list[Tag] = Field(default_factory=list, max_length=100)

    @model_validator(mode="after")
    def _includes(self) -> TagRule:
        if not self.include_any and not self.include_all:
            raise ValueError("a tag rule needs include_any or include_all")
        return self


class TaskSpec(_In):
    user_id: UserId
    name: TaskName
    templates: list[Template] = Field(min_length=1, max_length=100)
    recipients: list[Recipient] | None = Field(default=None, max_length=10_000_000)
    rule: TagRule | None = None
    priority: int = Field(default=0, ge=-100, le=100)
    scheduled_at: AwareDatetime = None
    on_invalid: Literal["reject", "skip"] = "reject"
    strict_variables: bool = Field(default=False, description=(
        "Refuse the task (MissingVariables) when a recipient lacks a variable the "
        "templates use (other than with a default filter or an `is defined` test)."))
    headers: Headers = Field(default_factory=dict, description=(
        "Custom header fields of every message of the task (a template's own win)."))
    list_unsubscribe: bool = Field(default=True, description=(
        "Bulk mail (True) carries one-click List-Unsubscribe headers when the dispatcher "
        "is configured for them; set False for transactional mail."))
    transactional: bool = Field(default=False, description=(
        "Transactional lane: claimed ahead of bulk work on the services the user may use, "
        "within queue.transactional_share of a service's slots while bulk work waits."))

    @model_validator(mode="after")
    def _one_source(self) -> TaskSpec:
        if (self.recipients is None) == (self.rule is None):
            raise ValueError("give exactly one of recipients (an explicit list) or rule (tags)")
        if self.recipients is not None and not self.recipients:
            raise errors.NoRecipients("the recipient list is empty")
        return self

    @model_validator(mode="after")
    def _task_options(self) -> TaskSpec:
        size = sum(len(t.subject) + len(t.body_text or "") + len(t.body_html or "")
                   for t in self.templates)
        if size > MAX_TEMPLATES_CHARS:
            raise errors.PayloadTooLarge(
                f"the templates hold {size} characters; at most {MAX_TEMPLATES_CHARS}")
        # Task-level options travel with each template to the database (new_task).
        required = (sorted(frozenset().union(*(t.variables() for t in self.templates)))
                    if self.strict_variables else None)
        if self.headers or not self.list_unsubscribe or required is not None:
            templates = []
            for t in self.templates:
                headers = {**self.headers, **t.headers}
                if len(headers) > rendering.MAX_HEADERS:
                    raise errors.InvalidHeader(
                        f"at most {rendering.MAX_HEADERS} header fields per task")
                templates.append(t.model_copy(update={
                    "headers": headers,
                    "list_unsubscribe": t.list_unsubscribe and self.list_unsubscribe,
                    "required_variables": required if required is not None
                    else t.required_variables}))
            object.__setattr__(self, "templates", templates)  # frozen: set once, here
        return self


class InvalidAddress(_Out):
    position: int
    email: str
    reason: str


class CreatedTask(_Out):
    task_id: int
    recipients: int
    invalid: list[InvalidAddress] = Field(default_factory=list)
    duplicates: int = 0
    suppressed: int = 0


TaskStatusName = Literal[
    "draft", "expanding", "scheduled", "sending", "paused", "completed", "cancelled", "failed"
]


class TaskStatus(_Out):
    task_id: int
    user_id: str
    name: str
    status: TaskStatusName
    priority: int
    scheduled_at: dt.datetime
    total_count: int
    pending_count: int
    leased_count: int
    sent_count: int
    failed_count: int
    cancelled_count: int
    first_claimed_at: dt.datetime | None
    last_activity_at: dt.datetime | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    created_at: dt.datetime
    error: str | None


class UserInfo(_Out):
    user_id: str
    display_name: str | None
    quota_limit: int | None
    quota_used: int
    created_at: dt.datetime
