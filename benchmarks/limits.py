"""Limits on the wire: services of mixed limits, judged by a real SMTP server's log.

``python -m benchmarks limits [--seconds 75] [--dispatchers 2] [--dsn DSN] [--json]``

Services with the limits real sending accounts have, all sending through one
local SMTP server (:class:`edm_sched.smtp_sink.SmtpSink`, aiosmtpd, in this
process) from dispatcher processes (``python -m benchmarks.chaos worker``:
``run_dispatcher`` with an ``SmtpTransport``):

* ``interval-100ms``: the built-in interval, 100 ms;
* ``rate-20ps-b5``: 20 per second with a burst of 5 (a token bucket, like an
  ESP API key's MaxSendRate);
* ``rate-30pm``: 30 per minute, burst 1 (a Microsoft 365 SMTP login);
* ``calday``: a 50 ms interval and a calendar-day limit small enough to bind
  about 40 % into the run (in a zone where it is about noon, so the day does
  not roll over);
* ``rolling24h``: 10 per second (burst 3) and a rolling 24-hour limit that
  binds about halfway (SES Max24HourSend).

Several users, each granted every service, have a backlog larger than the run
can send, so every service is saturated until the dispatchers are stopped.
Some recipients are refused once with ``451 4.7.1`` (the first ``--fail-until``
seconds only, so their retries fall inside the run), with
``queue.pending_retry_interval`` at its minimum, 30 s.

Every figure is computed from the server's own timestamps (``mail_from_at``:
when the server read the transaction's MAIL FROM; the transaction start a
provider's limiter sees) for every transaction that reached it, accepted or
refused, and from the database only for what the scheduler intended:

* ``limit_violations``: for each service and each of its limits, recomputed
  from the server's log: interval (a gap shorter than the interval minus the
  tolerance), rate (GCRA: a token bucket of ``burst`` tokens refilled every
  ``window / max_count``; a start earlier than its theoretical arrival time
  minus ``(burst - 1) * window / max_count`` minus the tolerance), rolling (more
  than ``max_count`` starts in any window of ``window_ms``), calendar day and
  the daily quota (more starts on one local day than allowed). The tolerance
  is the 5 ms of issue 14 (``--tolerance-ms``); counts per window have none.
* ``min_gap_slack_ms``: the smallest wire gap minus the interval, over the
  services with an interval (goal >= -5 ms).
* ``slot_lateness_*_ms``: server MAIL FROM time minus the attempt's slot
  (``edm.send_events.started_at``, which ``edm.claim_v2`` set to the slot).
  Both clocks are this machine's. Attempts pair with transactions by
  recipient, in attempt order. The first transaction of each dispatcher on
  each service (its first connection) is reported on its own too.
* ``binding_limit_utilisation``: per service, starts in its saturated period
  [its first start, the stop] / the most any schedule within all its limits
  could start in that period from a fresh state (interval: 1 + D / interval;
  rate: burst + D * max_count / window; calendar day, rolling, daily quota:
  max_count), the smallest of those naming the binding limit. The figure is
  the minimum over services (goal >= 0.99).
* ``retry_lateness_*_s``: a retried attempt's due time is its failure's
  ``not_before``: the ``retry`` event's ``occurred_at`` (the completion's
  ``now()``, which ``edm.complete`` also used) + ``pending_retry_interval``
  * 2^(attempt - 1), capped at ``retry_backoff_max``. Its lateness is the
  server MAIL FROM time of the next attempt minus that due time. Retries due
  before the stop that never came are counted (``retries_missing``) and,
  for the percentiles, late by (stop - due). Goal: p99 <= the slowest
  service's interval + 1 s (30 per minute: 2 s + 1 s).

Diagnostics, printed beside the figures: slot lateness split into the
dispatcher's part (slot -> the transport's ``send()`` called, traced by the
worker processes, ``python -m benchmarks.limits worker``) and the wire's
(``send()`` -> the server read MAIL FROM); the first start of each dispatcher
on each service (its first claim and connection); the interval and rate
checks, minimum gap slack and lateness p99 again without each service's first
second of sends (``steady_*``: what the steady state does, apart from the
start-up); and the machine's CPU pressure (Linux PSI, ``some avg60``: the
share of time runnable tasks waited for a CPU), since every timing figure
here is also a measure of how promptly two processes get a CPU.

The process exits 1 when ``limit_violations`` is not 0.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import math
import signal
import subprocess
import sys
import tempfile
import time
import zoneinfo
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psycopg
from psycopg.types.json import Jsonb

from benchmarks import common
from benchmarks.chaos import ROOT, _child_env, _log_tail, midday_tz
from edm_sched.api import Scheduler
from edm_sched.smtp_sink import Received, SmtpSink

DESCRIPTION = "Services of mixed limits through a real SMTP server: violations, slack, lateness"

RETRY_PREFIX = "retry-"  # recipients refused once with 451
STARTUP_S = 1.0  # the "steady_" figures leave out each service's first second of sends


@dataclass
class ServiceDef:
    name: str
    interval_ms: int
    limits: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class LimitsConfig:
    seconds: float = 75.0  # from the dispatchers' start to the stop
    dispatchers: int = 2
    users: int = 8
    subtasks: int = 12_000
    retry_every: int = 25  # every n-th recipient of a user is refused once (0: none)
    fail_until: float | None = None  # seconds after the start; None: seconds - 40
    retry_base: int = 30  # queue.pending_retry_interval (its minimum)
    concurrency: int = 10
    lease_seconds: int = 30
    tolerance_ms: float = 5.0
    services: list[ServiceDef] | None = None

    def service_defs(self) -> list[ServiceDef]:
        if self.services is not None:
            return self.services
        return default_services(self.seconds)


def default_services(seconds: float) -> list[ServiceDef]:
    """The five services of the module doc; the day and rolling limits bind mid-run."""
    return [
        ServiceDef("interval-100ms", 100),
        ServiceDef("rate-20ps-b5", 0, [{"name": "per_second", "kind": "rate", "max_count": 20,
                                        "window_ms": 1000, "burst": 5}]),
        ServiceDef("rate-30pm", 0, [{"name": "per_minute", "kind": "rate", "max_count": 30,
                                     "window_ms": 60_000, "burst": 1}]),
        ServiceDef("calday", 50, [{"name": "per_day", "kind": "calendar_day",
                                   "max_count": max(5, round(20 * seconds * 0.4))}]),
        ServiceDef("rolling24h", 0, [
            {"name": "per_second", "kind": "rate", "max_count": 10, "window_ms": 1000,
             "burst": 3},
            {"name": "rolling_24h", "kind": "rolling",
             "max_count": max(5, round(10 * seconds * 0.5)), "window_ms": 86_400_000}]),
    ]


def short_config(seconds: float = 25.0) -> LimitsConfig:
    """The test-suite size: no retries (the shortest retry delay is 30 s)."""
    return LimitsConfig(seconds=seconds, dispatchers=2, users=4, subtasks=4_000, retry_every=0)


# --------------------------------------------------------------------------- the world


@dataclass
class World:
    services: dict[int, ServiceDef]  # service_id -> definition
    senders: dict[str, int]  # envelope sender -> service_id
    tz: str
    daily_quota: int
    retry_base: int
    retry_max: int


def build_world(dsn: str, cfg: LimitsConfig, port: int) -> World:
    tz = midday_tz()
    daily_quota = 1_000_000
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT edm.config_set('queue.pending_retry_interval', %s)",
                     (Jsonb(cfg.retry_base),))
        conn.execute("SELECT edm.config_set('sweep.interval', %s)", (Jsonb(1),))
        retry_max = int(conn.execute(
            "SELECT edm.config_int('queue.retry_backoff_max')").fetchone()[0])  # type: ignore[index]
    users = [f"user-{u:02d}" for u in range(cfg.users)]
    per_user = [cfg.subtasks // cfg.users + (1 if i < cfg.subtasks % cfg.users else 0)
                for i in range(cfg.users)]
    settings = {"host": "127.0.0.1", "port": port, "security": "none", "timeout": 10}
    services: dict[int, ServiceDef] = {}
    senders: dict[str, int] = {}
    with Scheduler(dsn) as s:
        for user in users:
            s.upsert_user(user)
        for d in cfg.service_defs():
            sender = f"{d.name}@sender.example"
            sid = s.create_service({
                "name": d.name, "from_addresses": [sender],
                "interval_seconds": d.interval_ms / 1000, "daily_quota": daily_quota,
                "transport": "smtp", "quota_tz": tz, "settings": settings})
            services[sid] = d
            senders[sender] = sid
            for user in users:
                s.grant(sid, user)
        for user, n in zip(users, per_user, strict=True):
            s.create_task({
                "user_id": user, "name": "limits",
                "templates": [{"subject": f"limits run for {user}",
                               "body_text": "Hello,\n\nthis is a limits run.\n"}],
                "recipients": [{"email": _recipient(user, k, cfg.retry_every)}
                               for k in range(n)],
            })
    with psycopg.connect(dsn, autocommit=True) as conn:
        for sid, d in services.items():
            if d.limits:
                conn.execute("SELECT edm.set_service_limits(%s, %s)", (sid, Jsonb(d.limits)))
    return World(services, senders, tz, daily_quota, cfg.retry_base, retry_max)


def _recipient(user: str, k: int, retry_every: int) -> str:
    prefix = RETRY_PREFIX if retry_every and k % retry_every == retry_every - 1 else ""
    return f"{prefix}{user}-{k:06d}@rcpt.example"


class RefuseOnce:
    """Sink rule: ``451`` for a ``retry-`` recipient the first time, until ``until``."""

    def __init__(self) -> None:
        self.until = 0.0  # time.time() after which nobody is refused any more
        self.refused: set[str] = set()

    def __call__(self, recipient: str) -> tuple[int, str] | None:
        if not recipient.startswith(RETRY_PREFIX) or recipient in self.refused:
            return None
        if time.time() >= self.until:
            return None
        self.refused.add(recipient)
        return (451, "4.7.1 greylisted, try again later")


# --------------------------------------------------------------------------- the run


class TracingTransport:
    """The real SMTP transport, noting when the dispatcher handed each message to it.

    Splits a send's lateness into the dispatcher's part (slot -> ``send()``
    called) and the wire's (``send()`` called -> the server read MAIL FROM).
    """

    def __init__(self, inner: Any, trace: IO[str]) -> None:
        self.inner = inner
        self.trace = trace

    async def send(self, service: Any, message: Any) -> Any:
        called = time.time()
        result = await self.inner.send(service, message)
        self.trace.write(json.dumps([message.recipient, called, time.time()]) + "\n")
        return result

    async def aclose(self) -> None:
        await self.inner.aclose()


def worker_main(argv: Sequence[str]) -> int:
    """One dispatcher: ``python -m benchmarks.limits worker --dsn DSN --id ID --trace PATH``."""
    import logging

    from psycopg import conninfo

    from edm_sched.dispatcher import run_dispatcher
    from edm_sched.transports.smtp import SmtpTransport

    parser = argparse.ArgumentParser(prog="python -m benchmarks.limits worker")
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--trace", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--lease", type=int, default=30)
    args = parser.parse_args(list(argv))
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s {args.id} %(levelname)s %(name)s %(message)s")
    dsn = conninfo.make_conninfo(args.dsn, application_name=args.id[:63])
    with open(args.trace, "w", encoding="utf-8") as trace:
        transport = TracingTransport(SmtpTransport(timeout=10.0), trace)
        stats = run_dispatcher(dsn, {"smtp": transport},
                               dispatcher_id=args.id, concurrency=args.concurrency,
                               lease_seconds=args.lease, handle_signals=True)
    print(f"{args.id} stopped: claimed={stats.claimed} sent={stats.sent} "
          f"rejected={stats.rejected}", file=sys.stderr)
    return 0


def start_dispatcher(dsn: str, i: int, cfg: LimitsConfig,
                     workdir: Path) -> tuple[subprocess.Popen[bytes], Path]:
    did = f"limits-{i}"
    log_path = workdir / f"{did}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.limits", "worker", "--dsn", dsn, "--id", did,
             "--trace", str(workdir / f"{did}.trace.jsonl"),
             "--concurrency", str(cfg.concurrency), "--lease", str(cfg.lease_seconds)],
            cwd=ROOT, env=_child_env(), stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT)
    return proc, log_path


def read_traces(workdir: Path) -> dict[str, list[float]]:
    """recipient -> the times its sends were handed to the transport, in order."""
    out: dict[str, list[float]] = defaultdict(list)
    for path in sorted(workdir.glob("*.trace.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError, IndexError):
                rcpt, called, _ = json.loads(line)
                out[rcpt].append(float(called))
    for v in out.values():
        v.sort()
    return out


def cpu_pressure() -> float | None:
    """Share of the last 60 s some runnable task waited for a CPU (Linux PSI), in %."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        first = Path("/proc/pressure/cpu").read_text(encoding="ascii").splitlines()[0]
        return float(first.split("avg60=")[1].split()[0])
    return None


def run_scenario(dsn: str, cfg: LimitsConfig, workdir: Path | None = None) -> dict[str, Any]:
    """Build the world on migrated database ``dsn``, run, and analyse; returns the figures."""
    rule = RefuseOnce()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edm-limits-")))
        sink = stack.enter_context(SmtpSink(rules=rule, keep_data=False))
        world = build_world(dsn, cfg, sink.port)
        common.say(f"{len(world.services)} services, {cfg.users} users, {cfg.subtasks:,} "
                   f"subtasks; {cfg.dispatchers} dispatcher(s) for {cfg.seconds:.0f} s")
        t_start = time.time()
        pressure_start = cpu_pressure()
        fail_until = cfg.fail_until if cfg.fail_until is not None else cfg.seconds - 40
        rule.until = t_start + fail_until if cfg.retry_every else 0.0
        procs = [start_dispatcher(dsn, i, cfg, workdir) for i in range(cfg.dispatchers)]
        exits: list[str] = []
        try:
            next_report = t_start + 10
            while time.time() < t_start + cfg.seconds:
                for proc, log_path in procs:
                    if proc.poll() is not None:
                        raise RuntimeError(f"a dispatcher exited ({proc.returncode}): "
                                           f"{_log_tail(log_path, 5)}")
                if time.time() >= next_report:
                    common.say(f"  {time.time() - t_start:.0f} s: {len(sink.received):,} "
                               f"accepted, {len(sink.refused)} refused")
                    next_report += 10
                time.sleep(0.1)
            t_end = time.time()
            pressure_end = cpu_pressure()
            with psycopg.connect(dsn, autocommit=True) as conn:
                row = conn.execute("SELECT count(*) FROM edm.subtasks "
                                   "WHERE status = 'pending'").fetchone()
                pending_at_end = int(row[0]) if row else 0
        finally:
            for proc, _ in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc, log_path in procs:
                try:
                    code = proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    code = proc.wait(10)
                if code != 0:
                    exits.append(f"exit {code}: {_log_tail(log_path, 5)}")
        # Sends in flight at the stop finish and are completed: wait for the
        # transactions to settle before reading the log.
        time.sleep(0.5)
        accepted, refused = sink.received, sink.refused
        with open(workdir / "wire.jsonl", "w", encoding="utf-8") as f:
            for r in sorted(accepted + refused, key=lambda r: r.mail_from_at or 0.0):
                f.write(r.to_json() + "\n")
        traces = read_traces(workdir)
        result = analyse(dsn, world, accepted + refused, t_start, t_end, cfg, traces,
                         workdir / "sends.jsonl")
    result.update({"pending_at_stop": pending_at_end, "unclean_stops": exits,
                   "duration_s": round(t_end - t_start, 1),
                   "cpu_pressure_avg60_pct": [pressure_start, pressure_end]})
    return result


# --------------------------------------------------------------------------- the checks


def gcra_check(times: Sequence[float], max_count: int, window_s: float, burst: int,
               tol: float) -> tuple[int, float]:
    """Starts that do not conform to "max_count per window, burst" (a token bucket).

    Returns (violations, smallest slack in seconds): a start at t conforms when
    t >= tat - (burst - 1) * T - tol, T = window / max_count, where tat is the
    theoretical arrival time left by the conforming starts before it (GCRA, as
    the claim computes it, but on the server's times: a late start pushes tat
    later). A start that does not conform is one the provider's token bucket
    would have refused: it is counted and takes no token (tat unchanged).
    """
    if max_count <= 0:
        return len(times), -math.inf if times else math.inf
    period = window_s / max_count
    tau = (burst - 1) * period
    tat: float | None = None
    violations = 0
    slack = math.inf
    for t in sorted(times):
        if tat is not None:
            s = t - (tat - tau)
            slack = min(slack, s)
            if s < -tol:
                violations += 1
                continue
        tat = max(tat if tat is not None else t, t) + period
    return violations, slack


def window_check(times: Sequence[float], max_count: int, window_s: float) -> tuple[int, int]:
    """Starts beyond max_count in a window of window_s ending at them; and the fullest window."""
    ts = sorted(times)
    violations = 0
    fullest = 0
    lo = 0
    for hi, t in enumerate(ts):
        while ts[lo] <= t - window_s:
            lo += 1
        n = hi - lo + 1
        fullest = max(fullest, n)
        if n > max_count:
            violations += 1
    return violations, fullest


def day_check(times: Sequence[float], max_count: int, tz: str) -> tuple[int, int]:
    """Starts beyond max_count on one local calendar day of tz; and the fullest day."""
    zone = zoneinfo.ZoneInfo(tz)
    days = Counter(dt.datetime.fromtimestamp(t, zone).date() for t in times)
    return sum(max(0, n - max_count) for n in days.values()), max(days.values(), default=0)


@dataclass
class LimitCheck:
    service: str
    limit: str
    kind: str
    rule: str
    starts: int
    violations: int
    worst: str  # smallest slack (ms) or fullest window / day
    allowed: float  # most starts in the saturated period


def check_service(d: ServiceDef, times: list[float], t_end: float, tz: str, daily_quota: int,
                  tol: float) -> tuple[list[LimitCheck], float | None]:
    """Every limit of one service against its wire start times; and the interval slack."""
    ts = sorted(times)
    period = (t_end - ts[0]) if ts else 0.0
    checks: list[LimitCheck] = []
    gap_slack: float | None = None
    if d.interval_ms > 0:
        iv = d.interval_ms / 1000
        gaps = [b - a for a, b in itertools.pairwise(ts)]
        gap_slack = min((g - iv for g in gaps), default=None)
        n_bad = sum(1 for g in gaps if g < iv - tol)
        checks.append(LimitCheck(d.name, "interval", "interval", f"{d.interval_ms} ms",
                                 len(ts), n_bad,
                                 "-" if gap_slack is None else f"{gap_slack * 1000:+.1f} ms",
                                 1 + math.floor(period / iv + 1e-9)))
    for lim in d.limits:
        kind, n = lim["kind"], int(lim["max_count"])
        if kind == "rate":
            w = lim["window_ms"] / 1000
            burst = int(lim.get("burst", 1))
            bad, slack = gcra_check(ts, n, w, burst, tol)
            checks.append(LimitCheck(d.name, lim["name"], kind,
                                     f"{n} per {lim['window_ms']} ms, burst {burst}", len(ts), bad,
                                     f"{slack * 1000:+.1f} ms" if math.isfinite(slack) else "-",
                                     burst + math.floor(period * n / w + 1e-9)))
        elif kind == "rolling":
            bad, fullest = window_check(ts, n, lim["window_ms"] / 1000)
            checks.append(LimitCheck(d.name, lim["name"], kind,
                                     f"{n} per {lim['window_ms'] / 3_600_000:g} h rolling",
                                     len(ts), bad, f"fullest {fullest}", n))
        else:
            bad, fullest = day_check(ts, n, lim.get("time_zone") or tz)
            checks.append(LimitCheck(d.name, lim["name"], kind, f"{n} per calendar day",
                                     len(ts), bad, f"fullest {fullest}", n))
    bad, fullest = day_check(ts, daily_quota, tz)
    checks.append(LimitCheck(d.name, "daily_quota", "calendar_day", f"{daily_quota} per day",
                             len(ts), bad, f"fullest {fullest}", daily_quota))
    return checks, gap_slack


def analyse(dsn: str, world: World, wire: list[Received], t_start: float, t_end: float,
            cfg: LimitsConfig, traces: dict[str, list[float]] | None = None,
            dump: Path | None = None) -> dict[str, Any]:
    tol = cfg.tolerance_ms / 1000
    # ---- transactions per service (by envelope sender) and per recipient
    by_service: dict[int, list[float]] = defaultdict(list)
    by_rcpt: dict[str, list[tuple[float, int]]] = defaultdict(list)
    no_time = unknown_sender = 0
    for r in wire:
        if r.mail_from_at is None:
            no_time += 1
            continue
        sid = world.senders.get(r.sender or "")
        if sid is None:
            unknown_sender += 1
            continue
        by_service[sid].append(r.mail_from_at)
        by_rcpt[r.recipient].append((r.mail_from_at, sid))
    for v in by_rcpt.values():
        v.sort()

    # ---- limits, gap slack, utilisation
    checks: list[LimitCheck] = []
    utilisation: dict[str, dict[str, Any]] = {}
    gap_slacks: list[float] = []
    steady_slacks: list[float] = []
    steady_violations = 0
    first_start: dict[int, float] = {}
    for sid, d in sorted(world.services.items()):
        times = sorted(by_service.get(sid, []))
        svc_checks, gap_slack = check_service(d, times, t_end, world.tz, world.daily_quota, tol)
        checks += svc_checks
        if gap_slack is not None:
            gap_slacks.append(gap_slack)
        # The same timing checks without the service's first second of sending
        # (the start-up, see the module doc): what the steady state does.
        if times:
            later = [t for t in times if t >= times[0] + STARTUP_S]
            later_checks, later_slack = check_service(d, later, t_end, world.tz,
                                                      world.daily_quota, tol)
            steady_violations += sum(c.violations for c in later_checks
                                     if c.kind in ("interval", "rate"))
            if later_slack is not None:
                steady_slacks.append(later_slack)
            first_start[sid] = times[0]
        binding = min(svc_checks, key=lambda c: c.allowed)
        starts = sum(1 for t in times if t <= t_end)
        utilisation[d.name] = {
            "starts": starts, "allowed": binding.allowed, "binding_limit": binding.limit,
            "utilisation": starts / binding.allowed if binding.allowed else float("nan"),
            "first_start_s": round(times[0] - t_start, 3) if times else None,
            "period_s": round(t_end - times[0], 3) if times else 0.0,
        }
    violations = sum(c.violations for c in checks)

    # ---- slots (database) against server start times
    with psycopg.connect(dsn, autocommit=True) as conn:
        events = conn.execute(
            """
            SELECT st.email, e.attempt, e.kind, extract(epoch FROM e.started_at)::float8,
                   extract(epoch FROM e.occurred_at)::float8, e.dispatcher, e.service_id
            FROM edm.send_events e JOIN edm.subtasks st ON st.subtask_id = e.subtask_id
            WHERE e.kind IN ('sent', 'retry', 'failed', 'uncertain')
            ORDER BY st.email, e.attempt, e.occurred_at
            """).fetchall()
        kinds: dict[str, int] = dict(conn.execute(
            "SELECT kind, count(*) FROM edm.send_events GROUP BY 1").fetchall())
    attempts: dict[str, list[tuple[int, str, float, float, str, int]]] = defaultdict(list)
    for email, attempt, kind, started, occurred, dispatcher, sid in events:
        attempts[email].append((int(attempt), kind, started, occurred, dispatcher, sid))
    pairs: list[list[Any]] = []  # [service, server start, slot, send() called, dispatcher]
    lateness: list[float] = []
    steady_late: list[float] = []
    disp_late: list[float] = []  # slot -> handed to the transport (dispatcher)
    wire_delay: list[float] = []  # handed to the transport -> MAIL FROM read by the server
    first_conn: dict[tuple[str, int], tuple[float, float]] = {}
    unmatched_wire = unmatched_db = 0
    retry_late: list[float] = []
    retries_missing = 0
    for email, tries in attempts.items():
        txs = by_rcpt.get(email, [])
        if len(txs) != len(tries):
            unmatched_wire += max(0, len(txs) - len(tries))
            unmatched_db += max(0, len(tries) - len(txs))
        for i, (attempt, kind, started, occurred, dispatcher, sid) in enumerate(tries):
            if i < len(txs):
                at = txs[i][0]
                late = at - started
                lateness.append(late)
                if at >= first_start.get(txs[i][1], at) + STARTUP_S:
                    steady_late.append(late)
                calls = (traces or {}).get(email, [])
                if i < len(calls):
                    disp_late.append(calls[i] - started)
                    wire_delay.append(at - calls[i])
                pairs.append([world.services[txs[i][1]].name, at, started,
                              calls[i] if i < len(calls) else None, dispatcher])
                key = (dispatcher, sid)
                if key not in first_conn or at < first_conn[key][0]:
                    first_conn[key] = (at, late)
            if kind == "retry":
                due = occurred + min(world.retry_max, world.retry_base * 2 ** (attempt - 1))
                if due > t_end:
                    continue
                if i + 1 < len(txs):
                    retry_late.append(txs[i + 1][0] - due)
                else:
                    retries_missing += 1
                    retry_late.append(t_end - due)
    for email, txs in by_rcpt.items():
        if email not in attempts:
            unmatched_wire += len(txs)
    first = [late for _, late in first_conn.values()]
    if dump is not None:
        with open(dump, "w", encoding="utf-8") as f:
            for p in sorted(pairs, key=lambda p: float(p[1])):
                f.write(json.dumps(p) + "\n")

    slowest_interval = max(_slowest_gap(d) for d in world.services.values())
    util_min = min((u["utilisation"] for u in utilisation.values()), default=float("nan"))
    return {
        "limit_violations": violations,
        "violations_by_limit": {f"{c.service}/{c.limit}": c.violations for c in checks
                                if c.violations},
        "checks": [c.__dict__ for c in checks],
        "min_gap_slack_ms": (min(gap_slacks) * 1000) if gap_slacks else float("nan"),
        "slot_lateness_samples": len(lateness),
        "slot_lateness_p50_ms": common.percentile(lateness, 50) * 1000,
        "slot_lateness_p99_ms": common.percentile(lateness, 99) * 1000,
        "slot_lateness_max_ms": max(lateness, default=float("nan")) * 1000,
        "slot_lateness_min_ms": min(lateness, default=float("nan")) * 1000,
        "steady_limit_violations": steady_violations,
        "steady_min_gap_slack_ms": (min(steady_slacks) * 1000) if steady_slacks
        else float("nan"),
        "steady_slot_lateness_p99_ms": common.percentile(steady_late, 99) * 1000,
        "dispatcher_lateness_p50_ms": common.percentile(disp_late, 50) * 1000,
        "dispatcher_lateness_p99_ms": common.percentile(disp_late, 99) * 1000,
        "transport_to_server_p50_ms": common.percentile(wire_delay, 50) * 1000,
        "transport_to_server_p99_ms": common.percentile(wire_delay, 99) * 1000,
        "first_connection_lateness_max_ms": max(first, default=float("nan")) * 1000,
        "first_connection_lateness_ms": sorted(round(x * 1000, 1) for x in first),
        "binding_limit_utilisation": util_min,
        "utilisation_by_service": utilisation,
        "retries": len(retry_late),
        "retries_missing": retries_missing,
        "retry_lateness_p50_s": common.percentile(retry_late, 50),
        "retry_lateness_p99_s": common.percentile(retry_late, 99),
        "retry_lateness_max_s": max(retry_late, default=float("nan")),
        "retry_lateness_goal_s": slowest_interval + 1.0,
        "transactions": sum(len(v) for v in by_service.values()),
        "refused": sum(1 for r in wire if r.code != 250),
        "wire_without_mail_time": no_time, "wire_unknown_sender": unknown_sender,
        "unmatched_wire": unmatched_wire, "unmatched_db": unmatched_db,
        "event_kinds": kinds,
        "services": len(world.services), "users": cfg.users, "subtasks": cfg.subtasks,
        "dispatchers": cfg.dispatchers,
    }


def _slowest_gap(d: ServiceDef) -> float:
    """Seconds between two sends of the service at its steady pace (its tightest rate)."""
    gaps = [d.interval_ms / 1000] + [lim["window_ms"] / 1000 / lim["max_count"]
                                     for lim in d.limits if lim["kind"] == "rate"]
    return float(max(gaps))


# --------------------------------------------------------------------------- report


def print_report(result: dict[str, Any], tol_ms: float) -> None:
    common.print_table(
        f"Every limit, recomputed from the SMTP server's transaction starts (tolerance "
        f"{tol_ms:g} ms on times, none on counts)",
        ["service", "limit", "rule", "starts", "violations", "tightest", "allowed in period"],
        [[c["service"], c["limit"], c["rule"], c["starts"], c["violations"], c["worst"],
          c["allowed"]] for c in result["checks"]])
    common.print_table(
        "Saturation: starts in each service's saturated period / what its binding limit allowed",
        ["service", "binding limit", "first start s", "period s", "starts", "allowed",
         "utilisation %"],
        [[name, u["binding_limit"], u["first_start_s"], u["period_s"], u["starts"], u["allowed"],
          100 * u["utilisation"]] for name, u in result["utilisation_by_service"].items()])
    r = result
    common.print_table(
        "Figures (issue 14 point 5)",
        ["figure", "value", "goal"],
        [["limit_violations", r["limit_violations"], "0"],
         ["min_gap_slack_ms", r["min_gap_slack_ms"], ">= -5"],
         ["slot_lateness_p50_ms", r["slot_lateness_p50_ms"], ""],
         ["slot_lateness_p99_ms", r["slot_lateness_p99_ms"], "<= 20"],
         ["slot_lateness_max_ms", r["slot_lateness_max_ms"], ""],
         ["  of which: slot -> send() called, p50 / p99 ms",
          f"{r['dispatcher_lateness_p50_ms']:.1f} / {r['dispatcher_lateness_p99_ms']:.1f}", ""],
         ["  of which: send() -> server read MAIL FROM, p50 / p99 ms",
          f"{r['transport_to_server_p50_ms']:.1f} / {r['transport_to_server_p99_ms']:.1f}", ""],
         ["first_connection_lateness_max_ms", r["first_connection_lateness_max_ms"], ""],
         ["without each service's first second: interval and rate violations",
          r["steady_limit_violations"], ""],
         ["  min gap slack ms / slot lateness p99 ms",
          f"{r['steady_min_gap_slack_ms']:.1f} / {r['steady_slot_lateness_p99_ms']:.1f}", ""],
         ["binding_limit_utilisation", r["binding_limit_utilisation"], ">= 0.99"],
         ["retries (missing)", f"{r['retries']} ({r['retries_missing']})", ""],
         ["retry_lateness_p50_s", r["retry_lateness_p50_s"], ""],
         ["retry_lateness_p99_s", r["retry_lateness_p99_s"],
          f"<= {r['retry_lateness_goal_s']:g}"],
         ["retry_lateness_max_s", r["retry_lateness_max_s"], ""]],
        note=(f"{r['transactions']:,} transactions ({r['refused']} refused with 451), "
              f"{r['slot_lateness_samples']:,} paired with their slot; unmatched wire "
              f"{r['unmatched_wire']}, db {r['unmatched_db']}; {r['pending_at_stop']:,} "
              f"subtasks still pending at the stop (every service saturated throughout). "
              f"CPU pressure (PSI some avg60) at start / stop: "
              f"{' / '.join(str(x) for x in r['cpu_pressure_avg60_pct'])} %: the share of "
              f"time runnable tasks waited for a CPU"))


def add_args(p: argparse.ArgumentParser) -> None:
    d = LimitsConfig()
    p.add_argument("--seconds", type=float, default=d.seconds)
    p.add_argument("--dispatchers", type=int, default=d.dispatchers)
    p.add_argument("--users", type=int, default=d.users)
    p.add_argument("--subtasks", type=int, default=d.subtasks)
    p.add_argument("--retry-every", type=int, default=d.retry_every,
                   help="every n-th recipient is refused once with 451 (0: none)")
    p.add_argument("--fail-until", type=float, default=None,
                   help="refuse only in the first S seconds (default: seconds - 40)")
    p.add_argument("--concurrency", type=int, default=d.concurrency)
    p.add_argument("--tolerance-ms", type=float, default=d.tolerance_ms)
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep the dispatchers' logs and the server's log (wire.jsonl) here")


def main(argv: Sequence[str]) -> int:
    args = common.parse_args("limits", argv, DESCRIPTION, add_args)
    cfg = LimitsConfig(seconds=args.seconds, dispatchers=args.dispatchers, users=args.users,
                       subtasks=args.subtasks, retry_every=args.retry_every,
                       fail_until=args.fail_until, concurrency=args.concurrency,
                       tolerance_ms=args.tolerance_ms)
    t_run = time.perf_counter()
    result: dict[str, Any] = {"scenario": "limits"}
    with common.bench_server(args.dsn, keep=args.keep) as server:
        dsn = server.fresh_database("edm_bench_limits")
        scale = {"services": len(cfg.service_defs()), "users": cfg.users,
                 "subtasks": cfg.subtasks, "dispatchers": cfg.dispatchers,
                 "seconds": cfg.seconds, "retry every": cfg.retry_every}
        result.update(common.print_header("Limits on the wire", server, scale))
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
        result.update(run_scenario(dsn, cfg, args.workdir))
    print_report(result, cfg.tolerance_ms)
    result["run_seconds"] = time.perf_counter() - t_run
    print(f"\nlimits finished in {result['run_seconds']:.0f} s")
    common.finish(args, result)
    return 0 if result["limit_violations"] == 0 and not result["unclean_stops"] else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        sys.exit(worker_main(sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
