"""What a job runs: registered functions, HTTP calls, shell commands, campaign launches.

Each kind turns a claimed execution into an :class:`Outcome` and never raises.
Functions are looked up by name in the registry the host gives the runner;
nothing read from the database is ever imported or evaluated.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib
import json
import os
import shlex
import signal
import subprocess
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Collection, Mapping, MutableMapping
from typing import Any

import pydantic

from edm_sched.jobs import outbound
from edm_sched.jobs.errors import PermanentJobError
from edm_sched.jobs.models import (
    FunctionTarget,
    HttpTarget,
    LaunchCampaignTarget,
    ShellTarget,
    deprecated_name,
)
from edm_sched.jobs.outbound import HttpSettings

LAUNCH_CAMPAIGN = "edm.launch_campaign"
"""Reserved registry name of the host's campaign launcher: ``fn(definition, ctx) -> result``."""

_RESULT_MAX = 60_000
_TAIL = 4000
_BODY_KEPT = 2000


class JobContext:
    """What a job function receives: its execution, arguments, deadline and stop signal.

    A function is called as ``fn(ctx)`` in a runner thread. Python threads
    cannot be killed: a long function should check :attr:`cancelled` (set on
    timeout, cancel or runner shutdown) and may report :meth:`progress`.
    """

    def __init__(self, *, execution_id: int, job_id: int, job_name: str,
                 user_id: str | None = None, trigger: str, scheduled_for: dt.datetime | None,
                 retry_count: int,
                 args: Mapping[str, Any], timeout_seconds: float, dsn: str | None = None,
                 progress_sink: Callable[[int, float, str | None], bool] | None = None,
                 tenant_id: str | None = None) -> None:
        if tenant_id is not None:  # the older word, kept for a release
            deprecated_name("JobContext(tenant_id=)", "user_id=")
            user_id = tenant_id
        self.execution_id = execution_id
        self.job_id = job_id
        self.job_name = job_name
        self.user_id = user_id
        self.trigger = trigger
        self.scheduled_for = scheduled_for
        self.retry_count = retry_count
        self.args: dict[str, Any] = dict(args)
        self.timeout_seconds = timeout_seconds
        self.deadline = time.monotonic() + timeout_seconds
        self.dsn = dsn
        self.cancel_event = threading.Event()
        self._progress_sink = progress_sink

    @property
    def tenant_id(self) -> str | None:
        """Deprecated: :attr:`user_id`."""
        deprecated_name("JobContext.tenant_id", "user_id")
        return self.user_id

    @property
    def cancelled(self) -> bool:
        """True once the run must stop (timeout, cancel request, runner shutdown)."""
        return self.cancel_event.is_set()

    def remaining(self) -> float:
        """Seconds left before the timeout."""
        return max(0.0, self.deadline - time.monotonic())

    def progress(self, percent: float, message: str | None = None) -> bool:
        """Record progress (0-100); returns False when the run was cancelled meanwhile."""
        if self._progress_sink is not None and not self._progress_sink(
                self.execution_id, float(percent), message):
            self.cancel_event.set()
        return not self.cancelled


JobFunction = Callable[[JobContext], Any]


class JobRegistry(dict[str, Callable[..., Any]]):
    """The host's functions by name. A plain dict works too; this adds a decorator::

        registry = JobRegistry()

        @registry.register("reports.daily")
        def daily(ctx: JobContext) -> dict[str, int]: ...
    """

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            self[name] = fn
            return fn

        return decorate


@dataclasses.dataclass
class Outcome:
    """How an execution ended, as ``edm.job_complete`` records it."""

    status: str  # succeeded, failed or timed_out
    result: Any = None
    error: str | None = None
    error_kind: str | None = None
    error_type: str | None = None
    error_stack: str | None = None

    @classmethod
    def ok(cls, result: Any = None) -> Outcome:
        return cls("succeeded", result=json_safe(result))

    @classmethod
    def fail(cls, error: str, kind: str, *, result: Any = None, status: str = "failed",
             error_type: str | None = None, stack: str | None = None) -> Outcome:
        return cls(status, result=json_safe(result), error=error[:4000], error_kind=kind,
                   error_type=error_type, error_stack=stack)

    @classmethod
    def from_exception(cls, exc: BaseException) -> Outcome:
        kind = "permanent" if isinstance(exc, PermanentJobError) else "exception"
        stack = "".join(traceback.format_exception(exc))[-20000:]
        return cls.fail(f"{type(exc).__name__}: {exc}", kind, error_type=type(exc).__name__,
                        stack=stack)


def json_safe(value: Any) -> Any:
    """``value`` as JSON-compatible data, truncated when its text exceeds 60 kB."""
    if value is None:
        return None
    if isinstance(value, pydantic.BaseModel):
        value = value.model_dump(mode="json")
    try:
        text = json.dumps(value, default=str)
    except (TypeError, ValueError):
        text = json.dumps(repr(value))
    if len(text) > _RESULT_MAX:
        return {"truncated": True, "head": text[: _RESULT_MAX // 2]}
    return json.loads(text)


# ---------------------------------------------------------------------------
# Kinds
# ---------------------------------------------------------------------------


def run_function(ctx: JobContext, target: FunctionTarget,
                 registry: Mapping[str, Callable[..., Any]]) -> Outcome:
    fn = registry.get(target.function)
    if fn is None:
        return Outcome.fail(f"no function named {target.function!r} in this runner's registry",
                            "config")
    try:
        return Outcome.ok(fn(ctx))
    except Exception as exc:
        return Outcome.from_exception(exc)


def run_http(ctx: JobContext, target: HttpTarget, opener: Any = None, *,
             settings: HttpSettings | None = None) -> Outcome:
    """One guarded HTTP request (see :mod:`edm_sched.jobs.outbound`).

    ``opener`` is deprecated and ignored: a urllib opener would connect without
    the outbound guard.
    """
    if opener is not None:
        warnings.warn("run_http(opener=...) is ignored: HTTP jobs connect through the "
                      "outbound guard only", DeprecationWarning, stacklevel=2)
    settings = settings or HttpSettings()
    timeout = max(0.01, min(target.timeout_seconds or ctx.remaining(), ctx.remaining()))
    started = time.monotonic()
    res, secrets = outbound.request(target, user_id=ctx.user_id, timeout=timeout,
                                    cancel=ctx.cancel_event, settings=settings)

    def clean(text: str) -> str:
        return outbound.scrub_text(text, secrets)

    if res.error is not None:
        kind = res.error_kind or "connection"
        if res.timed_out:
            return Outcome.fail(f"HTTP request timed out after {timeout:.1f} s", "timeout",
                                status="timed_out")
        return Outcome.fail(clean(res.error), kind)
    status = int(res.status or 0)
    result: dict[str, Any] = {
        "status": status,
        "elapsed_ms": round((time.monotonic() - started) * 1000, 1),
        "body": clean(res.body[:_BODY_KEPT].decode("utf-8", "replace")),
        "bytes_read": res.bytes_read,
    }
    if res.truncated:
        result["truncated"] = True
    if res.redirects:
        result["redirects"] = res.redirects
        result["url"] = clean(res.url)
    ok = status in target.expected_status if target.expected_status else 200 <= status < 300
    if ok:
        return Outcome.ok(result)
    expected = target.expected_status or "2xx"
    if status in target.retry_on_status:
        return Outcome.fail(f"HTTP {status} (retryable; expected {expected})", "http_status",
                            result=result)
    return Outcome.fail(f"HTTP {status} (expected {expected})", "unexpected_status",
                        result=result)


def kill_group(proc: subprocess.Popen[bytes], grace: float = 2.0) -> None:
    """SIGTERM the process group of ``proc``, SIGKILL it after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(data: bytes | None) -> str:
    return (data or b"")[-_TAIL:].decode("utf-8", "replace")


def run_shell(ctx: JobContext, target: ShellTarget, *, allow_shell: bool,
              on_process: Callable[[subprocess.Popen[bytes]], None] | None = None,
              shell_users: Collection[str] | None = None) -> Outcome:
    if not allow_shell:
        return Outcome.fail("shell jobs are disabled in this runner (the host must pass "
                            "allow_shell=True)", "config")
    if ctx.user_id is not None and shell_users is not None \
            and ctx.user_id not in shell_users and "*" not in shell_users:
        return Outcome.fail(f"shell jobs are not allowed for user {ctx.user_id!r} "
                            "(jobs.shell_users)", "config")
    if target.use_shell:
        argv: str | list[str] = target.command if isinstance(target.command, str) \
            else shlex.join(target.command)
    else:
        argv = shlex.split(target.command) if isinstance(target.command, str) \
            else list(target.command)
    env: MutableMapping[str, str] = dict(os.environ) if target.inherit_env \
        else {"PATH": os.environ.get("PATH", os.defpath)}
    env.update(target.env)
    env["EDM_JOB_ID"] = str(ctx.job_id)
    env["EDM_EXECUTION_ID"] = str(ctx.execution_id)
    try:
        proc = subprocess.Popen(
            argv, shell=target.use_shell, env=dict(env), cwd=target.cwd,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True)
    except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
        return Outcome.fail(f"cannot start command: {exc}", "config")
    if on_process is not None:
        on_process(proc)
    try:
        out, err = proc.communicate(timeout=ctx.remaining())
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        return Outcome.fail(f"command killed after its timeout of {ctx.timeout_seconds:g} s",
                            "timeout", status="timed_out",
                            result={"exit_code": proc.returncode, "stdout": _tail(out),
                                    "stderr": _tail(err)})
    result = {"exit_code": proc.returncode, "stdout": _tail(out), "stderr": _tail(err)}
    if ctx.cancelled:
        return Outcome.fail("command killed: execution cancelled", "cancelled", result=result)
    if proc.returncode == 0:
        return Outcome.ok(result)
    return Outcome.fail(f"command exited with status {proc.returncode}", "exit_status",
                        result=result)


def run_launch_campaign(ctx: JobContext, target: LaunchCampaignTarget,
                        registry: Mapping[str, Callable[..., Any]]) -> Outcome:
    definition = dict(target.definition)
    if ctx.user_id is not None:
        owner = definition.setdefault("user_id", ctx.user_id)
        if str(owner) != ctx.user_id:
            return Outcome.fail("the campaign definition belongs to another user", "config")
    launcher = registry.get(LAUNCH_CAMPAIGN)
    try:
        if launcher is not None:
            return Outcome.ok(launcher(definition, ctx))
        return Outcome.ok(_launch_with_tasks_api(definition, ctx))
    except ImportError as exc:
        return Outcome.fail(
            f"launch_campaign needs the tasks API (edm_sched.api) or a registry entry "
            f"{LAUNCH_CAMPAIGN!r}: {exc}", "config")
    except Exception as exc:
        return Outcome.from_exception(exc)


def _launch_with_tasks_api(definition: dict[str, Any], ctx: JobContext) -> Any:
    if ctx.dsn is None:
        raise ImportError("no DSN available to the runner for the tasks API")
    api: Any = importlib.import_module("edm_sched.api")
    created = api.Scheduler(ctx.dsn).create_task(api.TaskSpec.model_validate(definition))
    task_id = getattr(created, "task_id", None)
    return {"task_id": task_id} if task_id is not None else created


def parse_target(target: Mapping[str, Any]) -> FunctionTarget | HttpTarget | ShellTarget | \
        LaunchCampaignTarget:
    kind = target.get("kind")
    if kind == "http":
        return HttpTarget.model_validate(target)
    if kind == "shell":
        return ShellTarget.model_validate(target)
    if kind == "launch_campaign":
        return LaunchCampaignTarget.model_validate(target)
    return FunctionTarget.model_validate(target)


def execute(ctx: JobContext, kind: str, target: Mapping[str, Any], *,
            registry: Mapping[str, Callable[..., Any]], allow_shell: bool = False,
            on_process: Callable[[subprocess.Popen[bytes]], None] | None = None,
            http_opener: Any = None, http: HttpSettings | None = None,
            shell_users: Collection[str] | None = None) -> Outcome:
    """Run one execution of any kind; every failure is an Outcome, never an exception.

    ``http`` carries the outbound guard's settings for ``http`` runs;
    ``shell_users`` the users whose jobs may run shell commands (None: any).
    ``http_opener`` is deprecated and ignored.
    """
    try:
        parsed = parse_target(target)
    except pydantic.ValidationError as exc:
        return Outcome.fail(f"invalid {kind} target: {exc.errors()[0]['msg']}", "config")
    try:
        if isinstance(parsed, FunctionTarget):
            return run_function(ctx, parsed, registry)
        if isinstance(parsed, HttpTarget):
            return run_http(ctx, parsed, http_opener, settings=http)
        if isinstance(parsed, ShellTarget):
            return run_shell(ctx, parsed, allow_shell=allow_shell, on_process=on_process,
                             shell_users=shell_users)
        return run_launch_campaign(ctx, parsed, registry)
    except Exception as exc:  # a bug in a kind must not leave the execution running
        return Outcome.from_exception(exc)


__all__ = [
    "LAUNCH_CAMPAIGN",
    "JobContext",
    "JobFunction",
    "JobRegistry",
    "Outcome",
    "execute",
    "json_safe",
]
