"""Faults: two dispatchers against a misbehaving SMTP server, one healthy service beside.

``python -m benchmarks faults [--short] [--dsn DSN] [--json]``

One :mod:`edm_sched.testing.faulty_smtp` server runs as its own process, one
port per fault mode. Nine sending services, each pointing at one port, each
granted to a user of its own with one task of ``recipients`` (30) recipients,
interval ``interval_ms`` (200 ms) on every service:

==================== ========================================================
service (port mode)  fault, and the per-phase timeouts of its settings
==================== ========================================================
``healthy``          none: the service whose delay is measured
``slow``             every reply 2.5 s late (``slow:2.5``); greeting and
                     command timeouts 6 s; ``max_connections`` 3 (at 10 s a
                     message on one connection, 30 messages would take 5 min)
``slow_final``       the reply to the final dot 4 s late, past the 2 s
                     ``command_timeout``, within the 30 s ``data_timeout``
``drop_after_dot``   reads the whole message, closes without replying
``drop_during_data`` resets the connection while the message is written; its
                     task's message is about 2 MB (a text and an HTML part of
                     990,000 characters, the per-body limit), more than the client's socket
                     buffers, so the client is still writing when the reset
                     comes (``TRANSIENT``) and the server has no copy. (A
                     message of a few kB would be taken whole by the kernel:
                     the client would honestly report ``UNCERTAIN`` and the
                     server still log nothing; it would count as an uncertain
                     attempt without a copy, never as a duplicate.)
``hang_greeting``    accepts TCP, never greets; ``greeting_timeout`` 3 s
``refuse_then_open`` refuses connections until ``refuse_seconds`` (15 s)
                     after *t0*, then behaves (a server process of its
                     own, started just before *t0*; nothing listens on its
                     port before)
``greet_421``        greets with 421 and closes
``tls_fail``         STARTTLS (mandatory) answered with garbage
==================== ========================================================

Every other phase has a 3 s timeout and the data phase 30 s. The three
outage services (``hang_greeting``, ``greet_421``, ``tls_fail``) cannot heal
by themselves: ``outage_seconds`` (40 s) after the start, the harness points
them at a healthy port of the same server (``Scheduler.update_service``, as an
operator moving an account would); they must then resume by themselves once
their back-off ends. ``refuse_then_open`` resumes with no help at all.

Two dispatcher processes (``run_dispatcher`` with its default transports,
concurrency and lease, as ``edm-sched dispatch`` runs it) are started first
and warmed up with a few messages through a separate healthy service; every
task is then created with ``scheduled_at`` = *t0*, a few seconds ahead, so
that all become claimable at the same instant. ``db_restart_at`` (20 s) after
*t0*, PostgreSQL is restarted in immediate mode (a crash: WAL replay at
start), as in the chaos scenario, only when the benchmark started the server
(embedded); with ``--dsn`` that step is skipped with a note. The restart comes
after the healthy service's expected end (30 sends at 0.2 s: about 6 s), while
the slow and failing services still work: a database outage delays every
service alike, faults or not, and ``healthy_slowdown`` is about the faults.

Scenario settings (``edm.config``) that keep the run to a few minutes:
``queue.max_attempts`` 3, ``queue.pending_retry_interval`` 30 s (its minimum),
``queue.retry_backoff_max`` 60 s, ``service.backoff_base`` 5 s,
``service.backoff_max`` 60 s. Leases (30 s), holds, lookahead and the sweep
interval keep their defaults.

After the faulty run, with the same two dispatcher processes and the same
server, the *baseline*: a new healthy service (the same settings) and a task
with the same recipients and template, scheduled the same way, with nothing
else to do.

Figures, from the server's receive log (the truth of what was delivered: one
record per message whose final dot arrived, answered or not, with the
server's own ``mail_at``/``dot_at`` times and the Message-ID, which carries
the subtask id) and from the database, never from counters kept by the
harness:

* ``lost``: subtasks that are neither ``sent`` nor ``failed`` at the end,
  plus subtasks the database calls ``sent`` of which the server has no
  answered copy.
* ``unfinished``: tasks of the run not ``completed`` at the end (only
  possible when the run timed out).
* ``duplicates``: copies in the server log beyond the first, per Message-ID;
  ``unknown_copies``: records that belong to no subtask of the run, the
  warm-up or the baseline (0).
* ``duplicates_unrecorded``: per subtask, copies beyond the first and beyond
  its recorded uncertain attempts (``lease_expiries + uncertain_sends`` of
  ``edm.possible_duplicates``, the same as its ``send_events`` of kinds
  ``lease_expired`` and ``uncertain``); summed. Must be 0 (I1).
* ``duplicates_avoidable``: extra copies not preceded by a recorded
  ``uncertain`` outcome: per subtask, copies in ``mail_at`` order; the k-th
  extra copy is avoidable unless at least k ``uncertain`` events of that
  subtask were recorded (``occurred_at``) before its MAIL FROM reached the
  server. A lease expiry does not excuse a copy here: a slow provider must
  never cause one (issue 21, point 2). Both clocks are this machine's.
* ``healthy_completion_s``: last final dot of the healthy service's messages
  at the server minus *t0*; the same for the baseline
  (``baseline_completion_s``); ``healthy_slowdown`` is their ratio (goal:
  at most 1.1).
* ``restart_survived``: PostgreSQL was restarted, both dispatcher processes
  were still running at the end of the faulty run (neither exited by
  itself), every task of the run completed, and messages reached the server
  after the restart. False when there was no restart.
* ``healthy_timing`` (where the healthy service's time went, for the faulty
  run and the baseline): ``slot_lag_last_s``, how much later than
  *t0* + k x interval its last slot was (the claims came late);
  ``send_lag_median_s`` / ``send_lag_max_s``, how long after its slot each
  MAIL FROM reached the server (the sends started late: the dispatcher's
  event loop was busy); and which dispatcher sent it.
* ``wire_interval_violations`` (informational, not a goal of this scenario:
  the ``limits`` scenario is the one for I2): per service, MAIL FROM arrivals
  at the server more than 50 ms ahead of one per interval (a token bucket of
  that depth, as in the chaos scenario). A lane paces the starts of its
  sends; a new connection (every send of ``drop_after_dot``, whose server
  hangs up each time) or one of several connections to a slow server reaches
  MAIL FROM after a varying delay, so these can be ahead on the wire.
* per service: subtasks sent and failed, copies at the server, uncertain,
  retry, service-failure, released and lease-expired events, when its last
  copy arrived and its last subtask finished, the smallest gap between two
  MAIL FROM, and which dispatcher recorded its outcomes.

``--big-message-chars 0`` gives the drop-during-data task a short message
(see above); ``--concurrency N`` sets ``queue.concurrent_workers``.

The process exits 1 when ``lost``, ``unfinished``, ``duplicates_unrecorded``,
``duplicates_avoidable`` or ``unknown_copies`` is not 0, ``healthy_slowdown`` is above 1.1,
``restart_survived`` is false (when a restart was done) or the run timed out.
``python -m benchmarks.faults worker ...`` is the dispatcher process.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import datetime as dt
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import psycopg
from psycopg import conninfo

from benchmarks import common
from benchmarks.chaos import midday_tz, restart_embedded, wire_lag_violations
from edm_sched.api import Scheduler
from edm_sched.errors import EdmSchedError
from edm_sched.testing.faulty_smtp import Record, read_log

ROOT = Path(__file__).resolve().parent.parent
SLOWDOWN_GOAL = 1.1
WIRE_TOLERANCE = 0.05  # seconds: a token bucket of this depth on MAIL FROM arrivals (I2)
OUTAGE_MODES = ("hang_greeting", "greet_421", "tls_fail")
FINISHED_TASK = ("completed", "cancelled", "failed")


@dataclass
class FaultsConfig:
    recipients: int = 30
    interval_ms: int = 200
    dispatchers: int = 2
    slow_seconds: float = 2.5  # every reply of the slow server
    slow_connections: int = 3
    slow_final_seconds: float = 4.0  # the reply to the final dot
    command_timeout: float = 3.0  # every other service's connect/greeting/command timeout
    slow_final_command_timeout: float = 2.0  # < slow_final_seconds < data_timeout
    data_timeout: float = 30.0
    big_message_chars: int = 1_980_000  # the drop_during_data task's message (two parts)
    refuse_seconds: float = 15.0  # after t0
    outage_seconds: float = 40.0  # after t0: the outage services are pointed at a working port
    db_restart: bool = True
    db_restart_at: float = 20.0  # seconds after t0
    max_attempts: int = 3
    retry_interval: int = 30  # queue.pending_retry_interval (its minimum)
    retry_backoff_max: int = 60
    service_backoff_base: int = 5
    service_backoff_max: int = 60
    lead: float = 6.0  # seconds from the start of task creation to t0
    concurrency: int | None = None  # queue.concurrent_workers; None: the product's default
    baseline: bool = True
    timeout: float = 600.0


def full_config() -> FaultsConfig:
    return FaultsConfig()


def short_config() -> FaultsConfig:
    """About a minute: 10 recipients, faster faults, one retry, an earlier restart."""
    return FaultsConfig(recipients=10, slow_seconds=1.0, slow_final_seconds=2.5,
                        slow_final_command_timeout=1.0, refuse_seconds=6.0,
                        outage_seconds=12.0, db_restart_at=8.0, max_attempts=2,
                        retry_backoff_max=60, timeout=240.0)


@dataclass(frozen=True)
class FaultService:
    name: str
    mode: str  # the server port's mode text (MODE[:SECONDS])
    settings: dict[str, Any]  # per-phase timeouts etc.; host and port are added
    outage: bool = False
    big: bool = False


def fault_services(cfg: FaultsConfig) -> list[FaultService]:
    """The services of the run, healthy first."""
    t = cfg.command_timeout
    base = {"security": "none", "connect_timeout": t, "greeting_timeout": t,
            "command_timeout": t, "data_timeout": cfg.data_timeout}
    slow_t = cfg.slow_seconds * 2 + 1
    return [
        FaultService("healthy", "healthy", dict(base)),
        FaultService("slow", f"slow:{cfg.slow_seconds:g}",
                     {**base, "greeting_timeout": slow_t, "command_timeout": slow_t,
                      "max_connections": cfg.slow_connections}),
        FaultService("slow_final", f"slow_final:{cfg.slow_final_seconds:g}",
                     {**base, "command_timeout": cfg.slow_final_command_timeout}),
        FaultService("drop_after_dot", "drop_after_dot", dict(base)),
        FaultService("drop_during_data", "drop_during_data", dict(base), big=True),
        FaultService("hang_greeting", "hang_greeting", dict(base), outage=True),
        FaultService("refuse_then_open", "refuse_then_open", dict(base)),  # see run_scenario
        FaultService("greet_421", "greet_421", dict(base), outage=True),
        FaultService("tls_fail", "tls_fail", {**base, "security": "starttls",
                                              "validate_certs": False}, outage=True),
    ]


# --------------------------------------------------------------------------- processes


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def start_server(modes: list[str], log_path: Path,
                 stderr: IO[bytes]) -> tuple[subprocess.Popen[bytes], list[int]]:
    """The faulty server as its own process; returns it and its ports (in ``modes`` order)."""
    args = [sys.executable, "-m", "edm_sched.testing.faulty_smtp", "--log", str(log_path)]
    for mode in modes:
        args += ["--port-mode", mode if "=" in mode else f"0={mode}"]
    proc = subprocess.Popen(args, cwd=ROOT, env=_child_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=stderr)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    try:
        ports = [int(p["port"]) for p in json.loads(line)["ports"]]
    except (ValueError, KeyError, TypeError):
        proc.kill()
        proc.wait(10)
        stderr.flush()
        tail = _log_tail(Path(stderr.name), 5) if isinstance(stderr.name, str) else ""
        raise RuntimeError(f"the faulty SMTP server did not start (said {line!r}): "
                           f"{tail}") from None
    return proc, ports


@dataclass
class Dispatcher:
    dispatcher_id: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]


def start_dispatcher(dsn: str, did: str, workdir: Path) -> Dispatcher:
    log_path = workdir / f"{did}.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed when the process is reaped
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.faults", "worker", "--dsn", dsn, "--id", did],
        cwd=ROOT, env=_child_env(), stdin=subprocess.DEVNULL, stdout=log,
        stderr=subprocess.STDOUT)
    return Dispatcher(did, proc, log_path, log)


def worker_main(argv: Sequence[str]) -> int:
    """One dispatcher: ``python -m benchmarks.faults worker --dsn DSN --id ID``.

    ``run_dispatcher`` with its default transports, concurrency and lease, as
    ``edm-sched dispatch`` runs it; INFO logs (released sends, back-offs) to stderr.
    """
    import logging

    from edm_sched.dispatcher import run_dispatcher

    parser = argparse.ArgumentParser(prog="python -m benchmarks.faults worker")
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--id", required=True)
    args = parser.parse_args(list(argv))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {args.id} %(levelname)s %(name)s %(message)s")
    dsn = conninfo.make_conninfo(args.dsn, application_name=args.id[:63])
    stats = run_dispatcher(dsn, dispatcher_id=args.id, handle_signals=True)
    print(f"{args.id} stopped: claimed={stats.claimed} sent={stats.sent} failed={stats.failed}"
          f" service_failures={stats.service_failures} rejected={stats.rejected}"
          f" reconnects={stats.reconnects}", file=sys.stderr)
    return 0


def _free_port() -> int:
    """A TCP port nothing listens on now (the refuse_then_open server binds it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _log_tail(path: Path, lines: int = 3) -> str:
    with contextlib.suppress(OSError):
        text = path.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])
    return ""


def _stop(proc: subprocess.Popen[Any], wait: float = 60) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


# ---------------------------------------------------------------------- the world


def configure(dsn: str, cfg: FaultsConfig) -> None:
    values = {
        "queue.max_attempts": cfg.max_attempts,
        "queue.pending_retry_interval": cfg.retry_interval,
        "queue.retry_backoff_max": cfg.retry_backoff_max,
        "service.backoff_base": cfg.service_backoff_base,
        "service.backoff_max": cfg.service_backoff_max,
    }
    if cfg.concurrency is not None:
        values["queue.concurrent_workers"] = cfg.concurrency
    with psycopg.connect(dsn, autocommit=True) as conn:
        for key, value in values.items():
            cur = conn.execute("UPDATE edm.config SET value = %s WHERE key = %s",
                               (json.dumps(value), key))
            if cur.rowcount != 1:
                raise RuntimeError(f"no setting {key}")


MAX_BODY_CHARS = 990_000


def _body(chars: int) -> str:
    line = "This line fills the message of the drop-during-data service. " + "x" * 8
    return "Hello,\n\n" + (line[:69] + "\n") * (chars // 70)


def add_service(s: Scheduler, name: str, port: int, settings: dict[str, Any],
                cfg: FaultsConfig, tz: str) -> int:
    user = f"user-{name}"
    s.upsert_user(user, quota_limit=1_000_000)
    sid = s.create_service({
        "name": name, "from_addresses": [f"{name.replace('_', '-')}@sender.example"],
        "interval_seconds": cfg.interval_ms / 1000, "daily_quota": 1_000_000,
        "transport": "smtp", "quota_tz": tz,
        "settings": {"host": "127.0.0.1", "port": port, **settings}})
    s.grant(sid, user)
    return sid


def add_task(s: Scheduler, name: str, n: int, at: dt.datetime, *, big: int = 0) -> int:
    user = f"user-{name}"
    # A body template may hold 1,000,000 characters (docs/reference/python.md): a
    # big message is a text and an HTML part of up to that much each.
    half = min(big // 2, MAX_BODY_CHARS)
    template: dict[str, Any] = {"subject": f"faults run: {name}",
                                "body_text": (_body(half) if big
                                              else "Hello,\n\nthis is a faults run.\n")}
    if big:
        template["body_html"] = "<pre>" + _body(half - 20) + "</pre>"
    created = s.create_task({
        "user_id": user, "name": f"faults-{name}", "scheduled_at": at,
        "templates": [template],
        "recipients": [{"email": f"rcpt-{k:03d}@{name.replace('_', '-')}.rcpt.example"}
                       for k in range(n)],
    })
    if created.recipients != n:
        raise RuntimeError(f"task {name}: {created.recipients} recipients, expected {n}")
    return created.task_id


def _tasks_open(conn: psycopg.Connection[Any], task_ids: list[int]) -> int:
    row = conn.execute("SELECT count(*) FROM edm.tasks WHERE task_id = ANY (%s)"
                       " AND status <> ALL (%s)", (task_ids, list(FINISHED_TASK))).fetchone()
    return int(row[0]) if row else 0


def wait_tasks(dsn: str, task_ids: list[int], timeout: float,
               tick: Callable[[float], None] | None = None) -> bool:
    """Poll until every task in ``task_ids`` finished; ``tick(elapsed)`` each round.

    Rides out a database outage (the restart is done from ``tick``)."""
    started = time.monotonic()
    conn: psycopg.Connection[Any] | None = None
    try:
        while time.monotonic() - started < timeout:
            if tick is not None:
                tick(time.monotonic() - started)
            try:
                if conn is None or conn.closed or conn.broken:
                    conn = psycopg.connect(dsn, autocommit=True, connect_timeout=5)
                if _tasks_open(conn, task_ids) == 0:
                    return True
            except psycopg.OperationalError:
                if conn is not None:
                    conn.close()
                conn = None
            time.sleep(0.2)
        return False
    finally:
        if conn is not None:
            conn.close()


def wait_dispatchers(dsn: str, ids: list[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute("SELECT count(*) FROM edm.dispatchers WHERE dispatcher_id = ANY"
                               " (%s) AND stopped_at IS NULL", (ids,)).fetchone()
            if row and row[0] == len(ids):
                return
            time.sleep(0.1)
    raise RuntimeError("the dispatchers did not register in time")


# ------------------------------------------------------------------------ the run


@dataclass
class RunState:
    t0: float = 0.0  # time.time() when the run's tasks became claimable
    baseline_t0: float = 0.0
    interval: float = 0.0  # seconds, every service's
    services: dict[str, int] = field(default_factory=dict)  # name -> service_id
    tasks: dict[str, int] = field(default_factory=dict)  # name -> task_id
    baseline_service: int | None = None
    baseline_task: int | None = None
    warmup_task: int | None = None
    restarts: list[dict[str, float]] = field(default_factory=list)
    outage_ended_at: float | None = None  # seconds after t0
    exits: list[dict[str, Any]] = field(default_factory=list)
    alive_at_end: int = 0
    timed_out: bool = False
    baseline_timed_out: bool = False
    seconds: float = 0.0
    server_started: float = 0.0
    stop_codes: dict[str, int | None] = field(default_factory=dict)


def run_scenario(dsn: str, cfg: FaultsConfig, workdir: Path,
                 restart: Callable[[], float] | None) -> tuple[RunState, list[Record],
                                                               dict[str, Any]]:
    specs = fault_services(cfg)
    # One server process for every mode but refuse_then_open, plus a healthy
    # port the outage services are moved to; refuse_then_open gets a process
    # of its own, started just before t0, so that it opens refuse_seconds after t0.
    served = [spec for spec in specs if spec.mode != "refuse_then_open"]
    modes = [spec.mode for spec in served] + ["healthy"]
    log_path = workdir / "received.jsonl"
    refuse_log = workdir / "received-refuse.jsonl"
    server_err = open(workdir / "server.log", "wb")  # noqa: SIM115
    state = RunState(server_started=time.time())
    server, ports = start_server(modes, log_path, server_err)
    refuse_server: subprocess.Popen[bytes] | None = None
    port_of = {spec.name: port for spec, port in zip(served, ports, strict=False)}
    port_of["refuse_then_open"] = _free_port()
    recovery_port = ports[-1]
    healthy_port = port_of["healthy"]
    tz = midday_tz()
    fleet: list[Dispatcher] = []
    try:
        configure(dsn, cfg)
        common.say(f"starting {cfg.dispatchers} dispatchers")
        fleet = [start_dispatcher(dsn, f"faults-{i}", workdir) for i in range(cfg.dispatchers)]
        wait_dispatchers(dsn, [d.dispatcher_id for d in fleet])

        # Warm-up: both processes import, connect and render once before anything is timed.
        with Scheduler(dsn) as s:
            add_service(s, "warmup", healthy_port, fault_services(cfg)[0].settings, cfg, tz)
            warm = add_task(s, "warmup", 2 * cfg.dispatchers,
                            dt.datetime.now(dt.UTC))
        state.warmup_task = warm
        if not wait_tasks(dsn, [warm], 60):
            raise RuntimeError("the warm-up messages were not sent within 60 s")

        common.say(f"building {len(specs)} services x {cfg.recipients} recipients")
        build_started = time.time()
        t0 = build_started + cfg.lead
        at = dt.datetime.fromtimestamp(t0, dt.UTC)
        with Scheduler(dsn) as s:
            for spec in specs:
                state.services[spec.name] = add_service(s, spec.name, port_of[spec.name],
                                                        spec.settings, cfg, tz)
            for spec in specs:
                state.tasks[spec.name] = add_task(s, spec.name, cfg.recipients, at,
                                                  big=cfg.big_message_chars if spec.big else 0)
        if time.time() >= t0 - 0.5:
            raise RuntimeError(f"building took {time.time() - build_started:.1f} s, "
                               f"more than the lead of {cfg.lead} s: raise --lead")
        state.t0 = t0
        state.interval = cfg.interval_ms / 1000
        refuse_server, _ = start_server(
            [f"{port_of['refuse_then_open']}=refuse_then_open:"
             f"{t0 + cfg.refuse_seconds - time.time():.3f}"], refuse_log, server_err)
        common.say(f"t0 in {t0 - time.time():.1f} s; PostgreSQL restart at +{cfg.db_restart_at}"
                   f" s, outages end at +{cfg.outage_seconds} s")
        restart_pending = restart is not None and cfg.db_restart
        outage_pending = True
        next_report = 5.0

        def tick(_: float) -> None:
            nonlocal restart_pending, outage_pending, next_report
            since = time.time() - t0
            for d in fleet:
                code = d.proc.poll()
                if code is not None and not any(e["dispatcher"] == d.dispatcher_id
                                                for e in state.exits):
                    state.exits.append({"dispatcher": d.dispatcher_id, "code": code,
                                        "after_s": round(since, 1),
                                        "log": _log_tail(d.log_path, 12)})
                    common.say(f"dispatcher {d.dispatcher_id} exited by itself ({code})")
            if restart_pending and restart is not None and since >= cfg.db_restart_at:
                restart_pending = False
                common.say("restarting PostgreSQL in immediate mode")
                began = time.time() - t0
                downtime = restart()
                state.restarts.append({"at_s": round(began, 2), "seconds": round(downtime, 2)})
                common.say(f"PostgreSQL answers again after {downtime:.1f} s")
            if outage_pending and since >= cfg.outage_seconds:
                with contextlib.suppress(psycopg.OperationalError, EdmSchedError), \
                        Scheduler(dsn) as s2:
                    for spec in specs:
                        if spec.outage:
                            s2.update_service(state.services[spec.name], {"settings": {
                                **fault_services(cfg)[0].settings, "host": "127.0.0.1",
                                "port": recovery_port}})
                    outage_pending = False
                    state.outage_ended_at = round(time.time() - t0, 2)
                    common.say("the outage services now point at a working port")
            if since >= next_report:
                next_report += 10
                common.say(f"+{since:.0f} s")

        started = time.monotonic()
        state.timed_out = not wait_tasks(dsn, list(state.tasks.values()), cfg.timeout, tick)
        state.seconds = round(time.time() - t0, 1)
        tick(0.0)  # a last look at the dispatchers
        state.alive_at_end = sum(1 for d in fleet if d.proc.poll() is None)
        common.say(f"faulty run {'timed out' if state.timed_out else 'finished'} after "
                   f"{time.monotonic() - started:.0f} s")

        if cfg.baseline:
            common.say("baseline: the healthy service alone")
            with Scheduler(dsn) as s:
                state.baseline_service = add_service(s, "baseline", healthy_port,
                                                     specs[0].settings, cfg, tz)
                t1 = time.time() + 3.0
                state.baseline_task = add_task(s, "baseline", cfg.recipients,
                                               dt.datetime.fromtimestamp(t1, dt.UTC))
            state.baseline_t0 = t1
            state.baseline_timed_out = not wait_tasks(dsn, [state.baseline_task], 120)
    finally:
        for d in fleet:
            state.stop_codes[d.dispatcher_id] = _stop(d.proc)
            d.log.close()
        for proc in (server, refuse_server):
            if proc is not None:
                _stop(proc, 30)
                if proc.stdout is not None:
                    proc.stdout.close()
        server_err.close()
    records = [r for path in (log_path, refuse_log) if path.exists() for r in read_log(path)]
    return state, records, {"recovery_port": recovery_port, "ports": port_of}


# ---------------------------------------------------------------------- the checks


def _subtask_of(message_id: str | None) -> int | None:
    """Subtask id of "<edm.TASK.SUBTASK@domain>", None for anything else."""
    if not message_id or not message_id.startswith("<edm."):
        return None
    try:
        return int(message_id[5:].split("@", 1)[0].split(".")[1])
    except (IndexError, ValueError):
        return None


def analyse(dsn: str, state: RunState, records: list[Record]) -> dict[str, Any]:
    run_tasks = list(state.tasks.values())
    name_of_task = {tid: name for name, tid in state.tasks.items()}
    with psycopg.connect(dsn, autocommit=True) as conn:
        subtasks = conn.execute(
            "SELECT subtask_id, task_id, status, attempts, finished_at FROM edm.subtasks"
            " WHERE task_id = ANY (%s)", (run_tasks,)).fetchall()
        possible = {sid: int(n) for sid, n in conn.execute(
            "SELECT subtask_id, uncertain_attempts FROM edm.possible_duplicates"
            " WHERE task_id = ANY (%s)", (run_tasks,)).fetchall()}
        events = conn.execute(
            "SELECT subtask_id, kind, occurred_at FROM edm.send_events WHERE task_id = ANY (%s)",
            (run_tasks,)).fetchall()
        # Where the healthy sends' time went: slots (claims) and wire starts (sends).
        timed = [t for t in (state.tasks.get("healthy"), state.baseline_task) if t is not None]
        slots = {sid: (tid, started.timestamp(), dispatcher)
                 for sid, tid, started, dispatcher in conn.execute(
                     "SELECT subtask_id, task_id, started_at, dispatcher FROM edm.send_events"
                     " WHERE task_id = ANY (%s) AND kind = 'sent'", (timed,)).fetchall()}
        served_by: dict[str, Counter[str]] = defaultdict(Counter)
        for tid, dispatcher, n in conn.execute(
                "SELECT task_id, dispatcher, count(*) FROM edm.send_events"
                " WHERE task_id = ANY (%s) AND kind <> 'late_completion' GROUP BY 1, 2",
                (run_tasks,)).fetchall():
            served_by[name_of_task[tid]][dispatcher] += int(n)
        expiries = [{"subtask": sid, "kind": kind, "attempt": attempt,
                     "slot_s": None if started is None
                     else round(started.timestamp() - state.t0, 2),
                     "at_s": round(occurred.timestamp() - state.t0, 2), "detail": detail}
                    for sid, kind, attempt, started, occurred, detail in conn.execute(
            "SELECT subtask_id, kind, attempt, started_at, occurred_at, detail FROM edm.send_events"
            " WHERE task_id = ANY (%s) AND kind IN ('lease_expired', 'late_completion')"
            " ORDER BY occurred_at LIMIT 50", (run_tasks,)).fetchall()]
        task_states: dict[int, str] = dict(conn.execute(
            "SELECT task_id, status FROM edm.tasks WHERE task_id = ANY (%s)",
            (run_tasks,)).fetchall())
        baseline_sids: set[int] = set()
        if state.baseline_task is not None:
            baseline_sids = {r[0] for r in conn.execute(
                "SELECT subtask_id FROM edm.subtasks WHERE task_id = %s",
                (state.baseline_task,)).fetchall()}
        warmup_sids = {r[0] for r in conn.execute(
            "SELECT subtask_id FROM edm.subtasks WHERE task_id = %s",
            (state.warmup_task,)).fetchall()}

    task_of = {sid: tid for sid, tid, *_ in subtasks}
    status_of = {sid: status for sid, _, status, *_ in subtasks}
    copies: dict[int, list[Record]] = defaultdict(list)
    baseline_copies: list[Record] = []
    unknown = 0
    for r in records:
        sid = _subtask_of(r.message_id)
        if sid is not None and sid in task_of:
            copies[sid].append(r)
        elif sid in baseline_sids:
            baseline_copies.append(r)
        elif sid not in warmup_sids:
            unknown += 1  # not a message of this benchmark
    uncertain_at: dict[int, list[float]] = defaultdict(list)
    kinds: dict[str, Counter[str]] = defaultdict(Counter)
    recorded_events: Counter[int] = Counter()
    for sid, kind, occurred in events:
        kinds[name_of_task[task_of[sid]]][kind] += 1
        if kind == "uncertain":
            uncertain_at[sid].append(occurred.timestamp())
        if kind in ("uncertain", "lease_expired"):
            recorded_events[sid] += 1

    duplicates = unrecorded = avoidable = 0
    view_mismatch = 0
    for sid, got in copies.items():
        extra = len(got) - 1
        duplicates += max(extra, 0)
        if possible.get(sid, 0) != recorded_events.get(sid, 0):
            view_mismatch += 1
        unrecorded += max(0, extra - possible.get(sid, 0))
        marks = sorted(uncertain_at.get(sid, []))
        for k, r in enumerate(sorted(got, key=lambda x: x.mail_at)[1:], start=1):
            if bisect.bisect_left(marks, r.mail_at) < k:
                avoidable += 1

    not_terminal = sum(1 for s in status_of.values() if s not in ("sent", "failed"))
    sent_without_copy = sum(1 for sid, s in status_of.items()
                            if s == "sent" and not any(r.answered for r in copies.get(sid, [])))
    failed_with_copy = sum(1 for sid, s in status_of.items()
                           if s == "failed" and sid in copies)
    unfinished = sum(1 for tid in run_tasks if task_states.get(tid) != "completed")

    t0 = state.t0
    interval = state.interval
    wire_violations = 0
    per_service = []
    for name, tid in state.tasks.items():
        sids = [sid for sid, t in task_of.items() if t == tid]
        got = [r for sid in sids for r in copies.get(sid, [])]
        finished = [f for sid, t, _, _, f in subtasks if t == tid and f is not None]
        ev = kinds[name]
        mails = sorted(r.mail_at for r in got)
        n_wire, lag = wire_lag_violations(mails, interval, WIRE_TOLERANCE)
        wire_violations += n_wire
        per_service.append({
            "service": name,
            "subtasks": len(sids),
            "sent": sum(1 for sid in sids if status_of[sid] == "sent"),
            "failed": sum(1 for sid in sids if status_of[sid] == "failed"),
            "copies": len(got),
            "extra_copies": sum(max(len(copies.get(sid, [])) - 1, 0) for sid in sids),
            "unanswered_copies": sum(1 for r in got if not r.answered),
            "uncertain": ev["uncertain"], "retry": ev["retry"],
            "service_failure": ev["service_failure"], "released": ev["released"],
            "lease_expired": ev["lease_expired"], "late_completion": ev["late_completion"],
            "last_copy_s": round(max(r.dot_at for r in got) - t0, 2) if got else None,
            "finished_s": round(max(f.timestamp() for f in finished) - t0, 2)
            if finished else None,
            "min_wire_gap_s": round(min(b - a for a, b in itertools.pairwise(mails)),
                                    3) if len(mails) > 1 else None,
            "wire_lag_s": round(lag, 3), "wire_violations": n_wire,
            "dispatchers": dict(served_by.get(name, {})),
        })
    healthy = [r for sid, got in copies.items() if task_of[sid] == state.tasks["healthy"]
               for r in got if r.answered]
    healthy_s = round(max(r.dot_at for r in healthy) - t0, 3) if healthy else None
    baseline_s = (round(max(r.dot_at for r in baseline_copies if r.answered)
                        - state.baseline_t0, 3)
                  if any(r.answered for r in baseline_copies) else None)
    slowdown = (round(healthy_s / baseline_s, 3)
                if healthy_s is not None and baseline_s else None)
    restart_end = (t0 + state.restarts[0]["at_s"] + state.restarts[0]["seconds"]
                   if state.restarts else None)
    after_restart = (sum(1 for r in records if restart_end is not None and r.dot_at > restart_end
                         and _subtask_of(r.message_id) in task_of) if restart_end else 0)
    restart_survived = bool(state.restarts) and state.alive_at_end == len(state.stop_codes) \
        and not state.exits and unfinished == 0 and not state.timed_out and after_restart > 0
    timing = {label: _timing(tid, start, state.interval, slots, records)
              for label, tid, start in (("healthy", state.tasks.get("healthy"), t0),
                                        ("baseline", state.baseline_task, state.baseline_t0))
              if tid is not None}
    all_kinds: Counter[str] = Counter()
    for c in kinds.values():
        all_kinds.update(c)
    return {
        "subtasks": len(subtasks),
        "sent": sum(1 for s in status_of.values() if s == "sent"),
        "failed": sum(1 for s in status_of.values() if s == "failed"),
        "lost": not_terminal + sent_without_copy,
        "not_sent_nor_failed": not_terminal,
        "sent_without_copy": sent_without_copy,
        "failed_with_copy": failed_with_copy,
        "unfinished": unfinished,
        "copies": sum(len(g) for g in copies.values()),
        "duplicates": duplicates,
        "duplicates_unrecorded": unrecorded,
        "duplicates_avoidable": avoidable,
        "wire_interval_violations": wire_violations,
        "possible_duplicates_rows": len(possible),
        "possible_duplicates_vs_events_mismatch": view_mismatch,
        "unknown_copies": unknown,
        "event_kinds": dict(all_kinds),
        "healthy_completion_s": healthy_s,
        "baseline_completion_s": baseline_s,
        "ideal_completion_s": None,  # filled in by the caller
        "healthy_slowdown": slowdown,
        "restart_survived": restart_survived,
        "copies_after_restart": after_restart,
        "per_service": per_service,
        "lease_expiry_log": expiries,
        "healthy_timing": timing,
    }


def _timing(task_id: int, t0: float, interval: float,
            slots: dict[int, tuple[int, float, str]], records: list[Record]) -> dict[str, Any]:
    """Where a service's time went: ``slot_lag_s``, how much later than t0 + k x interval
    its k-th slot was (claims: the dispatcher asked late, or the service was held
    up in SQL), at the last slot and at worst; ``send_lag_*``, how long after its
    slot each MAIL FROM reached the server (sends: the event loop, the connection)."""
    mine = {sid: (at, d) for sid, (tid, at, d) in slots.items() if tid == task_id}
    ordered = sorted(at for at, _ in mine.values())
    slot_lags = [at - (t0 + k * interval) for k, at in enumerate(ordered)]
    send_lags = sorted(r.mail_at - mine[sid][0] for r in records if r.answered
                       and (sid := _subtask_of(r.message_id)) is not None and sid in mine)
    return {
        "slot_lag_last_s": round(slot_lags[-1], 3) if slot_lags else None,
        "slot_lag_max_s": round(max(slot_lags), 3) if slot_lags else None,
        "send_lag_median_s": round(send_lags[len(send_lags) // 2], 3) if send_lags else None,
        "send_lag_max_s": round(send_lags[-1], 3) if send_lags else None,
        "dispatchers": dict(Counter(d for _, d in mine.values())),
    }


def ok(result: dict[str, Any]) -> bool:
    slowdown = result["healthy_slowdown"]
    return (not result["timed_out"]
            and all(result[k] == 0 for k in ("lost", "unfinished", "duplicates_unrecorded",
                                              "duplicates_avoidable", "unknown_copies"))
            and slowdown is not None and slowdown <= SLOWDOWN_GOAL
            and (result["restart_survived"] or result["db_restarts"] == 0))


# ------------------------------------------------------------------------- output


def print_report(result: dict[str, Any], note: str | None) -> None:
    common.print_table("run", ["figure", "value"], [
        ["subtasks", result["subtasks"]],
        ["sent / failed", f"{result['sent']} / {result['failed']}"],
        ["seconds (t0 to the last task finished)", result["seconds"]],
        ["PostgreSQL immediate restarts (at s after t0: seconds down)", ", ".join(
            f"{r['at_s']}: {r['seconds']}" for r in result["db_restart_log"]) or "-"],
        ["outage services pointed at a working port (s after t0)", result["outage_ended_at_s"]],
        ["dispatchers running at the end / started", f"{result['dispatchers_alive_at_end']}"
         f" / {result['dispatchers']}"],
        ["dispatchers that exited by themselves", len(result["dispatcher_exits"])],
        ["timed out", result["timed_out"]],
    ], note=note)
    common.print_table("promises (from the server's receive log and the database)",
                       ["figure", "value"], [
        ["lost (neither sent nor failed, or sent without a copy)", result["lost"]],
        ["unfinished tasks", result["unfinished"]],
        ["copies at the server", result["copies"]],
        ["duplicate copies (same Message-ID)", result["duplicates"]],
        ["  not matched by a recorded uncertain attempt", result["duplicates_unrecorded"]],
        ["  not preceded by a recorded uncertain outcome", result["duplicates_avoidable"]],
        ["failed subtasks of which the server has a copy", result["failed_with_copy"]],
        ["healthy service: last message at +s (faulty run)", result["healthy_completion_s"]],
        ["healthy service: last message at +s (fault-free run)",
         result["baseline_completion_s"]],
        ["healthy_slowdown (goal <= 1.1)", result["healthy_slowdown"]],
        *[[f"  {label}: last slot late by s / wire start after slot s (median, max)",
           f"{t['slot_lag_last_s']} / {t['send_lag_median_s']}, {t['send_lag_max_s']}"]
          for label, t in result["healthy_timing"].items()],
        ["wire interval violations (I2, MAIL FROM at the server)",
         result["wire_interval_violations"]],
        ["restart survived", result["restart_survived"]],
    ])
    common.print_table("services", [
        "service", "sent", "failed", "copies", "extra", "unanswered", "uncertain", "retry",
        "svc fail", "released", "lease exp", "late", "last copy +s", "finished +s",
        "min gap s", "dispatchers"],
        [[s["service"], s["sent"], s["failed"], s["copies"], s["extra_copies"],
          s["unanswered_copies"], s["uncertain"], s["retry"], s["service_failure"],
          s["released"], s["lease_expired"], s["late_completion"], s["last_copy_s"],
          s["finished_s"], s["min_wire_gap_s"],
          " ".join(f"{d.rsplit('-', 1)[-1]}:{n}" for d, n in sorted(s["dispatchers"].items()))]
         for s in result["per_service"]])
    for e in result["dispatcher_exits"]:
        print(f"\ndispatcher {e['dispatcher']} exited by itself ({e['code']}) after "
              f"{e['after_s']} s: {e['log'][-600:]}")
    print("\n" + ("all goals met" if ok(result) else "GOALS MISSED (see above)"))


def _extra_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--short", action="store_true",
                        help="about a minute: 10 recipients a service, faster faults")
    parser.add_argument("--recipients", type=int, default=None)
    parser.add_argument("--no-db-restart", action="store_true")
    parser.add_argument("--big-message-chars", type=int, default=None,
                        help="body of the drop_during_data task's message (0: a short one)")
    parser.add_argument("--lead", type=float, default=None,
                        help="seconds between the start of task creation and t0")
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--concurrency", type=int, default=None,
                        help="queue.concurrent_workers of the dispatchers (default: the "
                             "product's, 10)")
    parser.add_argument("--database", default="bench_faults",
                        help="name of the database created for the run (default bench_faults)")


def main(argv: Sequence[str]) -> int:
    args = common.parse_args("faults", argv, "two dispatchers against a misbehaving SMTP "
                             "server, one healthy service beside, a PostgreSQL restart",
                             _extra_args)
    cfg = short_config() if args.short else full_config()
    for name in ("recipients", "lead", "timeout", "big_message_chars", "concurrency"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.no_db_restart:
        cfg.db_restart = False
    with common.bench_server(args.dsn, keep=args.keep) as server, \
            tempfile.TemporaryDirectory(prefix="edm-faults-") as tmp:
        restart: Callable[[], float] | None = None
        note = None
        if not cfg.db_restart:
            note = "PostgreSQL restart: skipped (--no-db-restart)"
        elif server.embedded is None:
            note = ("PostgreSQL restart: skipped, the server was given with --dsn "
                    "(only a server this benchmark started is restarted)")
        else:
            def restart() -> float:
                return restart_embedded(server)
        if note:
            common.say(note)
        dsn = server.fresh_database(args.database)
        specs = fault_services(cfg)
        header = common.print_header("faults: a misbehaving SMTP server, one healthy service",
                                     server, {
            "services": len(specs), "recipients_per_service": cfg.recipients,
            "subtasks": len(specs) * cfg.recipients, "interval_ms": cfg.interval_ms,
            "dispatchers": cfg.dispatchers, "modes": " ".join(s.mode for s in specs)})
        state, records, ports = run_scenario(dsn, cfg, Path(tmp), restart)
        common.say("checking against the server's log and the database")
        result = analyse(dsn, state, records)
        if args.keep:
            kept = Path(tempfile.mkdtemp(prefix="edm-faults-logs-"))
            for f in Path(tmp).iterdir():
                with contextlib.suppress(OSError):
                    (kept / f.name).write_bytes(f.read_bytes())
            common.say(f"logs kept in {kept}")
    result.update({
        "ideal_completion_s": round((cfg.recipients - 1) * cfg.interval_ms / 1000, 3),
        "seconds": state.seconds,
        "timed_out": state.timed_out or state.baseline_timed_out,
        "db_restarts": len(state.restarts),
        "db_restart_log": state.restarts,
        "db_restart_skipped": note,
        "outage_ended_at_s": state.outage_ended_at,
        "dispatchers": cfg.dispatchers,
        "dispatchers_alive_at_end": state.alive_at_end,
        "dispatcher_exits": state.exits,
        "dispatcher_stop_codes": state.stop_codes,
        "ports": ports["ports"],
    })
    print_report(result, note)
    result.update({k: v for k, v in header.items()})
    result["config"] = asdict(cfg)
    result["ok"] = ok(result)
    common.finish(args, result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        raise SystemExit(worker_main(sys.argv[2:]))
    raise SystemExit(main(sys.argv[1:]))
