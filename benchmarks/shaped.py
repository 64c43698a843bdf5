"""Traffic shaping on the wire: sites, layered limits, a throttling site, a transactional lane.

``python -m benchmarks shaped [--seconds 45] [--throttle-at 12] [--scale 0.1] [--json]``

Two parts, each in its own fresh database.

**On the wire** (issue 15 point 6). Three sending services (each 40 per
second, burst 4) send through one local SMTP server
(:class:`edm_sched.testing.smtp_sink.SmtpSink`, in this process) from two
dispatcher processes (``python -m benchmarks.limits worker``: ``run_dispatcher``
with the real ``SmtpTransport``). Six bulk users, one campaign each, have
recipients spread over five destinations: gmail.com (site ``google``),
outlook.com (``microsoft``), yahoo.com (``yahoo``), icloud.com (``apple``) and
an unmapped domain. Every layer of shaping is set:

* global: 90 per second, burst 10 (below the services' 120);
* site ``google`` across all services: 25 per second, burst 8;
* (``svc-a``, ``yahoo``): 4 per second, burst 3;
* user ``u0``: at most N in any hour (a plan's limit; binds mid-run);
* user ``u1``: 6 per second, burst 4;
* the campaign of ``u2``: 3 per second, burst 3.

Limits shared by several services (global, a site, a user) are paced by the
claim's slots only: a lane paces its own service on the wire (see
``benchmarks/limits.py``), and two services may be held by two processes. A
burst absorbs the wire's lateness for them, as docs/explanation/traffic-shaping.md
advises: each is given a tolerance ((burst - 1) * window / max_count) of at least
280 ms, which covers the dispatchers' start-up (with 2 to 3 of burst, 170-330 ms,
the first sends of a run broke the user and task limits once each, by 5-12 ms).

From ``--throttle-at`` seconds on, the server answers every RCPT to
outlook.com with Microsoft's ``451 4.7.650 ... temporarily rate limited``;
the shipped reply rules suspend that (service, site) pair, escalating. All the
while a host submits a transactional message every 250 ms (user ``tx``, a
one-recipient task marked transactional) into the full bulk backlog, from the
moment bulk mail reaches the server (the dispatchers are up).

The same world runs twice: with the throttling site, and without it (the
control run). Figures, from the server's own timestamps (``mail_from_at``:
when it read MAIL FROM, the start a provider's limiter sees; every
transaction counts, refused ones too):

* ``limit_violations``: every limit of every layer (service, global, site,
  (service, site), user, task) recomputed from the server's log of the
  throttled run: a rate limit by GCRA with the same 5 ms tolerance on times
  as ``python -m benchmarks limits``; a window limit by counting, no
  tolerance. Goal 0.
* ``unthrottled_sites_throughput_ratio``: transactions accepted for the other
  destinations from the throttle's start to the stop, throttled run / control
  run. Goal >= 0.95 (a throttled site must not hold back the others: no
  head-of-line blocking).
* ``transactional_p99_s``: submission (before the host's call) to the server's
  receipt of the message (end of DATA), p99 over the throttled run. Goal <= 1.0.

**Claim cost** (``claim_cost_ratio_vs_s3``). The S3 world of
``python -m benchmarks s3`` (``--scale``), its recipients spread over the same
five destinations, built once and copied: the unshaped world, and the shaped
one with every layer configured (global, site and (service, site) limits,
limits on a tenth of the users and of the tasks, suspensions on a tenth of the
services, one task in a hundred transactional). Limits are loose enough not to
bind, so the figure is the machinery's cost. The claim's database time per
claimed subtask, shaped / unshaped. Goal <= 1.5. Two methods
(``--cost-method``):

* ``paired`` (the default): one raw SQL worker claims and completes (batch
  50) in the two worlds in turn, call by call, for ``--cost-seconds`` x
  ``--cost-rounds`` x 2. Both worlds drain at the same pace, so their dead
  index entries and finished tasks, which make every claim slower as a run
  goes on, weigh the same on both. The figure is the claim calls' whole time
  over the subtasks they claimed, in each world. (Until session 6 it was the
  ratio of the median calls. A call's time has two modes, before and after
  the dedicated services' users run out of work about half way, 9 and 17 ms
  unshaped; the median fell between them or in either, so identical runs gave
  1.43 and 1.82. The ratio of the medians is still printed,
  ``claim_cost_ratio_median``.)
* ``windows`` (the measurement of the first runs): one database, alternating
  windows of ``--cost-seconds``, unshaped then shaped, ``--cost-rounds`` each;
  the medians are over windows. A window's claims got up to 3 times slower
  than the first window's as the world drained, and the shaped window of each
  round always ran second, so the figure drifted with the order.

The process exits 1 when ``limit_violations`` is not 0.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from benchmarks import common, suite
from benchmarks.chaos import _log_tail, midday_tz
from benchmarks.limits import LimitsConfig, gcra_check, start_dispatcher, window_check
from edm_sched.api import Scheduler
from edm_sched.dispatcher import slots_per_service
from edm_sched.testing import worlds as data
from edm_sched.testing.smtp_sink import Received, SmtpSink

DESCRIPTION = "Sites, layered limits, a throttling site and a transactional lane on the wire"

DOMAINS = {"gmail.com": "google", "outlook.com": "microsoft", "yahoo.com": "yahoo",
           "icloud.com": "apple", "rcpt.example": None}
THROTTLED_DOMAIN = "outlook.com"
THROTTLE_REPLY = (451, "4.7.650 The mail server [192.0.2.1] has been temporarily rate limited "
                       "due to IP reputation.")
SERVICES = ("svc-a", "svc-b", "svc-c")
SERVICE_RATE = {"name": "per_second", "kind": "rate", "max_count": 40, "window_ms": 1000,
                "burst": 4}
BULK_USERS = ("u0", "u1", "u2", "u3", "u4", "u5")
TX_USER = "tx"
TX_EVERY_S = 0.25


@dataclass
class Layer:
    """One limit of one layer, and which wire transactions it counts."""

    layer: str  # service, global, site, service_site, user, task
    scope: str  # e.g. "svc-a", "google", "svc-a/yahoo", "u0"
    limit: dict[str, Any]
    counts: Callable[[Received], bool]


@dataclass
class WireConfig:
    seconds: float = 45.0
    throttle_at: float = 12.0
    dispatchers: int = 2
    per_user: int = 6_000
    concurrency: int = 10
    tolerance_ms: float = 5.0
    u0_hourly: int = 250


@dataclass
class WireWorld:
    senders: dict[str, str]  # envelope sender -> service name
    layers: list[Layer] = field(default_factory=list)


def _domain(rcpt: str) -> str:
    return rcpt.rsplit("@", 1)[-1].lower()


def _sent_by(sender: str) -> Callable[[Received], bool]:
    return lambda r: r.sender == sender


def _user(rcpt: str) -> str:
    return rcpt.split(".", 1)[0]


def build_wire_world(dsn: str, cfg: WireConfig, port: int) -> WireWorld:
    tz = midday_tz()
    settings = {"host": "127.0.0.1", "port": port, "security": "none", "timeout": 10}
    senders: dict[str, str] = {}
    sids: dict[str, int] = {}
    tasks: dict[str, int] = {}
    domains = list(DOMAINS)
    with Scheduler(dsn) as s:
        for user in (*BULK_USERS, TX_USER):
            s.upsert_user(user)
        for name in SERVICES:
            sender = f"{name}@sender.example"
            sid = s.create_service({
                "name": name, "from_addresses": [sender], "interval_seconds": 0,
                "daily_quota": 1_000_000, "transport": "smtp", "quota_tz": tz,
                "settings": settings})
            sids[name] = sid
            senders[sender] = name
            for user in (*BULK_USERS, TX_USER):
                s.grant(sid, user)
        for user in BULK_USERS:
            tasks[user] = s.create_task({
                "user_id": user, "name": f"newsletter of {user}",
                "templates": [{"subject": "News", "body_text": "Hello,\n\nthe news.\n"}],
                "recipients": [{"email": f"{user}.{k:06d}@{domains[k % len(domains)]}"}
                               for k in range(cfg.per_user)]}).task_id
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT edm.config_set('sweep.interval', %s)", (Jsonb(1),))
        for sid in sids.values():
            conn.execute("SELECT edm.set_service_limits(%s, %s)", (sid, Jsonb([SERVICE_RATE])))
        glob = {"name": "global", "kind": "rate", "max_count": 90, "window_ms": 1000,
                "burst": 10}
        google = {"name": "google", "kind": "rate", "max_count": 25, "window_ms": 1000,
                  "burst": 8}
        yahoo_a = {"name": "yahoo_a", "kind": "rate", "max_count": 4, "window_ms": 1000,
                   "burst": 3}
        u0 = {"name": "plan_hourly", "kind": "rolling", "max_count": cfg.u0_hourly,
              "window_ms": 3_600_000}
        u1 = {"name": "plan_rate", "kind": "rate", "max_count": 6, "window_ms": 1000,
              "burst": 4}
        t2 = {"name": "campaign_rate", "kind": "rate", "max_count": 3, "window_ms": 1000,
              "burst": 3}
        conn.execute("SELECT edm.set_global_limits(%s)", (Jsonb([glob]),))
        conn.execute("SELECT edm.set_site_limits('google', %s)", (Jsonb([google]),))
        conn.execute("SELECT edm.set_site_limits('yahoo', %s, %s)",
                     (Jsonb([yahoo_a]), sids["svc-a"]))
        conn.execute("SELECT edm.set_user_limits('u0', %s)", (Jsonb([u0]),))
        conn.execute("SELECT edm.set_user_limits('u1', %s)", (Jsonb([u1]),))
        conn.execute("SELECT edm.set_task_limits(%s, %s)", (tasks["u2"], Jsonb([t2])))
    world = WireWorld(senders)
    sender_of = {v: k for k, v in senders.items()}
    for name in SERVICES:
        world.layers.append(Layer("service", name, SERVICE_RATE, _sent_by(sender_of[name])))
    world.layers += [
        Layer("global", "all", glob, lambda r: True),
        Layer("site", "google", google, lambda r: _domain(r.recipient) == "gmail.com"),
        Layer("service_site", "svc-a/yahoo", yahoo_a,
              lambda r: r.sender == sender_of["svc-a"] and _domain(r.recipient) == "yahoo.com"),
        Layer("user", "u0", u0, lambda r: _user(r.recipient) == "u0"),
        Layer("user", "u1", u1, lambda r: _user(r.recipient) == "u1"),
        Layer("task", "u2's campaign", t2, lambda r: _user(r.recipient) == "u2"),
    ]
    return world


class Throttle:
    """Sink rule: Microsoft's rate-limit reply for outlook.com from ``since`` on."""

    def __init__(self) -> None:
        self.since = float("inf")

    def __call__(self, recipient: str) -> tuple[int, str] | None:
        if _domain(recipient) == THROTTLED_DOMAIN and time.time() >= self.since:
            return THROTTLE_REPLY
        return None


def submit_transactional(dsn: str, stop: threading.Event, out: dict[str, float]) -> None:
    """Submit one transactional message every TX_EVERY_S until ``stop``; note when."""
    n = 0
    with Scheduler(dsn) as s:
        while not stop.is_set():
            rcpt = f"{TX_USER}.{n:06d}@rcpt.example"
            t0 = time.time()
            s.send_message(TX_USER, rcpt, {"subject": "Your password reset",
                                           "body_text": "Here is your link.\n"})
            out[rcpt] = t0
            n += 1
            stop.wait(max(0.0, t0 + TX_EVERY_S - time.time()))


def run_wire(dsn: str, cfg: WireConfig, *, throttle: bool, workdir: Path) -> dict[str, Any]:
    rule = Throttle()
    submitted: dict[str, float] = {}
    with SmtpSink(rules=rule, keep_data=False) as sink:
        world = build_wire_world(dsn, cfg, sink.port)
        label = "throttled" if throttle else "control"
        common.say(f"{label} run: {len(SERVICES)} services, {len(BULK_USERS)} users x "
                   f"{cfg.per_user:,} recipients, {cfg.dispatchers} dispatchers, "
                   f"{cfg.seconds:.0f} s")
        lcfg = LimitsConfig(concurrency=cfg.concurrency)
        t_start = time.time()
        rule.since = t_start + cfg.throttle_at if throttle else float("inf")
        procs = [start_dispatcher(dsn, i, lcfg, workdir / label) for i in range(cfg.dispatchers)]
        # The transactional stream starts into a running system: once bulk mail
        # reaches the server (the dispatchers' start-up is not what it measures).
        while not sink.received and time.time() < t_start + 60:
            time.sleep(0.05)
        stop = threading.Event()
        submitter = threading.Thread(target=submit_transactional, args=(dsn, stop, submitted),
                                     daemon=True)
        submitter.start()
        try:
            while time.time() < t_start + cfg.seconds:
                for proc, log_path in procs:
                    if proc.poll() is not None:
                        raise RuntimeError(f"a dispatcher exited ({proc.returncode}): "
                                           f"{_log_tail(log_path, 5)}")
                time.sleep(0.2)
            t_end = time.time()
        finally:
            stop.set()
            submitter.join(10)
            for proc, _ in procs:
                if proc.poll() is None:
                    proc.terminate()
            for proc, _ in procs:
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
        time.sleep(0.5)
        wire = [r for r in sink.received + sink.refused if r.mail_from_at is not None]
    with open(workdir / label / "wire.jsonl", "w", encoding="utf-8") as f:
        for r in sorted(wire, key=lambda r: r.mail_from_at or 0.0):
            f.write(r.to_json() + "\n")
    t_throttle = t_start + cfg.throttle_at
    other = [r for r in wire if r.code == 250 and _domain(r.recipient) != THROTTLED_DOMAIN
             and t_throttle <= (r.mail_from_at or 0) <= t_end]
    tx_lat = [r.received_at - submitted[r.recipient] for r in wire
              if r.code == 250 and r.recipient in submitted]
    tol = cfg.tolerance_ms / 1000
    checks = []
    for layer in world.layers:
        times = sorted(r.mail_from_at for r in wire if layer.counts(r) and r.mail_from_at)
        lim = layer.limit
        if lim["kind"] == "rate":
            bad, slack = gcra_check(times, lim["max_count"], lim["window_ms"] / 1000,
                                    lim.get("burst", 1), tol)
            worst = f"{slack * 1000:+.1f} ms" if slack != float("inf") else "-"
        else:
            bad, fullest = window_check(times, lim["max_count"], lim["window_ms"] / 1000)
            worst = f"fullest {fullest}"
        checks.append({"layer": layer.layer, "scope": layer.scope, "limit": lim["name"],
                       "rule": _rule_text(lim), "starts": len(times), "violations": bad,
                       "tightest": worst})
    throttled = [r for r in wire if _domain(r.recipient) == THROTTLED_DOMAIN]
    with psycopg.connect(dsn, autocommit=True) as conn:
        actions = conn.execute(
            "SELECT count(*), count(DISTINCT service_id) FROM edm.site_suspensions "
            "WHERE site = 'microsoft'").fetchone()
    return {
        "label": label, "t_start": t_start, "t_end": t_end, "checks": checks,
        "limit_violations": sum(c["violations"] for c in checks),
        "other_sites_accepted_after_throttle": len(other),
        "other_sites_per_s": len(other) / max(1e-9, t_end - t_throttle),
        "transactional_sent": len(tx_lat), "transactional_submitted": len(submitted),
        "transactional_p50_s": common.percentile(tx_lat, 50),
        "transactional_p99_s": common.percentile(tx_lat, 99),
        "transactional_max_s": max(tx_lat, default=float("nan")),
        "transactions": len(wire), "refused": sum(1 for r in wire if r.code != 250),
        "throttled_site_transactions": len(throttled),
        "throttled_site_refused": sum(1 for r in throttled if r.code != 250),
        "suspended_pairs": int(actions[0]) if actions else 0,
    }


def _rule_text(lim: dict[str, Any]) -> str:
    if lim["kind"] == "rate":
        return f"{lim['max_count']} per {lim['window_ms']} ms, burst {lim.get('burst', 1)}"
    return f"{lim['max_count']} per {lim['window_ms'] / 3_600_000:g} h rolling"


# --------------------------------------------------------------------------- claim cost


def spread_over_sites(dsn: str) -> None:
    """Give the S3 world's recipients the five destinations, round robin."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE edm.subtasks SET email = split_part(email, '@', 1) || '@' || "
            "(%s::text[])[1 + subtask_id %% %s]", (list(DOMAINS), len(DOMAINS)))
        conn.execute("VACUUM ANALYZE edm.subtasks")


def set_shaping(dsn: str, on: bool) -> None:
    """Every layer configured (loose enough never to bind), or none."""
    # a million an hour with a burst of 100,000: never binding in the run, and a
    # tolerance (burst - 1) * T of 6 minutes (a tight one, e.g. 1,000,000 a second
    # with a burst of 1,000, tolerates only 1 ms and binds on any lateness margin)
    loose = [{"name": "loose", "kind": "rate", "max_count": 1_000_000, "window_ms": 3_600_000,
              "burst": 100_000}]
    hourly = [{"name": "hourly", "kind": "rolling", "max_count": 10_000_000,
               "window_ms": 3_600_000}]
    limits = Jsonb(loose if on else [])
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT edm.set_global_limits(%s)", (limits,))
        for site in ("google", "yahoo", "apple"):
            conn.execute("SELECT edm.set_site_limits(%s, %s)", (site, limits))
        services = [r[0] for r in conn.execute(
            "SELECT service_id FROM edm.services ORDER BY service_id")]
        for sid in services[::10]:
            conn.execute("SELECT edm.set_site_limits('yahoo', %s, %s)", (limits, sid))
            conn.execute("SELECT edm.suspend_site(%s, 'microsoft', %s, 'benchmark')",
                         (sid, "infinity" if on else "-infinity"))
        users = [r[0] for r in conn.execute("SELECT user_id FROM edm.users ORDER BY user_id")]
        for user in users[::10]:
            conn.execute("SELECT edm.set_user_limits(%s, %s)", (user, Jsonb(hourly if on else [])))
        tasks = [r[0] for r in conn.execute(
            "SELECT task_id FROM edm.tasks WHERE status NOT IN ('completed', 'cancelled', 'failed')"
            " ORDER BY task_id")]
        for task in tasks[::10]:
            conn.execute("SELECT edm.set_task_limits(%s, %s)", (task, limits))
        for task in tasks[::100]:
            conn.execute("SELECT edm.set_task_transactional(%s, %s)", (task, on))


def measure_claim_cost_paired(unshaped_dsn: str, shaped_dsn: str, seconds: float,
                               batch: int) -> dict[str, Any]:
    """One worker, a claim and completion cycle in each world in turn, call by call."""
    sql_claim = ("SELECT subtask_id FROM edm.claim_v2(%s, %s, 600, NULL, %s, NULL, '{}')")
    sql_complete = ("SELECT count(*) FROM edm.complete(%s, %s, %s, NULL, NULL, NULL, NULL)")
    per_service = slots_per_service(batch)
    lat: dict[str, list[float]] = {"unshaped": [], "shaped": []}
    claimed = {"unshaped": 0, "shaped": 0}
    with contextlib.ExitStack() as stack:
        conns = {mode: stack.enter_context(psycopg.connect(d, autocommit=True, prepare_threshold=0))
                 for mode, d in (("unshaped", unshaped_dsn), ("shaped", shaped_dsn))}
        owner = "bench-cost"
        for _ in range(3):  # warm-up: plans, caches
            for conn in conns.values():
                ids = [r[0] for r in conn.execute(sql_claim, (owner, batch, per_service))]
                if ids:
                    conn.execute(sql_complete, (owner, ids, ["sent"] * len(ids)))
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            for mode, conn in conns.items():
                t0 = time.perf_counter()
                ids = [r[0] for r in conn.execute(sql_claim, (owner, batch, per_service))]
                lat[mode].append(time.perf_counter() - t0)
                claimed[mode] += len(ids)
                if ids:
                    conn.execute(sql_complete, (owner, ids, ["sent"] * len(ids)))
    med = {m: statistics.median(v) * 1000 / batch for m, v in lat.items()}
    # the whole time of the calls over the subtasks they claimed
    per = {m: sum(v) * 1000 / max(claimed[m], 1) for m, v in lat.items()}
    common.say(f"  paired: {len(lat['shaped'])} calls each; per claimed subtask "
               f"{per['unshaped']:.3f} ms unshaped, {per['shaped']:.3f} ms shaped "
               f"(median calls / {batch}: {med['unshaped']:.3f} and {med['shaped']:.3f} ms)")
    return {
        "claim_cost_method": "paired",
        "claim_cost_calls": len(lat["shaped"]),
        "claim_cost_claimed": claimed,
        "claim_per_subtask_ms_unshaped": per["unshaped"],
        "claim_per_subtask_ms_shaped": per["shaped"],
        "claim_per_subtask_p50_ms_unshaped": med["unshaped"],
        "claim_per_subtask_p50_ms_shaped": med["shaped"],
        "claim_call_p50_ms_unshaped": statistics.median(lat["unshaped"]) * 1000,
        "claim_call_p50_ms_shaped": statistics.median(lat["shaped"]) * 1000,
        "claim_cost_ratio_median": common.ratio(med["shaped"], med["unshaped"]),
        "claim_cost_ratio_vs_s3": common.ratio(per["shaped"], per["unshaped"]),
    }


def measure_claim_cost(dsn: str, seconds: float, rounds: int, batch: int) -> dict[str, Any]:
    per: dict[str, list[float]] = defaultdict(list)
    call: dict[str, list[float]] = defaultdict(list)
    for i in range(rounds):
        for mode in ("unshaped", "shaped"):
            set_shaping(dsn, mode == "shaped")
            suite.release_leases(dsn)
            r = suite.measure_raw(dsn, "cycle", 1, batch, seconds, label=f"{mode}-{i}")
            per[mode].append(r["claim_per_subtask_p50_ms"])
            call[mode].append(r["claim_call_p50_ms"])
    med = {m: statistics.median(v) for m, v in per.items()}
    return {
        "claim_cost_method": "windows",
        "claim_per_subtask_p50_ms_unshaped": med["unshaped"],
        "claim_per_subtask_p50_ms_shaped": med["shaped"],
        "claim_call_p50_ms_unshaped": statistics.median(call["unshaped"]),
        "claim_call_p50_ms_shaped": statistics.median(call["shaped"]),
        "claim_cost_windows": {m: [round(x, 4) for x in v] for m, v in per.items()},
        "claim_cost_ratio_vs_s3": common.ratio(med["shaped"], med["unshaped"]),
    }


# --------------------------------------------------------------------------- main


def add_args(p: argparse.ArgumentParser) -> None:
    d = WireConfig()
    p.add_argument("--seconds", type=float, default=d.seconds, help="length of each wire run")
    p.add_argument("--throttle-at", type=float, default=d.throttle_at)
    p.add_argument("--dispatchers", type=int, default=d.dispatchers)
    p.add_argument("--per-user", type=int, default=d.per_user)
    p.add_argument("--tolerance-ms", type=float, default=d.tolerance_ms)
    p.add_argument("--scale", type=float, default=0.1, help="of the S3 world for the claim cost")
    p.add_argument("--cost-seconds", type=float, default=6.0)
    p.add_argument("--cost-rounds", type=int, default=3)
    p.add_argument("--cost-method", choices=("paired", "windows"), default="paired",
                   help="claim cost: both worlds in turn call by call, or alternating windows")
    p.add_argument("--cost-only", action="store_true", help="skip the wire runs")
    p.add_argument("--no-cost", action="store_true", help="skip the claim-cost part")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep the dispatchers' logs here")


def main(argv: Sequence[str]) -> int:
    args = common.parse_args("shaped", argv, DESCRIPTION, add_args)
    cfg = WireConfig(seconds=args.seconds, throttle_at=args.throttle_at,
                     dispatchers=args.dispatchers, per_user=args.per_user,
                     tolerance_ms=args.tolerance_ms)
    t_run = time.perf_counter()
    result: dict[str, Any] = {"scenario": "shaped"}
    with contextlib.ExitStack() as stack, common.bench_server(args.dsn, keep=args.keep) as server:
        workdir = args.workdir or Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="edm-shaped-")))
        for label in ("throttled", "control"):
            (workdir / label).mkdir(parents=True, exist_ok=True)
        scale = {"services": len(SERVICES), "bulk users": len(BULK_USERS),
                 "recipients per user": cfg.per_user, "dispatchers": cfg.dispatchers,
                 "seconds per run": cfg.seconds, "throttle at s": cfg.throttle_at,
                 "cost world": (f"S3 x {args.scale}, {args.cost_method}" if not args.no_cost
                                else "skipped")}
        result.update(common.print_header("Traffic shaping on the wire", server, scale))
        if args.cost_only:
            result.update(limit_violations=None, unthrottled_sites_throughput_ratio=None,
                          transactional_p99_s=None)
        else:
            runs = {}
            for label in ("throttled", "control"):
                dsn = server.fresh_database(f"edm_bench_shaped_{label}")
                runs[label] = run_wire(dsn, cfg, throttle=label == "throttled", workdir=workdir)
            thr, ctl = runs["throttled"], runs["control"]
            common.print_table(
                f"Every layer, recomputed from the SMTP server's transaction starts "
                f"(throttled run; tolerance {cfg.tolerance_ms:g} ms on times, none on counts)",
                ["layer", "scope", "limit", "rule", "starts", "violations", "tightest"],
                [[c["layer"], c["scope"], c["limit"], c["rule"], c["starts"], c["violations"],
                  c["tightest"]] for c in thr["checks"]])
            common.print_table(
                "The two runs", ["figure", "throttled", "control"],
                [[k, thr[k], ctl[k]] for k in (
                    "limit_violations", "transactions", "refused", "throttled_site_transactions",
                    "throttled_site_refused", "suspended_pairs",
                    "other_sites_accepted_after_throttle", "other_sites_per_s",
                    "transactional_submitted", "transactional_sent", "transactional_p50_s",
                    "transactional_p99_s", "transactional_max_s")])
            result["runs"] = {k: {kk: vv for kk, vv in v.items() if kk not in ("t_start", "t_end")}
                              for k, v in runs.items()}
            result["limit_violations"] = thr["limit_violations"]
            result["unthrottled_sites_throughput_ratio"] = common.ratio(
                thr["other_sites_accepted_after_throttle"],
                ctl["other_sites_accepted_after_throttle"])
            result["transactional_p99_s"] = thr["transactional_p99_s"]
        if not args.no_cost:
            dsn = server.fresh_database("edm_bench_shaped_cost")
            spec = data.design_spec("s3", args.scale)
            common.say(f"building S3 x {args.scale} for the claim cost")
            data.build_world(dsn, spec)
            spread_over_sites(dsn)
            if args.cost_method == "windows":
                result.update(measure_claim_cost(dsn, args.cost_seconds, args.cost_rounds, 50))
            else:
                shaped_dsn = server.clone_database("edm_bench_shaped_cost",
                                                   "edm_bench_shaped_cost_shaped")
                set_shaping(shaped_dsn, True)
                for d in (dsn, shaped_dsn):
                    with psycopg.connect(d, autocommit=True) as conn:
                        conn.execute("VACUUM ANALYZE")
                result.update(measure_claim_cost_paired(
                    dsn, shaped_dsn, args.cost_seconds * args.cost_rounds * 2, 50))
        else:
            result["claim_cost_ratio_vs_s3"] = None
        common.print_table(
            "Figures (issue 15 point 6)", ["figure", "value", "goal"],
            [["limit_violations", result["limit_violations"], "0"],
             ["unthrottled_sites_throughput_ratio",
              result["unthrottled_sites_throughput_ratio"], ">= 0.95"],
             ["transactional_p99_s", result["transactional_p99_s"], "<= 1.0"],
             ["claim_cost_ratio_vs_s3", result["claim_cost_ratio_vs_s3"], "<= 1.5"]])
    result["run_seconds"] = time.perf_counter() - t_run
    print(f"\nshaped finished in {result['run_seconds']:.0f} s")
    common.finish(args, result)
    return 0 if result["limit_violations"] in (0, None) else 1
