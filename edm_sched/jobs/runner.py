"""The job runner: fires due jobs, claims executions, runs them, records outcomes.

``run_jobs(dsn, registry, stop_event=...)`` blocks until ``stop_event`` is set;
run it in a thread of the dispatcher process, in ``asyncio.to_thread``, or
alone in its own process. Any number of runners may share a database: firing
is exactly-once and claims never overlap (see ``sql/migrations/0005_jobs.sql``).

It does not poll. Between passes it sleeps until the earliest time anything
could be due (``edm.job_next_wakeup``), a NOTIFY on ``edm_jobs`` (a job was
created, resumed or moved earlier, a manual run, a retry, a freed slot), the
end of one of its own runs, or a stop request. While idle it sends nothing to
the database. ``max_sleep`` (default 300 s) is only a safety net.

Runs execute in daemon threads, ``concurrency`` at a time. Timeouts: a shell
command's process group is killed (SIGTERM, then SIGKILL); an HTTP call uses
the remaining time as its socket timeout; a Python function cannot be killed,
so at its deadline the run is recorded as timed_out, ``ctx.cancelled`` turns
true and whatever it returns later is ignored (it keeps its slot of this
runner's concurrency until it does return).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import os
import queue
import secrets
import select
import socket
import ssl
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import psycopg
from psycopg.types.json import Jsonb

from edm_sched import db, errors
from edm_sched.jobs import guard, kinds, schedule
from edm_sched.jobs.errors import InvalidCronExpression, InvalidJobConfig
from edm_sched.jobs.kinds import JobContext, Outcome
from edm_sched.jobs.outbound import HttpSettings, SecretResolver
from edm_sched.jobs.sql import query

log = logging.getLogger("edm_sched.jobs.runner")

Clock = Callable[[], dt.datetime]
Registry = Mapping[str, Callable[..., Any]]


class StopSignal(Protocol):
    """Anything with ``is_set()``: threading.Event, multiprocessing.Event, asyncio-free."""

    def is_set(self) -> bool: ...


@dataclasses.dataclass
class RunnerStats:
    """What a runner did since it started."""

    fired: int = 0
    skipped: int = 0
    claimed: int = 0
    succeeded: int = 0
    failed: int = 0
    timed_out: int = 0
    cancelled: int = 0
    rejected: int = 0
    recovered: int = 0
    wakeups: int = 0
    notifications: int = 0


@dataclasses.dataclass
class StepReport:
    """What one :meth:`JobRunner.step` did."""

    recovered: int
    fired: list[tuple[int, dt.datetime, str]]
    claimed: list[int]
    finished: dict[int, str]


@dataclasses.dataclass
class _Handle:
    execution_id: int
    kind: str
    target: dict[str, Any]
    ctx: JobContext
    http: HttpSettings | None = None
    shell_users: frozenset[str] = frozenset()
    thread: threading.Thread | None = None
    proc: subprocess.Popen[bytes] | None = None
    reported: bool = False

    def set_proc(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    def busy(self) -> bool:
        return not self.reported or (self.thread is not None and self.thread.is_alive())


@dataclasses.dataclass
class _Config:
    """The jobs.* settings of edm.config (which holds their defaults; none here)."""

    max_catchup: int
    maintenance_interval: float


def default_worker_id() -> str:
    return f"{socket.gethostname()[:100]}:{os.getpid()}:{secrets.token_hex(3)}"


class JobRunner:
    """One scheduler process's (or thread's) share of the recurring-job work.

    ``registry`` maps function names to callables ``fn(ctx)``; the reserved
    name ``edm.launch_campaign`` maps to ``fn(definition, ctx)``. Shell jobs
    only run when ``allow_shell`` is true (and ``jobs.shell_enabled`` allowed
    creating them). ``now`` injects a clock for tests and simulations.
    """

    def __init__(self, dsn: str, registry: Registry | None = None, *,
                 worker_id: str | None = None, concurrency: int = 4, allow_shell: bool = False,
                 now: Clock | None = None, stop_event: StopSignal | None = None,
                 fire_batch: int = 32, max_sleep: float = 300.0, shutdown_grace: float = 10.0,
                 kill_grace: float = 5.0, http_opener: Any = None,
                 http_resolver: guard.Resolver | None = None,
                 secret_resolver: SecretResolver | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        if not 1 <= concurrency <= 1000:
            raise errors.ConfigurationError("concurrency must be between 1 and 1000")
        if not 1 <= fire_batch <= 1000:
            raise errors.ConfigurationError("fire_batch must be between 1 and 1000")
        self.dsn = db.check_dsn(dsn)
        self.registry: Registry = registry if registry is not None else {}
        self.worker_id = worker_id or default_worker_id()
        if not 1 <= len(self.worker_id) <= 200:
            raise errors.ConfigurationError("worker_id must be 1 to 200 characters")
        self.concurrency = concurrency
        self.allow_shell = allow_shell
        self.fire_batch = fire_batch
        self.max_sleep = max_sleep
        self.shutdown_grace = shutdown_grace
        self.kill_grace = kill_grace
        if http_opener is not None:
            warnings.warn("JobRunner(http_opener=...) is ignored: HTTP jobs connect through "
                          "the outbound guard only", DeprecationWarning, stacklevel=2)
        self.http_opener = None
        self.http_resolver = http_resolver or guard.system_resolver
        self.secret_resolver = secret_resolver
        self.ssl_context = ssl_context
        self._http = HttpSettings(resolver=self.http_resolver, secrets=secret_resolver,
                                  ssl_context=ssl_context)
        self._shell_users: frozenset[str] = frozenset()
        self.stats = RunnerStats()
        self._now = now
        self._external_stop = stop_event
        self._stop = threading.Event()
        self._conn: psycopg.Connection[Any] | None = None
        self._listen: psycopg.Connection[Any] | None = None
        self._progress_conn: psycopg.Connection[Any] | None = None
        self._progress_lock = threading.Lock()
        self._handles: dict[int, _Handle] = {}
        self._results: queue.Queue[tuple[_Handle, Outcome]] = queue.Queue()
        self._pipe_r, self._pipe_w = os.pipe()
        os.set_blocking(self._pipe_r, False)
        os.set_blocking(self._pipe_w, False)
        self._config: _Config | None = None  # read with the first connection
        self._next_maintenance = 0.0
        self._leases_due = True

    # -- control ----------------------------------------------------------

    def stop(self) -> None:
        """Ask the runner to stop; returns at once (run() finishes its runs, then returns)."""
        self._stop.set()
        self._wake()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set() or (
            self._external_stop is not None and self._external_stop.is_set())

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._pipe_w, b"x")

    def _clock(self) -> dt.datetime | None:
        return self._now() if self._now is not None else None

    # -- connections ------------------------------------------------------

    def _ensure_conn(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = db.connect(self.dsn)
            self._load_config()
        return self._conn

    def _ensure_listen(self) -> psycopg.Connection[Any]:
        if self._listen is None or self._listen.closed:
            self._listen = db.connect(self.dsn)
            self._listen.execute(query("jobs_listen"))
        return self._listen

    def _close(self) -> None:
        for conn in (self._conn, self._listen, self._progress_conn):
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
        self._conn = self._listen = self._progress_conn = None

    def _settings(self) -> _Config:
        if self._config is None:
            self._ensure_conn()
        assert self._config is not None
        return self._config

    def _load_config(self) -> None:
        assert self._conn is not None
        values = dict(self._conn.execute(query("jobs_config")).fetchall())
        self._config = _Config(
            max_catchup=int(db.setting(values, "jobs.max_catchup_runs")),
            maintenance_interval=float(db.setting(values, "jobs.maintenance_interval")),
        )

    # -- the passes -------------------------------------------------------

    def _free(self) -> int:
        return self.concurrency - sum(1 for h in self._handles.values() if h.busy())

    def _recover(self, now: dt.datetime | None) -> int:
        conn = self._ensure_conn()
        row = conn.execute(query("job_expire_runs"), {"now": now}).fetchone()
        n = int(row[0]) if row else 0
        self.stats.recovered += n
        self._leases_due = False
        return n

    def _maintain(self, now: dt.datetime | None) -> None:
        if time.monotonic() < self._next_maintenance:
            return
        conn = self._ensure_conn()
        self._load_config()
        row = conn.execute(query("job_purge"), {"now": now}).fetchone()
        if row and row[0]:
            log.info("purged %s job executions past retention", row[0])
        self._next_maintenance = time.monotonic() + self._settings().maintenance_interval

    def _fire(self, now: dt.datetime | None) -> list[tuple[int, dt.datetime, str]]:
        """Fire due jobs, ``fire_batch`` per transaction, until none is left due."""
        created: list[tuple[int, dt.datetime, str]] = []
        while True:
            batch, locked, _ = self._fire_batch(now)
            created.extend(batch)
            if locked < self.fire_batch or self.stopping:
                return created

    def _fire_batch(self, now: dt.datetime | None, claim_limit: int = 0
                    ) -> tuple[list[tuple[int, dt.datetime, str]], int, list[tuple[Any, ...]]]:
        """One transaction: lock due jobs (SKIP LOCKED), plan each with cronsim, call
        ``edm.job_fire`` for all of them in one pipeline, then claim up to ``claim_limit``
        executions (those just fired, retries, manual runs) before the one commit.

        Returns the executions created, how many jobs were locked, and the claimed rows
        (to be started by the caller once the transaction has committed)."""
        conn = self._ensure_conn()
        calls: list[dict[str, Any]] = []
        claimed: list[tuple[Any, ...]] = []
        with conn.transaction():
            due = conn.execute(query("jobs_due"), {"now": now, "limit": self.fire_batch}).fetchall()
            for (job_id, cron, tz, due_at, end_at, max_exec, run_count, policy, grace,
                 fire_now) in due:
                try:
                    sched = schedule.parse(cron, tz)
                    plan = schedule.plan_fire(
                        sched, due=due_at, now=fire_now, policy=policy, grace_seconds=grace,
                        end_at=end_at, max_executions=max_exec, run_count=run_count,
                        max_catchup=self._settings().max_catchup)
                except (InvalidCronExpression, InvalidJobConfig) as exc:
                    log.error("job %s has an invalid schedule, deactivating it: %s", job_id, exc)
                    conn.execute(query("job_mark_invalid"), {
                        "job_id": job_id, "due": due_at, "reason": f"invalid schedule: {exc}"})
                    continue
                calls.append({
                    "job_id": job_id, "due": due_at, "run_times": plan.run_times,
                    "next_run_at": plan.next_run_at, "end_reason": plan.end_reason,
                    "queue_all": plan.queue_all, "missed": plan.missed,
                    "missed_first": plan.missed_first, "missed_last": plan.missed_last,
                    "worker": self.worker_id, "now": fire_now,
                })
            try:
                rows = self._fire_pipelined(conn, calls)
            except psycopg.OperationalError:
                raise
            except psycopg.Error:
                log.warning("firing a batch failed; retrying its jobs one by one", exc_info=True)
                rows = self._fire_one_by_one(conn, calls)
            if claim_limit > 0:
                claimed = conn.execute(query("job_claim"), {
                    "worker": self.worker_id, "limit": claim_limit, "now": now}).fetchall()
        created = [(int(e), when, str(status)) for e, when, status in rows]
        for _, _, status in created:
            if status == "pending":
                self.stats.fired += 1
            else:
                self.stats.skipped += 1
        return created, len(due), claimed

    @staticmethod
    def _fire_pipelined(conn: psycopg.Connection[Any],
                        calls: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = []
        if not calls:
            return rows
        with conn.transaction():  # a savepoint: a failure leaves the batch's locks usable
            with conn.pipeline():
                cursors = [conn.execute(query("job_fire"), params) for params in calls]
            for cur in cursors:
                rows.extend(cur.fetchall())
        return rows

    @staticmethod
    def _fire_one_by_one(conn: psycopg.Connection[Any],
                         calls: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = []
        for params in calls:
            try:
                with conn.transaction():
                    rows.extend(conn.execute(query("job_fire"), params).fetchall())
            except psycopg.OperationalError:
                raise
            except psycopg.Error as exc:
                log.exception("firing job %s failed; deactivating it", params["job_id"])
                conn.execute(query("job_mark_invalid"), {
                    "job_id": params["job_id"], "due": params["due"],
                    "reason": f"firing failed: {exc.diag.message_primary or exc}"})
        return rows

    def _load_security(self) -> None:
        """Read the allowlist and the shell users now (each batch with an HTTP or shell run),
        so that a change of ``jobs.http_allow`` or ``jobs.shell_users`` applies to the next
        run. A malformed value opens nothing (logged)."""
        values = dict(self._ensure_conn().execute(query("jobs_security_config")).fetchall())
        try:
            allowlist = guard.Allowlist.parse(values.get("jobs.http_allow"))
        except ValueError as exc:
            log.error("jobs.http_allow is malformed, allowing nothing: %s", exc)
            allowlist = guard.Allowlist()
        try:
            users = guard.parse_user_list(values.get("jobs.shell_users"))
        except ValueError as exc:
            log.error("jobs.shell_users is malformed, allowing no user: %s", exc)
            users = frozenset()
        self._http = dataclasses.replace(self._http, allowlist=allowlist)
        self._shell_users = users

    def _start(self, rows: list[tuple[Any, ...]]) -> list[int]:
        """Start a thread for each claimed execution (after its claim committed)."""
        started: list[int] = []
        if any(row[4] in ("http", "shell") for row in rows):
            self._load_security()
        for (execution_id, job_id, user_id, job_name, kind, target, trigger, scheduled_for,
             retry_count, timeout_seconds, _started_at, _lease) in rows:
            ctx = JobContext(
                execution_id=int(execution_id), job_id=int(job_id), job_name=job_name,
                user_id=user_id, trigger=trigger, scheduled_for=scheduled_for,
                retry_count=int(retry_count), args=dict(target.get("args") or {}),
                timeout_seconds=float(timeout_seconds), dsn=self.dsn,
                progress_sink=self._progress)
            handle = _Handle(int(execution_id), str(kind), dict(target), ctx, http=self._http,
                             shell_users=self._shell_users)
            handle.thread = threading.Thread(
                target=self._execute, args=(handle,), daemon=True,
                name=f"edm-job-{execution_id}")
            self._handles[handle.execution_id] = handle
            handle.thread.start()
            started.append(handle.execution_id)
        self.stats.claimed += len(started)
        return started

    def _execute(self, handle: _Handle) -> None:
        try:
            outcome = kinds.execute(handle.ctx, handle.kind, handle.target,
                                    registry=self.registry, allow_shell=self.allow_shell,
                                    on_process=handle.set_proc, http=handle.http,
                                    shell_users=handle.shell_users)
        except BaseException as exc:  # never leave a run unreported
            outcome = Outcome.from_exception(exc)
        self._results.put((handle, outcome))
        self._wake()

    def _finish(self, handle: _Handle, outcome: Outcome) -> str:
        return self._finish_many([(handle, outcome)])[handle.execution_id]

    def _finish_many(self, items: list[tuple[_Handle, Outcome]]) -> dict[int, str]:
        """Record outcomes with the batch form of ``edm.job_complete`` (one statement, commit)."""
        done: dict[int, str] = {}
        if not items:
            return done
        conn = self._ensure_conn()
        for handle, _ in items:
            handle.reported = True
        rows = conn.execute(query("job_finish_many"), {
            "worker": self.worker_id,
            "execution_ids": [h.execution_id for h, _ in items],
            "statuses": [o.status for _, o in items],
            "results": Jsonb([o.result for _, o in items]),
            "errors": [o.error for _, o in items],
            "error_kinds": [o.error_kind for _, o in items],
            "error_types": [o.error_type for _, o in items],
            "error_stacks": [o.error_stack for _, o in items],
            "now": self._clock(),
        }).fetchall()
        accepted = {int(r[0]): bool(r[1]) for r in rows}
        for handle, outcome in items:
            if not accepted.get(handle.execution_id, False):
                self.stats.rejected += 1
                done[handle.execution_id] = "rejected"
                continue
            if outcome.status == "succeeded":
                self.stats.succeeded += 1
            elif outcome.status == "timed_out":
                self.stats.timed_out += 1
            else:
                self.stats.failed += 1
            done[handle.execution_id] = outcome.status
        return done

    def _collect(self, block: float = 0.0) -> dict[int, str]:
        """Record the outcomes of finished runs (waiting up to ``block`` for the first)."""
        ready: list[tuple[_Handle, Outcome]] = []
        try:
            item: tuple[_Handle, Outcome] | None = self._results.get(timeout=block) \
                if block > 0 else self._results.get_nowait()
        except queue.Empty:
            item = None
        while item is not None:
            if not item[0].reported:
                ready.append(item)
            try:
                item = self._results.get_nowait()
            except queue.Empty:
                item = None
        done = self._finish_many(ready)
        for execution_id, handle in list(self._handles.items()):
            if not handle.busy():
                del self._handles[execution_id]
        return done

    def _watchdog(self) -> dict[int, str]:
        """Time out runs past their deadline that did not end by themselves."""
        done: dict[int, str] = {}
        now = time.monotonic()
        for handle in list(self._handles.values()):
            if handle.reported:
                continue
            grace = 0.0 if handle.kind == "function" else self.kill_grace
            if now < handle.ctx.deadline + grace:
                continue
            handle.ctx.cancel_event.set()
            if handle.proc is not None:
                self._kill_async(handle)
            done[handle.execution_id] = self._finish(handle, Outcome.fail(
                f"still running after its timeout of {handle.ctx.timeout_seconds:g} s; told to "
                "stop, any later result is ignored", "timeout", status="timed_out"))
        return done

    def _kill_async(self, handle: _Handle) -> None:
        proc = handle.proc
        if proc is not None and proc.poll() is None:
            threading.Thread(target=kinds.kill_group, args=(proc,), daemon=True).start()

    def _cancel(self, execution_id: int) -> None:
        handle = self._handles.get(execution_id)
        if handle is None or handle.reported:
            return
        log.info("execution %s cancelled: stopping it", execution_id)
        handle.reported = True  # the database already recorded the cancellation
        handle.ctx.cancel_event.set()
        self._kill_async(handle)
        self.stats.cancelled += 1

    def _progress(self, execution_id: int, percent: float, message: str | None) -> bool:
        try:
            with self._progress_lock:
                if self._progress_conn is None or self._progress_conn.closed:
                    self._progress_conn = db.connect(self.dsn)
                row = self._progress_conn.execute(query("job_progress"), {
                    "execution_id": execution_id, "worker": self.worker_id,
                    "progress": percent, "message": message,
                }).fetchone()
            return bool(row and row[0])
        except (psycopg.Error, errors.EdmSchedError):
            log.warning("could not record progress of execution %s", execution_id, exc_info=True)
            return True

    # -- one synchronous pass (tests, simulations, cron-style use) ---------

    def step(self, *, timeout: float = 60.0) -> StepReport:
        """Recover lost runs, fire what is due, claim and run what is claimable, and wait
        (up to ``timeout``) for those runs to finish and be recorded. No sleeping."""
        now = self._clock()
        self._ensure_conn()
        recovered = self._recover(now)
        fired: list[tuple[int, dt.datetime, str]] = []
        claimed: list[int] = []
        while True:
            batch, locked, rows = self._fire_batch(now, self._free())
            fired += batch
            claimed += self._start(rows)
            if locked < self.fire_batch:
                break
        finished: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        while any(not self._handles[i].reported for i in claimed if i in self._handles):
            if time.monotonic() > deadline:
                break
            finished.update(self._collect(block=0.05))
            finished.update(self._watchdog())
        finished.update(self._collect())
        return StepReport(recovered, fired, claimed, finished)

    # -- the loop ---------------------------------------------------------

    def run(self) -> RunnerStats:
        """Run until stopped; returns the statistics. Survives database restarts."""
        log.info("job runner %s starting (concurrency %s)", self.worker_id, self.concurrency)
        backoff = 0.5
        try:
            while not self.stopping:
                try:
                    self._ensure_listen()
                    sleep = self._cycle()
                    backoff = 0.5
                except (psycopg.OperationalError, errors.DatabaseUnavailable) as exc:
                    log.warning("job runner: database unavailable (%s); retrying in %.1f s",
                                exc, backoff)
                    self._close()
                    sleep, backoff = backoff, min(backoff * 2, 30.0)
                except Exception:
                    log.exception("job runner: unexpected error; retrying in %.1f s", backoff)
                    self._close()
                    sleep, backoff = backoff, min(backoff * 2, 30.0)
                self._wait(sleep)
            self._shutdown()
        finally:
            self._close()
        log.info("job runner %s stopped: %s", self.worker_id, self.stats)
        return self.stats

    def _cycle(self) -> float:
        """One pass; returns how long to sleep before the next one."""
        self._collect()
        self._watchdog()
        now = self._clock()
        if self._leases_due:
            self._recover(now)
        self._maintain(now)
        fired: list[tuple[int, dt.datetime, str]] = []
        claimed: list[int] = []
        while True:  # fire a batch and claim in one commit, start the runs, repeat while due
            batch, locked, rows = self._fire_batch(now, self._free())
            fired += batch
            claimed += self._start(rows)
            if locked < self.fire_batch or self.stopping:
                break
        pending_fired = sum(1 for _, _, status in fired if status == "pending")
        conn = self._ensure_conn()
        if pending_fired > len(claimed):
            conn.execute(query("jobs_notify_pending"))
        row = conn.execute(query("job_wakeup"), {"now": self._clock()}).fetchone()
        assert row is not None
        db_now, next_fire, next_any, leases_due = row
        self._leases_due = bool(leases_due)
        wake = next_any if self._free() > 0 else next_fire
        sleep = self.max_sleep
        if leases_due and self._free() > 0:
            sleep = 0.0
        elif wake is not None:
            sleep = min(sleep, max(0.0, (wake - db_now).total_seconds()))
        if sleep == 0.0 and not fired and not claimed:
            # Due work that this pass could not take (rows locked by another
            # runner's transaction in flight): look again shortly.
            sleep = 0.02
        for handle in self._handles.values():
            if not handle.reported:
                grace = 0.0 if handle.kind == "function" else self.kill_grace
                sleep = min(sleep, max(0.0, handle.ctx.deadline + grace - time.monotonic()))
        return sleep

    def _wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``; wake early on NOTIFY, a finished run, or stop()."""
        self.stats.wakeups += 1
        end = time.monotonic() + seconds
        while not self.stopping:
            remaining = end - time.monotonic()
            if remaining <= 0:
                return
            if self._external_stop is not None:
                remaining = min(remaining, 0.5)  # an external Event cannot wake select()
            fds = [self._pipe_r]
            listen = self._listen if self._listen is not None and not self._listen.closed \
                else None
            if listen is not None:
                fds.append(listen.fileno())
            try:
                ready, _, _ = select.select(fds, [], [], remaining)
            except (OSError, ValueError):
                return
            if self._pipe_r in ready:
                with contextlib.suppress(BlockingIOError, OSError):
                    while os.read(self._pipe_r, 4096):
                        pass
                return
            if listen is not None and listen.fileno() in ready \
                    and self._drain_notifies(listen):
                return

    def _drain_notifies(self, listen: psycopg.Connection[Any]) -> bool:
        """Handle pending notifications; True when the loop should run a pass."""
        wake = False
        try:
            for note in listen.notifies(timeout=0):
                self.stats.notifications += 1
                if note.channel == "edm_jobs_cancel":
                    with contextlib.suppress(ValueError):
                        self._cancel(int(note.payload))
                wake = True
        except psycopg.Error:
            log.warning("job runner: listener connection lost", exc_info=True)
            with contextlib.suppress(Exception):
                listen.close()
            return True
        return wake

    def _shutdown(self) -> None:
        """Let running executions finish for ``shutdown_grace`` seconds, then give them up."""
        deadline = time.monotonic() + self.shutdown_grace
        try:
            while any(not h.reported for h in self._handles.values()) \
                    and time.monotonic() < deadline:
                self._collect(block=0.1)
                self._watchdog()
            for handle in list(self._handles.values()):
                if handle.reported:
                    continue
                handle.ctx.cancel_event.set()
                self._kill_async(handle)
                self._finish(handle, Outcome.fail(
                    "the runner stopped before the run finished", "lost"))
        except (psycopg.Error, errors.EdmSchedError):
            log.warning("job runner: could not record runs at shutdown; their leases will "
                        "expire and the lease sweep will retry them", exc_info=True)

    def close(self) -> None:
        """Release the connections and the wake-up pipe (after run() or step())."""
        self._close()
        for fd in (self._pipe_r, self._pipe_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def run_jobs(dsn: str, registry: Registry | None = None, *, stop_event: StopSignal | None = None,
             worker_id: str | None = None, now: Clock | None = None, concurrency: int = 4,
             allow_shell: bool = False, **options: Any) -> RunnerStats:
    """Run recurring jobs until ``stop_event`` is set (forever when None).

    Embeddable: call it in a thread (``threading.Thread(target=run_jobs, ...)``)
    or from asyncio with ``await asyncio.to_thread(run_jobs, dsn, registry,
    stop_event=event)``; it needs no process of its own and no signal handlers.
    Further keyword options are those of :class:`JobRunner`.
    """
    runner = JobRunner(dsn, registry, worker_id=worker_id, concurrency=concurrency,
                       allow_shell=allow_shell, now=now, stop_event=stop_event, **options)
    try:
        return runner.run()
    finally:
        runner.close()


__all__ = ["JobRunner", "RunnerStats", "StepReport", "StopSignal", "run_jobs"]
