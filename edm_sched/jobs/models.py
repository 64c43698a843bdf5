"""Pydantic models at the boundary of recurring jobs: what hosts send and get back."""

from __future__ import annotations

import datetime as dt
import re
import urllib.parse
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

ErrorKind = Literal[
    "timeout", "connection", "http_status", "unexpected_status", "exception", "exit_status", "lost",
]
NEVER_RETRIED_KINDS: tuple[str, ...] = ("config", "permanent", "cancelled", "blocked")
"""Error kinds no retry policy can retry (``blocked``: the outbound guard refused the run)."""
RETRYABLE_KINDS: tuple[str, ...] = (
    "timeout", "connection", "http_status", "unexpected_status", "exception", "exit_status", "lost",
)
DEFAULT_RETRY_ON: tuple[str, ...] = (
    "timeout", "connection", "http_status", "exception", "exit_status", "lost",
)
JobStatus = Literal["active", "paused", "inactive"]
ExecutionStatus = Literal[
    "pending", "running", "succeeded", "failed", "timed_out", "cancelled", "skipped",
]
TriggerType = Literal["scheduled", "manual", "retry"]
MisfirePolicy = Literal["run_once", "skip", "run_all"]

_NAME = re.compile(r"^[^\x00-\x1f\x7f]{1,200}$")
_EXC_NAME = re.compile(r"^[A-Z][A-Za-z0-9_]{0,99}$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,100}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,99}$")
_CTRL = re.compile(r"[\x00-\x1f\x7f]")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


def deprecated_name(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Warn that ``old`` is the jobs feature's older word for ``new`` (docs/glossary.md)."""
    warnings.warn(f"{old} is deprecated: say {new}, as the rest of edm-sched does",
                  DeprecationWarning, stacklevel=stacklevel)


def _renamed(data: Any, old: str, new: str) -> Any:
    """Input given under the older name ``old`` moves to ``new`` (with a DeprecationWarning)."""
    if not isinstance(data, Mapping) or old not in data:
        return data
    deprecated_name(old, new, stacklevel=6)
    out = {k: v for k, v in data.items() if k != old}
    if out.setdefault(new, data[old]) != data[old]:
        raise ValueError(f"{new} and {old} (its older name) differ")
    return out


class RetryPolicy(_Model):
    """How a failed run is retried: delay * backoff ** retry_count, capped."""

    max_retries: int = Field(default=0, ge=0, le=100)
    delay_seconds: float = Field(default=60.0, ge=0, le=86400)
    backoff: float = Field(default=2.0, ge=1, le=10)
    max_delay_seconds: float = Field(default=3600.0, ge=0, le=604800)
    retry_on: list[str] = Field(default_factory=lambda: list(DEFAULT_RETRY_ON), max_length=50)

    @field_validator("retry_on")
    @classmethod
    def _kinds(cls, value: list[str]) -> list[str]:
        for kind in value:
            if kind in NEVER_RETRIED_KINDS:
                raise ValueError(f"{kind!r} errors are never retried")
            if kind not in RETRYABLE_KINDS and not _EXC_NAME.match(kind):
                raise ValueError(
                    f"{kind!r} is neither an error kind ({', '.join(RETRYABLE_KINDS)}) "
                    "nor a Python exception class name")
        return value


class FunctionTarget(_Model):
    """A Python callable the host registered under ``function``; called as ``fn(ctx)``."""

    kind: Literal["function"] = "function"
    function: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.:\-]{0,199}$")
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("function")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value.startswith("edm."):
            raise ValueError("function names starting with 'edm.' are reserved")
        return value


_SECRET_REF = r"^[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,199}$"
_RESERVED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection",
                               "proxy-authorization", "te", "upgrade"})


class SecretRef(_Model):
    """A header value held outside the database: the runner's secret resolver turns
    ``secret_ref`` into the secret at run time; ``prefix`` goes before it (``"Bearer "``)."""

    secret_ref: str = Field(pattern=_SECRET_REF)
    prefix: str = Field(default="", max_length=100)

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if _CTRL.search(value):
            raise ValueError("prefix must not contain control characters")
        return value


class BasicAuth(_Model):
    """HTTP basic authentication; the password is always a reference, never a value."""

    username: str = Field(min_length=1, max_length=200)
    password_ref: str = Field(pattern=_SECRET_REF)

    @field_validator("username")
    @classmethod
    def _username(cls, value: str) -> str:
        if _CTRL.search(value) or ":" in value:
            raise ValueError("username must not contain ':' or control characters")
        return value


class HttpTarget(_Model):
    """An HTTP request; succeeds on ``expected_status`` (default any 2xx).

    The outbound guard refuses loopback, private, link-local and other
    non-public destinations unless the host allows them (``jobs.http_allow``);
    see ``docs/jobs.md#security``. Header values may be :class:`SecretRef`.
    """

    kind: Literal["http"] = "http"
    url: str = Field(max_length=2000)
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"] = "GET"
    headers: dict[str, str | SecretRef] = Field(default_factory=dict)
    basic_auth: BasicAuth | None = None
    body: str | dict[str, Any] | list[Any] | None = None
    timeout_seconds: float | None = Field(default=None, gt=0, le=86400)
    expected_status: list[int] = Field(default_factory=list, max_length=100)
    retry_on_status: list[int] = Field(
        default_factory=lambda: [408, 429, 500, 502, 503, 504], max_length=100)
    max_redirects: int = Field(default=0, ge=0, le=5)
    max_response_bytes: int = Field(default=65536, ge=0, le=1_048_576)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urllib.parse.urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("url must be an absolute http:// or https:// URL")
        if _CTRL.search(value) or " " in value:
            raise ValueError("url must not contain spaces or control characters")
        if "@" in parts.netloc:
            raise ValueError("url must not hold credentials (user:password@); use basic_auth "
                             "with a password_ref")
        if "\\" in value:
            raise ValueError("url must not contain backslashes")
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str | SecretRef]) -> dict[str, str | SecretRef]:
        for name, v in value.items():
            if not _HEADER_NAME.match(name):
                raise ValueError(f"invalid header name {name!r}")
            if name.lower() in _RESERVED_HEADERS:
                raise ValueError(f"header {name!r} is set by the runner, not by the job")
            if isinstance(v, str) and _CTRL.search(v):
                raise ValueError(f"header {name!r} contains control characters (CR/LF)")
        return value

    @field_validator("expected_status", "retry_on_status")
    @classmethod
    def _statuses(cls, value: list[int]) -> list[int]:
        for code in value:
            if not 100 <= code <= 599:
                raise ValueError(f"{code} is not an HTTP status code")
        return value

    @model_validator(mode="after")
    def _auth(self) -> HttpTarget:
        if self.basic_auth is not None and any(n.lower() == "authorization"
                                               for n in self.headers):
            raise ValueError("give either basic_auth or an Authorization header, not both")
        return self


class ShellTarget(_Model):
    """A command, run without a shell unless ``use_shell`` (then through /bin/sh -c)."""

    kind: Literal["shell"] = "shell"
    command: str | list[str]
    use_shell: bool = False
    env: dict[str, str] = Field(default_factory=dict)
    inherit_env: bool = True
    cwd: str | None = Field(default=None, max_length=1000)

    @field_validator("command")
    @classmethod
    def _command(cls, value: str | list[str]) -> str | list[str]:
        items = [value] if isinstance(value, str) else value
        if not items or any(not item.strip() or "\x00" in item for item in items):
            raise ValueError("command must be a non-empty string or list of non-empty strings")
        if sum(len(item) for item in items) > 10000:
            raise ValueError("command is longer than 10000 characters")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for name, v in value.items():
            if not _ENV_NAME.match(name) or "\x00" in v:
                raise ValueError(f"invalid environment variable {name!r}")
        return value


class LaunchCampaignTarget(_Model):
    """A stored campaign definition turned into a task (the tasks API's TaskSpec)."""

    kind: Literal["launch_campaign"] = "launch_campaign"
    definition: dict[str, Any] = Field(min_length=1)


JobTarget = Annotated[
    FunctionTarget | HttpTarget | ShellTarget | LaunchCampaignTarget, Field(discriminator="kind"),
]


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    if value is not None and value.tzinfo is None:
        raise ValueError("datetimes must carry a time zone (e.g. 2026-01-01T00:00:00Z)")
    return value


def _tags(value: list[str]) -> list[str]:
    for tag in value:
        if not 1 <= len(tag) <= 100 or _CTRL.search(tag):
            raise ValueError(f"invalid tag {tag!r}: 1 to 100 characters, no control characters")
    return value


class JobSpec(_Model):
    """A new job. ``cron`` and ``timezone`` are checked with cronsim by the API."""

    name: str = Field(pattern=_NAME.pattern)
    cron: str = Field(max_length=200)
    target: JobTarget
    timezone: str = "UTC"
    user_id: str | None = Field(default=None, min_length=1, max_length=128,
                                pattern=r"^[^\x00-\x1f\x7f]+$")
    description: str | None = Field(default=None, max_length=2000)
    start_at: dt.datetime | None = None
    end_at: dt.datetime | None = None
    max_executions: int | None = Field(default=None, ge=1)
    status: Literal["active", "paused"] = "active"
    priority: int = Field(default=0, ge=-100, le=100)
    max_concurrent: int = Field(default=1, ge=1, le=1000)
    timeout_seconds: int = Field(default=300, ge=1, le=86400)
    retry: RetryPolicy = Field(default_factory=lambda: RetryPolicy())
    misfire_policy: MisfirePolicy = "run_once"
    misfire_grace_seconds: int = Field(default=60, ge=0, le=86400)
    tags: list[str] = Field(default_factory=list, max_length=50)

    @field_validator("start_at", "end_at")
    @classmethod
    def _dates(cls, value: dt.datetime | None) -> dt.datetime | None:
        return _aware(value)

    @field_validator("tags")
    @classmethod
    def _tag_list(cls, value: list[str]) -> list[str]:
        return _tags(value)

    @model_validator(mode="before")
    @classmethod
    def _older_names(cls, data: Any) -> Any:
        return _renamed(data, "tenant_id", "user_id")

    @property
    def tenant_id(self) -> str | None:
        """Deprecated: :attr:`user_id`."""
        deprecated_name("JobSpec.tenant_id", "user_id")
        return self.user_id

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        if self.start_at and self.end_at and self.end_at <= self.start_at:
            raise ValueError("end_at must be after start_at")
        if isinstance(self.target, LaunchCampaignTarget) and self.user_id is not None:
            owner = self.target.definition.get("user_id")
            if owner is not None and str(owner) != self.user_id:
                raise ValueError("a launch_campaign definition may only create tasks of the "
                                 "job's own user (definition.user_id != user_id)")
        return self


class JobUpdate(_Model):
    """Changes to a job; only the fields given are changed (None clears nullable ones)."""

    name: str | None = Field(default=None, pattern=_NAME.pattern)
    cron: str | None = Field(default=None, max_length=200)
    target: JobTarget | None = None
    timezone: str | None = None
    description: str | None = Field(default=None, max_length=2000)
    start_at: dt.datetime | None = None
    end_at: dt.datetime | None = None
    max_executions: int | None = Field(default=None, ge=1)
    priority: int | None = Field(default=None, ge=-100, le=100)
    max_concurrent: int | None = Field(default=None, ge=1, le=1000)
    timeout_seconds: int | None = Field(default=None, ge=1, le=86400)
    retry: RetryPolicy | None = None
    misfire_policy: MisfirePolicy | None = None
    misfire_grace_seconds: int | None = Field(default=None, ge=0, le=86400)
    tags: list[str] | None = Field(default=None, max_length=50)

    @field_validator("start_at", "end_at")
    @classmethod
    def _dates(cls, value: dt.datetime | None) -> dt.datetime | None:
        return _aware(value)

    @field_validator("tags")
    @classmethod
    def _tag_list(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else _tags(value)



# The owning user of a stored row; "tenant_id" is the older name, still read.
_OwnerId = Annotated[str | None, Field(validation_alias=AliasChoices("user_id", "tenant_id"))]


class _OlderUserName:
    """``tenant_id``, the jobs feature's older word for ``user_id``: read, with a warning."""

    if TYPE_CHECKING:
        user_id: str | None

    @property
    def tenant_id(self) -> str | None:
        """Deprecated: :attr:`user_id`."""
        deprecated_name("tenant_id", "user_id")
        return self.user_id


class Job(_OlderUserName, BaseModel):
    """A job as stored."""

    job_id: int
    user_id: _OwnerId
    name: str
    description: str | None
    kind: str
    target: dict[str, Any]
    cron: str
    timezone: str
    start_at: dt.datetime | None
    end_at: dt.datetime | None
    max_executions: int | None
    status: JobStatus
    inactive_reason: str | None
    priority: int
    max_concurrent: int
    timeout_seconds: int
    retry: RetryPolicy
    misfire_policy: MisfirePolicy
    misfire_grace_seconds: int
    tags: list[str]
    next_run_at: dt.datetime | None
    last_scheduled_for: dt.datetime | None
    last_fired_at: dt.datetime | None
    last_finished_at: dt.datetime | None
    last_status: str | None
    run_count: int
    running_count: int
    success_count: int
    failure_count: int
    misfire_count: int
    created_at: dt.datetime
    updated_at: dt.datetime

    def spec(self) -> JobSpec:
        """The definition of this job, as a JobSpec (for editing and copying)."""
        return JobSpec.model_validate({
            "name": self.name, "cron": self.cron, "target": self.target,
            "timezone": self.timezone, "user_id": self.user_id,
            "description": self.description, "start_at": self.start_at, "end_at": self.end_at,
            "max_executions": self.max_executions,
            "status": "paused" if self.status == "paused" else "active",
            "priority": self.priority, "max_concurrent": self.max_concurrent,
            "timeout_seconds": self.timeout_seconds, "retry": self.retry,
            "misfire_policy": self.misfire_policy,
            "misfire_grace_seconds": self.misfire_grace_seconds, "tags": self.tags,
        })


class Execution(_OlderUserName, BaseModel):
    """One execution of a job (a run, a skipped occurrence, a manual run or a retry)."""

    execution_id: int
    job_id: int
    user_id: _OwnerId
    trigger: TriggerType
    status: ExecutionStatus
    scheduled_for: dt.datetime | None
    run_after: dt.datetime
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    duration_ms: int | None
    progress: float | None
    progress_message: str | None
    result: Any
    error: str | None
    error_kind: str | None
    error_type: str | None
    error_code: str | None
    error_stack: str | None
    retry_count: int
    retry_of: int | None
    worker_id: str | None
    lease_expires_at: dt.datetime | None
    cancel_requested_at: dt.datetime | None


class CronPreview(BaseModel):
    """A validated expression and its next occurrences."""

    expression: str
    timezone: str
    fields: int
    wall_clock: bool
    description: str | None
    next_runs: list[dt.datetime]
    next_runs_local: list[str]


class JobStats(_OlderUserName, BaseModel):
    """Counts and timings of jobs and of their executions finished since ``since``."""

    since: dt.datetime
    user_id: _OwnerId
    jobs_by_status: dict[str, int]
    executions_by_status: dict[str, int]
    executions_by_trigger: dict[str, int]
    running: int
    pending: int
    success_rate: float | None
    duration_ms_avg: float | None
    duration_ms_p95: float | None
    firing_delay_ms_p50: float | None
    firing_delay_ms_p99: float | None
    retries: int
    misfires: int


__all__ = [
    "DEFAULT_RETRY_ON",
    "NEVER_RETRIED_KINDS",
    "RETRYABLE_KINDS",
    "BasicAuth",
    "CronPreview",
    "Execution",
    "ExecutionStatus",
    "FunctionTarget",
    "HttpTarget",
    "Job",
    "JobSpec",
    "JobStats",
    "JobStatus",
    "JobTarget",
    "JobUpdate",
    "LaunchCampaignTarget",
    "MisfirePolicy",
    "RetryPolicy",
    "SecretRef",
    "ShellTarget",
    "TriggerType",
]
