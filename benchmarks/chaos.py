"""S5 chaos: dispatchers killed with ``kill -9`` and a database crash, mid-send.

``python -m benchmarks chaos [--short] [--dsn DSN] [--json]``

Eight dispatcher processes (``run_dispatcher`` with an ``SmtpTransport``)
send 100,000 subtasks (``--short``: 10,000) through a real local SMTP sink
running as its own process (``python -m edm_sched.testing.smtp_sink``). Every few
seconds a random dispatcher is killed with SIGKILL and replaced by a new one
(a new dispatcher id). Once, when half of the subtasks are sent, PostgreSQL
itself is restarted in immediate mode (a crash: no checkpoint, WAL replay at
start) — only when the benchmark started the server (embedded); with
``--dsn`` that step is skipped with a note.

Services: a pool with intervals of 0, 2 and 5 ms and quotas that never bind
(so the run ends in minutes), plus two with real intervals (50 and 100 ms)
and small daily quotas that run out during the run, so that I2 and I3 are
exercised. Every service's quota day is in a fixed-offset zone where it is
about noon, so no quota day rolls over during a run.

Afterwards, from the sink's log and the database (never from counters kept
by the harness):

* ``lost``: subtasks neither sent nor in a documented terminal state (failed
  after the last allowed attempt ended in an expired lease), plus subtasks the
  database calls sent that never reached the sink;
* ``duplicates``: extra deliveries of one Message-ID; ``unrecorded_duplicates``:
  deliveries of a subtask beyond 1 + its recorded ``lease_expired`` events
  (I1 allows a resend only after a recorded lease expiry);
* ``interval_violations``: claims on one service closer than its interval
  (``edm.send_events.started_at``), plus arrivals at the sink more than
  ``--wire-tolerance`` seconds ahead of "one per interval" (a token bucket
  of that depth: the claim-to-arrival delay varies, see tests/chaos/test_multiprocess.py);
* ``quota_violations``: service quota days with more claims (database) or
  deliveries (sink) than the daily quota, plus users above their quota;
* ``counter_mismatches``: tasks whose counters differ from their subtasks (I4).

Dispatchers run with 10 s leases and ``sweep.interval`` = 1 s. A dispatcher
that exits without being killed is reported (``unexpected_exits``, with the
end of its log) and replaced: a robustness bug, not a broken promise.

The process exits 1 when any of those counts is not 0 or the run timed out.
``python -m benchmarks.chaos worker ...`` is the dispatcher process the
scenario starts.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import psycopg
from psycopg import conninfo

from benchmarks import common
from edm_sched.api import Scheduler
from edm_sched.testing.smtp_sink import read_log

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTED_FAILURE = "lease expired on the last allowed attempt%"
QUOTA_KINDS_EXCLUDED = ("service_failure", "released", "late_completion")  # refunded / no claim


@dataclass
class ChaosConfig:
    subtasks: int = 100_000
    dispatchers: int = 8
    users: int = 20
    tasks_per_user: int = 2
    pool_services: int = 24  # intervals cycle through POOL_INTERVALS_MS, quotas never bind
    # (interval ms, daily quota); None: 50 and 100 ms with quotas that run out mid-run
    capped_services: list[tuple[int, int]] | None = None
    concurrency: int = 16
    lease_seconds: int = 10
    sweep_interval: int = 1
    kill_every: float = 4.0  # mean seconds between two kills (uniform in [0.5, 1.5] x)
    max_kills: int | None = None
    db_restart: bool = True
    db_restart_at: float = 0.5  # share of subtasks sent when PostgreSQL is restarted
    wire_tolerance: float = 0.5  # seconds (see the module doc)
    timeout: float = 1200.0
    seed: int = 1


POOL_INTERVALS_MS = (0, 2, 5)
POOL_QUOTA = 1_000_000  # per day: never binds in a run


def capped_services(cfg: ChaosConfig) -> list[tuple[int, int]]:
    """The services with real intervals and small quotas: (interval ms, daily quota).

    The claim prefers the service with the lowest used share of its quota, so
    these are used only when the pool cannot fill a batch: about one claim in
    a hundred. Their quotas are sized to run out about a third of the way in.
    """
    if cfg.capped_services is not None:
        return cfg.capped_services
    return [(50, max(5, cfg.subtasks // 300)), (100, max(5, cfg.subtasks // 400))]


def full_config() -> ChaosConfig:
    return ChaosConfig()


def short_config() -> ChaosConfig:
    return ChaosConfig(subtasks=10_000, kill_every=3.0, timeout=300.0)


# --------------------------------------------------------------------------- processes


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def start_sink(log_path: Path) -> tuple[subprocess.Popen[str], int]:
    """``python -m edm_sched.testing.smtp_sink`` as its own process; returns it and its port."""
    proc = subprocess.Popen([sys.executable, "-m", "edm_sched.testing.smtp_sink", "--port", "0",
                             "--log", str(log_path)],
                            cwd=ROOT, env=_child_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        raise RuntimeError(f"the SMTP sink did not start (said {line!r})")
    return proc, int(line)


@dataclass
class Dispatcher:
    slot: int
    dispatcher_id: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]
    started: float


def start_dispatcher(dsn: str, slot: int, generation: int, cfg: ChaosConfig,
                     workdir: Path) -> Dispatcher:
    did = f"chaos-{slot}-{generation}"
    log_path = workdir / f"{did}.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed when the process is reaped
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.chaos", "worker", "--dsn", dsn, "--id", did,
         "--concurrency", str(cfg.concurrency), "--lease", str(cfg.lease_seconds)],
        cwd=ROOT, env=_child_env(), stdin=subprocess.DEVNULL, stdout=log,
        stderr=subprocess.STDOUT)
    return Dispatcher(slot, did, proc, log_path, log, time.monotonic())


def worker_main(argv: Sequence[str]) -> int:
    """One dispatcher process: ``python -m benchmarks.chaos worker --dsn DSN --id ID ...``."""
    import logging

    from edm_sched.dispatcher import run_dispatcher
    from edm_sched.transports.smtp import SmtpTransport

    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos worker")
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--lease", type=int, default=10)
    args = parser.parse_args(list(argv))
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s {args.id} %(levelname)s %(name)s %(message)s")
    dsn = conninfo.make_conninfo(args.dsn, application_name=args.id[:63])
    stats = run_dispatcher(dsn, SmtpTransport(timeout=10.0), dispatcher_id=args.id,
                           concurrency=args.concurrency, lease_seconds=args.lease,
                           handle_signals=True)
    print(f"{args.id} stopped: claimed={stats.claimed} sent={stats.sent} "
          f"rejected={stats.rejected} reconnects={stats.reconnects}", file=sys.stderr)
    return 0


def _log_tail(path: Path, lines: int = 3) -> str:
    with contextlib.suppress(OSError):
        text = path.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])
    return ""


# ---------------------------------------------------------------------- the database


def midday_tz() -> str:
    """A fixed-offset zone where it is about noon now: no quota day rolls over mid-run."""
    offset = 12 - dt.datetime.now(dt.UTC).hour
    return "UTC" if offset == 0 else f"Etc/GMT{-offset:+d}"


def restart_embedded(server: common.BenchServer) -> float:
    """``pg_ctl -m immediate restart`` of the embedded server; seconds until it answers again."""
    import pgserver

    pg = server.embedded
    data = Path(server.data_dir or pg.data_dir)
    pg_ctl = Path(pgserver.__file__).parent / "pginstall" / "bin" / "pg_ctl"
    # As root, pgserver runs the server as its own system user: so must pg_ctl.
    user = getattr(pg._server, "system_user", None)
    started = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        # -l: the new postmaster writes to the server log, not to our pipes (pg_ctl could
        # otherwise hang waiting for them to close).
        done = subprocess.run([str(pg_ctl), "-D", str(data), "-m", "immediate", "-w",
                               "-t", "120", "-l", str(data / "log"), "restart"],
                              user=user, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=err, timeout=180, check=False)
        if done.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"pg_ctl restart failed: {err.read().decode(errors='replace')}")
    while True:
        try:
            with psycopg.connect(server.admin_dsn, autocommit=True, connect_timeout=2) as c:
                c.execute("SELECT 1")
            break
        except psycopg.OperationalError:
            if time.perf_counter() - started > 120:
                raise
            time.sleep(0.05)
    # pgserver stops "its" postmaster at exit: point it at the new one.
    with contextlib.suppress(Exception):
        from pgserver.utils import PostmasterInfo

        pg._server._postmaster_info = PostmasterInfo.read_from_pgdata(data)
    return time.perf_counter() - started


def build_world(dsn: str, cfg: ChaosConfig, port: int) -> dict[int, tuple[str, int, int]]:
    """Users, services and tasks; returns {service_id: (name, interval_ms, daily_quota)}."""
    tz = midday_tz()
    n_tasks = cfg.users * cfg.tasks_per_user
    sizes = [cfg.subtasks // n_tasks + (1 if i < cfg.subtasks % n_tasks else 0)
             for i in range(n_tasks)]
    users = [f"user-{u:03d}" for u in range(cfg.users)]
    services: dict[int, tuple[str, int, int]] = {}
    settings = {"host": "127.0.0.1", "port": port, "security": "none", "timeout": 10}
    specs = [(f"pool-{i:02d}", POOL_INTERVALS_MS[i % len(POOL_INTERVALS_MS)], POOL_QUOTA)
             for i in range(cfg.pool_services)]
    specs += [(f"capped-{ms}ms", ms, quota) for ms, quota in capped_services(cfg)]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE edm.config SET value = %s WHERE key = 'sweep.interval'",
                     (json.dumps(cfg.sweep_interval),))
    with Scheduler(dsn) as s:
        for i, user in enumerate(users):
            per_user = sum(sizes[i * cfg.tasks_per_user:(i + 1) * cfg.tasks_per_user])
            s.upsert_user(user, quota_limit=per_user)  # the user quota binds exactly
        for name, interval_ms, quota in specs:
            sid = s.create_service({
                "name": name, "from_addresses": [f"{name}@sender.example"],
                "interval_seconds": interval_ms / 1000, "daily_quota": quota,
                "transport": "smtp", "quota_tz": tz, "settings": settings})
            services[sid] = (name, interval_ms, quota)
            for user in users:
                s.grant(sid, user)
        for i, n in enumerate(sizes):
            user = users[i // cfg.tasks_per_user]
            name = f"campaign-{i % cfg.tasks_per_user}"
            s.create_task({
                "user_id": user, "name": name,
                "templates": [{"subject": f"{name} for {user}",
                               "body_text": "Hello,\n\nthis is a chaos run.\n"}],
                "recipients": [{"email": f"{user}-{name}-{k}@rcpt.example"} for k in range(n)],
            })
    return services


def _progress(conn: psycopg.Connection[Any]) -> tuple[int, int, int]:
    """(finished subtasks, leased, tasks not yet finished)."""
    row = conn.execute("""
        SELECT coalesce(sum(sent_count + failed_count + cancelled_count), 0),
               coalesce(sum(leased_count), 0),
               count(*) FILTER (WHERE status NOT IN ('completed', 'cancelled', 'failed'))
        FROM edm.tasks""").fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


# ------------------------------------------------------------------------ the run


def run_scenario(dsn: str, cfg: ChaosConfig, workdir: Path,
                 restart: Callable[[], float] | None = None) -> dict[str, Any]:
    """Run the chaos scenario on migrated database ``dsn``; returns the figures."""
    rng = random.Random(cfg.seed)
    sink_log = workdir / "sink.jsonl"
    sink, port = start_sink(sink_log)
    fleet: dict[int, Dispatcher] = {}
    kills: list[dict[str, Any]] = []
    unexpected: list[dict[str, Any]] = []
    db_restarts: list[float] = []
    generation = 0
    t_start = time.monotonic()
    try:
        common.say(f"building {cfg.subtasks:,} subtasks for {cfg.users} users")
        services = build_world(dsn, cfg, port)
        common.say(f"starting {cfg.dispatchers} dispatchers and the chaos")
        t_start = time.monotonic()
        for slot in range(cfg.dispatchers):
            fleet[slot] = start_dispatcher(dsn, slot, generation, cfg, workdir)
        next_kill = t_start + cfg.kill_every * rng.uniform(0.5, 1.5)
        next_report = t_start + 5
        restart_pending = restart is not None and cfg.db_restart
        timed_out = False
        conn: psycopg.Connection[Any] | None = None
        while True:
            now = time.monotonic()
            if now - t_start > cfg.timeout:
                timed_out = True
                break
            try:
                if conn is None or conn.closed or conn.broken:
                    conn = psycopg.connect(dsn, autocommit=True, connect_timeout=5)
                finished, leased, open_tasks = _progress(conn)
            except psycopg.OperationalError:
                conn = None
                time.sleep(0.2)
                continue
            if open_tasks == 0:
                break
            # Dispatchers that ended on their own are a finding: record, then replace.
            for slot, d in list(fleet.items()):
                code = d.proc.poll()
                if code is not None:
                    d.log.close()
                    unexpected.append({"dispatcher": d.dispatcher_id, "code": code,
                                       "after_s": round(now - t_start, 1),
                                       "log": _log_tail(d.log_path, 12)})
                    common.say(f"dispatcher {d.dispatcher_id} exited by itself ({code}): "
                               f"{_log_tail(d.log_path, 1)}")
                    generation += 1
                    fleet[slot] = start_dispatcher(dsn, slot, generation, cfg, workdir)
            if now >= next_kill and (cfg.max_kills is None or len(kills) < cfg.max_kills):
                slot = rng.choice(sorted(fleet))
                victim = fleet[slot]
                victim.proc.send_signal(signal.SIGKILL)
                victim.proc.wait(30)
                victim.log.close()
                kills.append({"dispatcher": victim.dispatcher_id,
                              "at_s": round(now - t_start, 2),
                              "lived_s": round(now - victim.started, 2)})
                generation += 1
                fleet[slot] = start_dispatcher(dsn, slot, generation, cfg, workdir)
                next_kill = now + cfg.kill_every * rng.uniform(0.5, 1.5)
            if restart_pending and restart is not None and \
                    finished >= cfg.db_restart_at * cfg.subtasks:
                restart_pending = False
                common.say(f"restarting PostgreSQL in immediate mode ({finished:,} finished)")
                if conn is not None:
                    conn.close()
                conn = None
                downtime = restart()
                db_restarts.append(round(downtime, 2))
                common.say(f"PostgreSQL answers again after {downtime:.1f} s")
                continue
            if now >= next_report:
                common.say(f"{finished:,}/{cfg.subtasks:,} finished, {leased} leased, "
                           f"{len(kills)} kills, {len(unexpected)} unexpected exits")
                next_report = now + 5
            time.sleep(0.1)
        seconds = time.monotonic() - t_start
        if conn is not None:
            conn.close()
    finally:
        codes: dict[str, int | None] = {}
        for d in fleet.values():
            if d.proc.poll() is None:
                d.proc.send_signal(signal.SIGTERM)
        for d in fleet.values():
            try:
                codes[d.dispatcher_id] = d.proc.wait(60)
            except subprocess.TimeoutExpired:
                d.proc.kill()
                codes[d.dispatcher_id] = d.proc.wait(10)
            d.log.close()
        sink.send_signal(signal.SIGTERM)
        try:
            sink.wait(30)
        except subprocess.TimeoutExpired:
            sink.kill()
            sink.wait(10)
        if sink.stdout is not None:
            sink.stdout.close()
    common.say("checking the promises against the sink's log and the database")
    result = analyse(dsn, services, read_log(sink_log), cfg.wire_tolerance)
    result.update({
        "kills": len(kills),
        "dispatchers": cfg.dispatchers,
        "dispatcher_starts": cfg.dispatchers + generation,
        "unexpected_exits": len(unexpected),
        "unclean_stops": sum(1 for c in codes.values() if c != 0),
        "db_restarts": len(db_restarts),
        "db_restart_seconds": db_restarts,
        "timed_out": timed_out,
        "seconds": round(seconds, 1),
        "subtasks_per_second": round(result["sent"] / seconds, 1) if seconds > 0 else None,
        "kill_log": kills,
        "unexpected_exit_log": unexpected[:20],
    })
    return result


# ---------------------------------------------------------------------- the checks


COUNTERS_SQL = """
    SELECT count(*) FROM edm.tasks t
    LEFT JOIN LATERAL (
      SELECT count(*) FILTER (WHERE status = 'pending') AS p,
             count(*) FILTER (WHERE status = 'leased') AS l,
             count(*) FILTER (WHERE status = 'sent') AS s,
             count(*) FILTER (WHERE status = 'failed') AS f,
             count(*) FILTER (WHERE status = 'cancelled') AS x
      FROM edm.subtasks st WHERE st.task_id = t.task_id) c ON true
    WHERE (t.pending_count, t.leased_count, t.sent_count, t.failed_count, t.cancelled_count)
          IS DISTINCT FROM (c.p, c.l, c.s, c.f, c.x)"""

INTERVAL_SQL = """
    SELECT x.service_id, count(*) FILTER (WHERE x.gap < x.interval_ms * interval '1 ms'),
           min(x.gap)
    FROM (SELECT e.service_id, s.interval_ms,
                 e.started_at - lag(e.started_at) OVER (PARTITION BY e.service_id
                                                        ORDER BY e.started_at) AS gap
          FROM edm.send_events e JOIN edm.services s ON s.service_id = e.service_id
          WHERE e.kind <> 'late_completion') x
    GROUP BY x.service_id"""

QUOTA_SQL = """
    SELECT e.service_id, (e.started_at AT TIME ZONE s.quota_tz)::date AS day, count(*),
           s.daily_quota
    FROM edm.send_events e JOIN edm.services s ON s.service_id = e.service_id
    WHERE e.kind <> ALL (%s)
    GROUP BY 1, 2, 4"""


def wire_lag_violations(times: list[float], interval: float, tolerance: float) -> tuple[int, float]:
    """Arrivals more than ``tolerance`` s ahead of one-per-``interval``; and the largest lag.

    For sorted arrivals t, arrival l is ahead by max over j < l of
    ``(l - j) * interval - (t[l] - t[j])``: a token bucket of depth ``tolerance``.
    """
    ts = sorted(times)
    if len(ts) < 2 or interval <= 0:
        return 0, 0.0
    violations = 0
    worst = 0.0
    peak = ts[0]
    for i, t in enumerate(ts[1:], start=1):
        u = t - i * interval
        lag = peak - u
        worst = max(worst, lag)
        if lag > tolerance:
            violations += 1
        peak = max(peak, u)
    return violations, worst


def _subtask_of(message_id: str | None) -> int | None:
    """Subtask id of "<edm.TASK.SUBTASK@domain>", None for anything else."""
    if not message_id or not message_id.startswith("<edm."):
        return None
    try:
        return int(message_id[5:].split("@", 1)[0].split(".")[1])
    except (IndexError, ValueError):
        return None


def analyse(dsn: str, services: dict[int, tuple[str, int, int]], received: list[Any],
            wire_tolerance: float) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        states = dict(conn.execute(
            "SELECT status, count(*) FROM edm.subtasks GROUP BY 1").fetchall())
        total = sum(states.values())
        documented_failed = conn.execute(
            "SELECT count(*) FROM edm.subtasks WHERE status = 'failed' AND outcome_detail LIKE %s",
            (DOCUMENTED_FAILURE,)).fetchone()
        sent_ids = {r[0] for r in conn.execute(
            "SELECT subtask_id FROM edm.subtasks WHERE status = 'sent'").fetchall()}
        expiries = dict(conn.execute(
            "SELECT subtask_id, count(*) FROM edm.send_events WHERE kind = 'lease_expired'"
            " GROUP BY 1").fetchall())
        kinds = dict(conn.execute(
            "SELECT kind, count(*) FROM edm.send_events GROUP BY 1").fetchall())
        interval_rows = conn.execute(INTERVAL_SQL).fetchall()
        quota_rows = conn.execute(QUOTA_SQL, (list(QUOTA_KINDS_EXCLUDED),)).fetchall()
        over_today = conn.execute(
            "SELECT count(*) FROM edm.services WHERE sent_today > daily_quota").fetchone()
        users_over = conn.execute(
            "SELECT count(*) FROM edm.users WHERE quota_used > quota_limit").fetchone()
        counters = conn.execute(COUNTERS_SQL).fetchone()
        service_state = {sid: (sent_today, exhausted) for sid, sent_today, exhausted in
                         conn.execute("SELECT service_id, sent_today,"
                                      " coalesce(quota_exhausted_until > now(), false)"
                                      " FROM edm.services").fetchall()}
    deliveries: Counter[int] = Counter()
    unknown = 0
    by_service: dict[int, list[float]] = defaultdict(list)
    for r in received:
        sid = _subtask_of(r.message_id)
        if sid is None:
            unknown += 1
            continue
        deliveries[sid] += 1
        with contextlib.suppress(TypeError, ValueError):
            by_service[int(r.service)].append(r.received_at)
    duplicates = sum(n - 1 for n in deliveries.values() if n > 1)
    unrecorded = sum(max(0, n - 1 - expiries.get(sid, 0)) for sid, n in deliveries.items())
    not_delivered = len(sent_ids - set(deliveries))
    finished_ok = states.get("sent", 0) + int(documented_failed[0] if documented_failed else 0)
    lost = total - finished_ok + not_delivered

    db_interval = {sid: (int(n), gap) for sid, n, gap in interval_rows}
    per_service = []
    wire_violations = 0
    for sid, (name, interval_ms, quota) in sorted(services.items()):
        n_wire, lag = wire_lag_violations(by_service.get(sid, []), interval_ms / 1000,
                                          wire_tolerance)
        wire_violations += n_wire
        db_n, min_gap = db_interval.get(sid, (0, None))
        per_service.append({
            "service": name, "interval_ms": interval_ms,
            "daily_quota": quota if quota < POOL_QUOTA else None,
            "deliveries": len(by_service.get(sid, [])),
            "sent_today": service_state.get(sid, (0, False))[0],
            "quota_exhausted": service_state.get(sid, (0, False))[1],
            "min_claim_gap_ms": None if min_gap is None else round(
                min_gap.total_seconds() * 1000, 2),
            "db_interval_violations": db_n,
            "wire_lag_ms": round(lag * 1000, 1), "wire_violations": n_wire})
    db_interval_violations = sum(n for n, _ in db_interval.values())
    quota_days_over = sum(1 for _, _, n, quota in quota_rows if n > quota)
    wire_over = sum(1 for sid, (_, _, quota) in services.items()
                    if len(by_service.get(sid, [])) > quota)
    quota_bound = sum(1 for sid, (_, _, quota) in services.items()
                      if quota < POOL_QUOTA and service_state.get(sid, (0, False))[0] == quota)
    quota_violations = (quota_days_over + wire_over + int(over_today[0] if over_today else 0)
                        + int(users_over[0] if users_over else 0))
    return {
        "subtasks": total,
        "sent": states.get("sent", 0),
        "states": states,
        "documented_failures": int(documented_failed[0] if documented_failed else 0),
        "lost": lost,
        "sent_not_delivered": not_delivered,
        "deliveries": len(received),
        "unknown_deliveries": unknown,
        "duplicates": duplicates,
        "recorded_lease_expiries": int(kinds.get("lease_expired", 0)),
        "unrecorded_duplicates": unrecorded,
        "late_completions": int(kinds.get("late_completion", 0)),
        "interval_violations": db_interval_violations + wire_violations,
        "interval_violations_db": db_interval_violations,
        "interval_violations_wire": wire_violations,
        "quota_violations": quota_violations,
        "counter_mismatches": int(counters[0] if counters else 0),
        "capped_services": sum(1 for _, _, quota in services.values() if quota < POOL_QUOTA),
        "capped_services_exhausted": quota_bound,
        "event_kinds": kinds,
        "per_service": per_service,
    }


def ok(result: dict[str, Any]) -> bool:
    return not result["timed_out"] and all(result[k] == 0 for k in (
        "lost", "unrecorded_duplicates", "interval_violations", "quota_violations",
        "counter_mismatches", "unknown_deliveries"))


# ------------------------------------------------------------------------- output


def print_report(result: dict[str, Any], cfg: ChaosConfig, restart_note: str | None) -> None:
    common.print_table("run", ["figure", "value"], [
        ["subtasks", result["subtasks"]],
        ["dispatchers (at a time)", cfg.dispatchers],
        ["kill -9", result["kills"]],
        ["dispatcher processes started", result["dispatcher_starts"]],
        ["dispatchers that exited by themselves", result["unexpected_exits"]],
        ["PostgreSQL immediate restarts", result["db_restarts"]],
        ["  seconds until it answered again", ", ".join(
            f"{s:.1f}" for s in result["db_restart_seconds"]) or "-"],
        ["seconds", result["seconds"]],
        ["subtasks sent per second", result["subtasks_per_second"]],
        ["timed out", result["timed_out"]],
    ], note=restart_note)
    common.print_table("promises (from the sink's log and the database)", ["check", "count"], [
        ["lost (not sent, no documented terminal state)", result["lost"]],
        ["  of which sent in the database, never delivered", result["sent_not_delivered"]],
        ["failed after the last attempt's lease expired", result["documented_failures"]],
        ["deliveries at the sink", result["deliveries"]],
        ["duplicate deliveries (same Message-ID)", result["duplicates"]],
        ["recorded lease expiries", result["recorded_lease_expiries"]],
        ["unrecorded duplicates (I1)", result["unrecorded_duplicates"]],
        ["late completions (rejected by the lease fence)", result["late_completions"]],
        ["interval violations, claims (I2)", result["interval_violations_db"]],
        ["interval violations, sink (I2)", result["interval_violations_wire"]],
        ["quota violations (I3)", result["quota_violations"]],
        ["  small-quota services that used their whole quota",
         f"{result['capped_services_exhausted']}/{result['capped_services']}"],
        ["counter mismatches (I4)", result["counter_mismatches"]],
    ], note=f"sink check: token bucket of depth {cfg.wire_tolerance} s per service")
    common.print_table("services", ["service", "interval ms", "daily quota", "deliveries",
                                    "sent today", "exhausted", "min claim gap ms",
                                    "violations (db)", "sink lag ms", "violations (sink)"],
                       [[s["service"], s["interval_ms"], s["daily_quota"], s["deliveries"],
                         s["sent_today"], s["quota_exhausted"], s["min_claim_gap_ms"],
                         s["db_interval_violations"], s["wire_lag_ms"], s["wire_violations"]]
                        for s in result["per_service"]])
    if result["unexpected_exit_log"]:
        print("\ndispatchers that exited by themselves (last log lines):")
        for u in result["unexpected_exit_log"]:
            print(f"  {u['dispatcher']} code {u['code']} after {u['after_s']} s: "
                  f"{u['log'][-600:]}")
    if result["unexpected_exits"]:
        print(f"\nwarning: {result['unexpected_exits']} dispatcher(s) exited without being "
              "killed (a robustness bug, not a broken promise); the harness replaced them")
    print("\n" + ("all promises held" if ok(result) else "PROMISES BROKEN (see above)"))


def _extra_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--short", action="store_true", help="10,000 subtasks instead of 100,000")
    parser.add_argument("--subtasks", type=int, default=None)
    parser.add_argument("--dispatchers", type=int, default=None)
    parser.add_argument("--kills", type=int, default=None, help="stop killing after this many")
    parser.add_argument("--kill-every", type=float, default=None,
                        help="mean seconds between kills")
    parser.add_argument("--lease", type=int, default=None, help="lease seconds of dispatchers")
    parser.add_argument("--no-db-restart", action="store_true")
    parser.add_argument("--wire-tolerance", type=float, default=None,
                        help="seconds of claim-to-arrival jitter allowed at the sink (0.5)")
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--database", default="bench_chaos",
                        help="name of the database created for the run (default bench_chaos)")


def main(argv: Sequence[str]) -> int:
    args = common.parse_args("chaos", argv, "S5: kill -9 of dispatchers and a PostgreSQL "
                             "crash while sending through a real SMTP sink", _extra_args)
    cfg = short_config() if args.short else full_config()
    for name in ("subtasks", "dispatchers", "timeout", "seed", "kill_every", "wire_tolerance"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.kills is not None:
        cfg.max_kills = args.kills
    if args.lease is not None:
        cfg.lease_seconds = args.lease
    if args.no_db_restart:
        cfg.db_restart = False
    cfg.capped_services = capped_services(cfg)
    with common.bench_server(args.dsn, keep=args.keep) as server, \
            tempfile.TemporaryDirectory(prefix="edm-chaos-") as tmp:
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
        header = common.print_header("S5 chaos: kill -9 and a database crash", server, {
            "subtasks": cfg.subtasks, "dispatchers": cfg.dispatchers,
            "services": cfg.pool_services + len(capped_services(cfg)),
            "users": cfg.users, "tasks": cfg.users * cfg.tasks_per_user,
            "lease_s": cfg.lease_seconds, "sweep_interval_s": cfg.sweep_interval,
            "kill_every_s": cfg.kill_every})
        result = run_scenario(dsn, cfg, Path(tmp), restart)
        if args.keep:
            kept = Path(tempfile.mkdtemp(prefix="edm-chaos-logs-"))
            for f in Path(tmp).iterdir():
                with contextlib.suppress(OSError):
                    (kept / f.name).write_bytes(f.read_bytes())
            common.say(f"logs kept in {kept}")
    print_report(result, cfg, note)
    result.update({k: v for k, v in header.items() if k != "scale"})
    result["config"] = asdict(cfg)
    result["db_restart_skipped"] = note
    result["ok"] = ok(result)
    common.finish(args, result)
    return 0 if ok(result) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        raise SystemExit(worker_main(sys.argv[2:]))
    raise SystemExit(main(sys.argv[1:]))
