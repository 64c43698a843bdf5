"""``edm-sched jobs ...``: recurring jobs from the command line.

``edm-sched jobs validate EXPR`` needs no database: it exits 0 and prints the
next occurrences for a valid expression, and exits 1 printing
``INVALID_CRON_EXPRESSION`` and the reason otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

from edm_sched.cli.base import EXIT_OK, EXIT_USAGE, database, emit
from edm_sched.jobs.errors import InvalidJobConfig


def _json_arg(text: str) -> Any:
    """A JSON value given inline or as @path."""
    if text.startswith("@"):
        text = Path(text[1:]).read_text("utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidJobConfig(f"invalid JSON: {exc}") from None


def _when(text: str) -> dt.datetime:
    value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError("give a time zone, e.g. 2026-01-01T00:00:00Z")
    return value


def _fmt(value: dt.datetime | None) -> str:
    return "-" if value is None else value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


# -- validate ----------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    from edm_sched.jobs.api import JobScheduler

    preview = JobScheduler.validate_cron(args.expression, args.tz, count=args.count)
    lines = [f"valid: {preview.expression} ({preview.fields} fields, time zone {preview.timezone}"
             f"{', wall-clock' if preview.wall_clock else ', elapsed-time'} DST rule)"]
    if preview.description:
        lines.append(f"meaning: {preview.description}")
    lines += [f"  {local}" for local in preview.next_runs_local]
    emit(args, {"ok": True, **preview.model_dump(mode="json")}, "\n".join(lines))
    return EXIT_OK


# -- create / update ---------------------------------------------------------


def _target_from(args: argparse.Namespace) -> dict[str, Any] | None:
    chosen = [n for n in ("function", "http", "shell", "campaign", "target")
              if getattr(args, n, None) is not None]
    if len(chosen) > 1:
        raise InvalidJobConfig(f"give only one of --{', --'.join(chosen)}")
    if args.function is not None:
        return {"kind": "function", "function": args.function,
                "args": _json_arg(args.args) if args.args else {}}
    if args.http is not None:
        headers = {}
        for h in args.header or []:
            name, sep, value = h.partition(":")
            if not sep:
                raise InvalidJobConfig(f"--header must be NAME:VALUE, got {h!r}")
            headers[name.strip()] = value.strip()
        for h in args.secret_header or []:
            name, sep, ref = h.partition(":")
            if not sep:
                raise InvalidJobConfig(f"--secret-header must be NAME:SECRET_REF, got {h!r}")
            headers[name.strip()] = {"secret_ref": ref.strip()}
        target: dict[str, Any] = {"kind": "http", "url": args.http, "method": args.method,
                                  "headers": headers}
        if args.max_redirects is not None:
            target["max_redirects"] = args.max_redirects
        if args.body is not None:
            target["body"] = args.body
        if args.expect:
            target["expected_status"] = args.expect
        return target
    if args.shell is not None:
        return {"kind": "shell", "command": args.shell}
    if args.campaign is not None:
        return {"kind": "launch_campaign", "definition": _json_arg(args.campaign)}
    if args.target is not None:
        value = _json_arg(args.target)
        if not isinstance(value, dict):
            raise InvalidJobConfig("--target must be a JSON object")
        return value
    return None


def _fields_from(args: argparse.Namespace) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if getattr(args, "spec", None):
        spec = _json_arg(args.spec)
        if not isinstance(spec, dict):
            raise InvalidJobConfig("--spec must be a JSON object")
        data.update(spec)
    simple = {"name": "name", "cron": "cron", "tz": "timezone", "description": "description",
              "priority": "priority", "max_concurrent": "max_concurrent",
              "timeout": "timeout_seconds", "misfire": "misfire_policy",
              "grace": "misfire_grace_seconds", "max_executions": "max_executions",
              "start": "start_at", "end": "end_at"}
    for arg, field in simple.items():
        value = getattr(args, arg, None)
        if value is not None:
            data[field] = value
    if getattr(args, "owner", None) is not None:
        data["user_id"] = args.owner
    if args.tag:
        data["tags"] = list(args.tag)
    retry = dict(data.get("retry") or {})
    for arg, field in (("max_retries", "max_retries"), ("retry_delay", "delay_seconds"),
                       ("backoff", "backoff"), ("max_delay", "max_delay_seconds")):
        value = getattr(args, arg, None)
        if value is not None:
            retry[field] = value
    if args.retry_on is not None:
        retry["retry_on"] = [k for k in args.retry_on.split(",") if k]
    if retry:
        data["retry"] = retry
    target = _target_from(args)
    if target is not None:
        data["target"] = target
    if getattr(args, "paused", False):
        data["status"] = "paused"
    return data


def _job_text(job: Any) -> str:
    lines = [
        f"job {job.job_id} {job.name!r}" + (f" (user {job.user_id})" if job.user_id else ""),
        f"  status       {job.status}"
        + (f" ({job.inactive_reason})" if job.inactive_reason else ""),
        f"  schedule     {job.cron} in {job.timezone}",
        f"  next run     {_fmt(job.next_run_at)}",
        f"  kind         {job.kind}: {json.dumps(job.target)[:200]}",
        f"  limits       priority {job.priority}, max_concurrent {job.max_concurrent}, "
        f"timeout {job.timeout_seconds} s, max_executions {job.max_executions or '-'}",
        f"  retry        {job.retry.max_retries} x, delay {job.retry.delay_seconds:g} s "
        f"* {job.retry.backoff:g}^n (cap {job.retry.max_delay_seconds:g} s) on "
        f"{','.join(job.retry.retry_on)}",
        f"  misfire      {job.misfire_policy}, grace {job.misfire_grace_seconds} s",
        f"  counters     fired {job.run_count}, running {job.running_count}, "
        f"ok {job.success_count}, failed {job.failure_count}, missed {job.misfire_count}",
        f"  last         {job.last_status or '-'} at {_fmt(job.last_finished_at)}",
    ]
    if job.tags:
        lines.append(f"  tags         {', '.join(job.tags)}")
    return "\n".join(lines)


def cmd_create(args: argparse.Namespace) -> int:
    from edm_sched.jobs.api import JobScheduler

    with database(args) as dsn:
        job = JobScheduler(dsn).create_job(_fields_from(args))
    emit(args, {"ok": True, "job": job.model_dump(mode="json")}, _job_text(job))
    return EXIT_OK


def cmd_update(args: argparse.Namespace) -> int:
    from edm_sched.jobs.api import JobScheduler

    changes = _fields_from(args)
    changes.pop("status", None)
    if not changes:
        print("edm-sched: nothing to change", flush=True)
        return EXIT_USAGE
    with database(args) as dsn:
        job = JobScheduler(dsn).update_job(args.job_id, changes, user_id=args.user)
    emit(args, {"ok": True, "job": job.model_dump(mode="json")}, _job_text(job))
    return EXIT_OK


# -- single-job actions ------------------------------------------------------


def cmd_show(args: argparse.Namespace) -> int:
    from edm_sched.jobs.api import JobScheduler

    with database(args) as dsn:
        job = JobScheduler(dsn).get_job(args.job_id, user_id=args.user)
    emit(args, {"ok": True, "job": job.model_dump(mode="json")}, _job_text(job))
    return EXIT_OK


def cmd_delete(args: argparse.Namespace) -> int:
    from edm_sched.jobs.api import JobScheduler

    with database(args) as dsn:
        JobScheduler(dsn).delete_job(args.job_id, user_id=args.user, force=args.force)
    emit(args, {"ok": True, "deleted": args.job_id}, f"job {args.job_id} deleted")
    return EXIT_OK


def cmd_action(args: argparse.Namespace) -> int:
    from edm_sched.jobs.api import JobScheduler

    with database(args) as dsn:
        s = JobScheduler(dsn)
        if args.action == "pause":
            job = s.pause_job(args.job_id, user_id=args.user)
        elif args.action == "resume":
            job = s.resume_job(args.job_id, user_id=args.user)
        else:
            job = s.stop_job(args.job_id, user_id=args.user,
                             cancel_running=args.cancel_running)
    emit(args, {"ok": True, "job": job.model_dump(mode="json")},
         f"job {job.job_id} is {job.status}; next run {_fmt(job.next_run_at)}")
    return EXIT_OK


def _execution_text(e: Any) -> str:
    lines = [
        f"execution {e.execution_id} of job {e.job_id}: {e.status} ({e.trigger}"
        + (f", retry {e.retry_count}" if e.retry_count else "") + ")",
        f"  scheduled for {_fmt(e.scheduled_for)}; started {_fmt(e.started_at)}; "
        f"finished {_fmt(e.finished_at)}; duration "
        f"{e.duration_ms if e.duration_ms is not None else '-'} ms",
        f"  worker {e.worker_id or '-'}; "
        f"progress {e.progress if e.progress is not None else '-'}",
    ]
    if e.result is not None:
        lines.append(f"  result {json.dumps(e.result)[:500]}")
    if e.error:
        lines.append(f"  error [{e.error_code or e.error_kind}] {e.error}")
    if e.error_stack:
        lines.append("  stack:\n    " + e.error_stack.strip().replace("\n", "\n    "))
    return "\n".join(lines)


def cmd_trigger(args: argparse.Namespace) -> int:
    from edm_sched.jobs.api import JobScheduler

    with database(args) as dsn:
        ex = JobScheduler(dsn).trigger_job(args.job_id, user_id=args.user)
    emit(args, {"ok": True, "execution": ex.model_dump(mode="json")},
         f"execution {ex.execution_id} of job {ex.job_id} queued")
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    from edm_sched.jobs.api import JobScheduler

    with database(args) as dsn:
        ex = JobScheduler(dsn).cancel_execution(args.execution_id, user_id=args.user)
    emit(args, {"ok": True, "execution": ex.model_dump(mode="json")},
         f"execution {ex.execution_id} {ex.status}")
    return EXIT_OK


# -- listings ----------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    from edm_sched.jobs.api import JobScheduler

    with database(args) as dsn:
        jobs = JobScheduler(dsn).list_jobs(user_id=args.user, status=args.status,
                                           tag=args.tag_filter, limit=args.limit)
    lines = [f"{'id':>6} {'user':12} {'name':24} {'status':8} {'cron':18} {'tz':16} "
             f"{'next run':20} {'last':10}"]
    for j in jobs:
        lines.append(f"{j.job_id:>6} {(j.user_id or '-')[:12]:12} {j.name[:24]:24} "
                     f"{j.status:8} {j.cron[:18]:18} {j.timezone[:16]:16} "
                     f"{_fmt(j.next_run_at):20} {(j.last_status or '-')[:10]:10}")
    emit(args, {"ok": True, "jobs": [j.model_dump(mode="json") for j in jobs]}, "\n".join(lines))
    return EXIT_OK


def cmd_executions(args: argparse.Namespace) -> int:
    from edm_sched.jobs.api import JobScheduler

    with database(args) as dsn:
        rows = JobScheduler(dsn).list_executions(job_id=args.job, user_id=args.user,
                                                 status=args.status, limit=args.limit)
    lines = [f"{'id':>8} {'job':>6} {'trigger':9} {'status':10} {'scheduled for':20} "
             f"{'started':20} {'ms':>7} {'retry':>5} error"]
    for e in rows:
        lines.append(f"{e.execution_id:>8} {e.job_id:>6} {e.trigger:9} {e.status:10} "
                     f"{_fmt(e.scheduled_for):20} {_fmt(e.started_at):20} "
                     f"{e.duration_ms if e.duration_ms is not None else '-':>7} "
                     f"{e.retry_count:>5} {(e.error or '')[:60]}")
    emit(args, {"ok": True, "executions": [e.model_dump(mode="json") for e in rows]},
         "\n".join(lines))
    return EXIT_OK


def cmd_execution(args: argparse.Namespace) -> int:
    from edm_sched.jobs.api import JobScheduler

    with database(args) as dsn:
        ex = JobScheduler(dsn).get_execution(args.execution_id, user_id=args.user)
    emit(args, {"ok": True, "execution": ex.model_dump(mode="json")}, _execution_text(ex))
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    from edm_sched.jobs.api import JobScheduler

    with database(args) as dsn:
        s = JobScheduler(dsn)
        since = None
        if args.hours is not None:
            since = dt.datetime.now(dt.UTC) - dt.timedelta(hours=args.hours)
        st = s.stats(user_id=args.user, since=since)

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    text = "\n".join([
        f"jobs: {', '.join(f'{k} {v}' for k, v in sorted(st.jobs_by_status.items())) or 'none'}",
        f"now: {st.running} running, {st.pending} pending",
        f"since {_fmt(st.since)}: "
        + (", ".join(f"{k} {v}" for k, v in sorted(st.executions_by_status.items())) or "nothing"),
        f"success rate {'-' if st.success_rate is None else f'{st.success_rate:.1%}'}; "
        f"duration avg {ms(st.duration_ms_avg)} ms, p95 {ms(st.duration_ms_p95)} ms; "
        f"firing delay p50 {ms(st.firing_delay_ms_p50)} ms, p99 {ms(st.firing_delay_ms_p99)} ms; "
        f"retries {st.retries}; missed occurrences {st.misfires}",
    ])
    emit(args, {"ok": True, **st.model_dump(mode="json")}, text)
    return EXIT_OK


def cmd_purge(args: argparse.Namespace) -> int:
    from edm_sched.jobs.api import JobScheduler

    with database(args) as dsn:
        n = JobScheduler(dsn).purge_executions()
    emit(args, {"ok": True, "deleted": n}, f"deleted {n} executions past retention")
    return EXIT_OK


def env_secret_resolver(ref: str, user_id: str | None) -> str | None:
    """Secrets of platform jobs from the environment variable named by the reference;
    none for users' jobs (a user must not read the runner's environment)."""
    return os.environ.get(ref) if user_id is None else None


def cmd_run(args: argparse.Namespace) -> int:
    from edm_sched.jobs.runner import run_jobs

    registry: Any = {}
    if args.registry:
        module, _, attr = args.registry.partition(":")
        registry = getattr(importlib.import_module(module), attr or "registry")
    secret_resolver: Any = env_secret_resolver
    if args.secret_resolver:
        module, _, attr = args.secret_resolver.partition(":")
        secret_resolver = getattr(importlib.import_module(module), attr or "resolve_secret")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with database(args) as dsn:
        stats = run_jobs(dsn, registry, stop_event=stop, worker_id=args.worker_id,
                         concurrency=args.concurrency, allow_shell=args.allow_shell,
                         secret_resolver=secret_resolver)
    emit(args, {"ok": True, **vars(stats)},
         f"job runner stopped: fired {stats.fired}, claimed {stats.claimed}, "
         f"succeeded {stats.succeeded}, failed {stats.failed}, timed out {stats.timed_out}")
    return EXIT_OK


# -- parser ------------------------------------------------------------------


def _definition_options(p: argparse.ArgumentParser, *, create: bool) -> None:
    p.add_argument("--spec", help="the whole job (or changes) as JSON, or @file.json; "
                                  "the options below override it")
    p.add_argument("--name", required=False, help="job name (unique per user)")
    p.add_argument("--cron", help="5 fields, or 6 with leading seconds, or @daily...")
    p.add_argument("--tz", help="IANA time zone of the schedule (default UTC)")
    if create:
        p.add_argument("--user", "--tenant-id", dest="owner",
                       help="owning user; --tenant-id is the older spelling")
        p.add_argument("--paused", action="store_true", help="create it paused")
    p.add_argument("--description", help="free text shown with the job")
    g = p.add_argument_group("what to run (one of)")
    g.add_argument("--function", help="name of a function in the runners' registry")
    g.add_argument("--args", help="JSON object handed to the function as ctx.args")
    g.add_argument("--http", metavar="URL", help="call this URL")
    g.add_argument("--method", default="GET", help="HTTP method (default GET)")
    g.add_argument("--header", action="append", help="HTTP header NAME:VALUE (repeatable)")
    g.add_argument("--secret-header", action="append", metavar="NAME:SECRET_REF",
                   help="HTTP header whose value the runner's secret resolver supplies "
                        "(repeatable)")
    g.add_argument("--max-redirects", type=int, help="redirects to follow (0-5, default 0)")
    g.add_argument("--body", help="HTTP request body")
    g.add_argument("--expect", type=int, action="append", help="expected HTTP status (repeatable)")
    g.add_argument("--shell", metavar="COMMAND", help="run this command (needs shell enabled)")
    g.add_argument("--campaign", metavar="JSON", help="campaign definition (TaskSpec) as JSON")
    g.add_argument("--target", metavar="JSON", help="the target as JSON with a kind")
    o = p.add_argument_group("limits and policies")
    o.add_argument("--priority", type=int, help="higher runs first when runners are busy")
    o.add_argument("--max-concurrent", type=int, help="most executions at once (default 1)")
    o.add_argument("--timeout", type=int, help="seconds")
    o.add_argument("--max-retries", type=int, help="retries after a failed run")
    o.add_argument("--retry-delay", type=float, help="seconds before the first retry")
    o.add_argument("--backoff", type=float, help="delay multiplier per retry")
    o.add_argument("--max-delay", type=float, help="cap on the retry delay, seconds")
    o.add_argument("--retry-on", help="comma-separated error kinds / exception class names")
    o.add_argument("--misfire", choices=["run_once", "skip", "run_all"],
                   help="what to do with runs missed while no runner ran")
    o.add_argument("--grace", type=int, help="misfire grace period, seconds")
    o.add_argument("--start", type=_when, help="ISO time of the first possible run")
    o.add_argument("--end", type=_when, help="ISO time after which it stops")
    o.add_argument("--max-executions", type=int, help="stop after this many runs")
    o.add_argument("--tag", action="append", help="tag (repeatable)")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``edm-sched jobs`` and its subcommands to the CLI."""
    jobs = sub.add_parser("jobs", help="recurring jobs (cron, time zones, retries)",
                          description=__doc__.split("\n\n")[0])
    jsub = jobs.add_subparsers(dest="jobs_command", required=True)
    user = argparse.ArgumentParser(add_help=False)
    user.add_argument("--user", "--tenant", dest="user",
                      help="act only on this user's jobs; --tenant is the older spelling")

    p = jsub.add_parser("validate", parents=[common], help="check a cron expression (no database)")
    p.add_argument("expression", help="cron expression (quote it)")
    p.add_argument("--tz", default="UTC", help="time zone to show the next runs in")
    p.add_argument("--count", type=int, default=5, help="how many next runs to show")
    p.set_defaults(func=cmd_validate)

    p = jsub.add_parser("create", parents=[common], help="create a job")
    _definition_options(p, create=True)
    p.set_defaults(func=cmd_create)

    p = jsub.add_parser("update", parents=[common, user], help="change a job")
    p.add_argument("job_id", type=int, help="the job's id")
    _definition_options(p, create=False)
    p.set_defaults(func=cmd_update)

    p = jsub.add_parser("delete", parents=[common, user], help="delete a job and its history")
    p.add_argument("job_id", type=int, help="the job's id")
    p.add_argument("--force", action="store_true", help="even while executions run")
    p.set_defaults(func=cmd_delete)

    p = jsub.add_parser("show", parents=[common, user], help="show a job")
    p.add_argument("job_id", type=int, help="the job's id")
    p.set_defaults(func=cmd_show)

    p = jsub.add_parser("list", parents=[common, user], help="list jobs")
    p.add_argument("--status", choices=["active", "paused", "inactive"], help="only these")
    p.add_argument("--tag", dest="tag_filter", help="only jobs with this tag")
    p.add_argument("--limit", type=int, default=100, help="most rows shown (default 100)")
    p.set_defaults(func=cmd_list)

    p = jsub.add_parser("trigger", parents=[common, user], help="run a job now")
    p.add_argument("job_id", type=int, help="the job's id")
    p.set_defaults(func=cmd_trigger)

    for action, text in (("pause", "pause a job"), ("resume", "resume a paused or stopped job"),
                         ("stop", "stop a job (inactive) and cancel its queued runs")):
        p = jsub.add_parser(action, parents=[common, user], help=text)
        p.add_argument("job_id", type=int, help="the job's id")
        if action == "stop":
            p.add_argument("--cancel-running", action="store_true",
                           help="also cancel executions running now")
        p.set_defaults(func=cmd_action, action=action)

    p = jsub.add_parser("cancel", parents=[common, user], help="cancel an execution")
    p.add_argument("execution_id", type=int, help="the execution's id")
    p.set_defaults(func=cmd_cancel)

    p = jsub.add_parser("executions", parents=[common, user], help="list executions")
    p.add_argument("--job", type=int, help="only this job's")
    p.add_argument("--status", help="only executions in this status")
    p.add_argument("--limit", type=int, default=50, help="most rows shown (default 50)")
    p.set_defaults(func=cmd_executions)

    p = jsub.add_parser("execution", parents=[common, user], help="show one execution")
    p.add_argument("execution_id", type=int, help="the execution's id")
    p.set_defaults(func=cmd_execution)

    p = jsub.add_parser("stats", parents=[common, user], help="job and execution statistics")
    p.add_argument("--hours", type=float, help="window of finished executions (default 24)")
    p.set_defaults(func=cmd_stats)

    p = jsub.add_parser("purge", parents=[common], help="delete history past retention now")
    p.set_defaults(func=cmd_purge)

    p = jsub.add_parser("run", parents=[common], help="run jobs until SIGINT/SIGTERM")
    p.add_argument("--registry", metavar="MODULE:ATTR",
                   help="import the function registry from this module attribute")
    p.add_argument("--concurrency", type=int, default=4, help="executions run at once (default 4)")
    p.add_argument("--worker-id", help="name of this runner (default host:pid:random)")
    p.add_argument("--allow-shell", action="store_true", help="execute shell jobs")
    p.add_argument("--secret-resolver", metavar="MODULE:ATTR",
                   help="fn(secret_ref, user_id) -> secret for http jobs (default: "
                        "environment variables, platform jobs only)")
    p.set_defaults(func=cmd_run)
