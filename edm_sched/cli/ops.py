"""Operations subcommands: dispatch, sweep, status, top, config."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from edm_sched import errors
from edm_sched.cli.base import EXIT_OK, database, emit, is_terminal


def cmd_dispatch(args: argparse.Namespace) -> int:
    from edm_sched.dispatcher import run_dispatcher

    def env_resolver(ref: str) -> str | None:
        """Credentials from the environment: credential_ref names a variable."""
        return os.environ.get(ref)

    with database(args) as dsn:
        stats = run_dispatcher(dsn, resolver=env_resolver, concurrency=args.concurrency,
                               batch_size=args.batch_size, run_sweeps=not args.no_sweeps,
                               metrics_port=args.metrics_port)
    emit(args, {"ok": True, "dispatcher": stats.dispatcher_id, "claimed": stats.claimed,
                "sent": stats.sent, "failed": stats.failed},
         f"dispatcher {stats.dispatcher_id} stopped: claimed {stats.claimed}, sent {stats.sent}")
    return EXIT_OK


def cmd_sweep(args: argparse.Namespace) -> int:
    from edm_sched.sweeps import sweep

    with database(args) as dsn:
        report = sweep(dsn)
    alerts = report.pop("alerts", [])
    emit(args, {"ok": True, **report, "alerts": alerts},
         "\n".join([*(f"{k:20} {v}" for k, v in report.items()),
                    *(f"alert {a['severity']}: {a['message']}" for a in alerts)]))
    return EXIT_OK


def _status_text(st: Any) -> str:
    h = st.health
    lines = [
        f"services {h.services_available} ready / {h.services_enabled} enabled / "
        f"{h.services_total} total; active last minute {h.services_active_last_minute}",
        f"queue: {h.pending_subtasks} pending, {h.leased_subtasks} leased; "
        f"{h.active_tasks} active tasks; sent last minute {h.sent_last_minute}; "
        f"error rate {h.error_rate_last_hour:.2%}; alerts {h.open_alerts}; "
        f"dispatchers {h.dispatchers_alive}",
        "",
        f"{'task':>7} {'user':14} {'name':20} {'status':10} {'sent':>8} {'total':>8} "
        f"{'sent%':>6} {'wait s':>8} {'eta s':>8}",
    ]
    for t in st.tasks:
        lines.append(f"{t.task_id:>7} {t.user_id[:14]:14} {t.name[:20]:20} {t.status:10} "
                     f"{t.sent:>8} {t.total:>8} {t.sent_pct or 0:>6.1f} "
                     f"{(t.first_send_wait_s or 0):>8.1f} "
                     f"{'' if t.eta_s is None else f'{t.eta_s:.0f}':>8}"
                     + (f"  {t.outcome}" if t.outcome else ""))
    lines += ["", f"{'service':>7} {'name':20} {'state':10} {'today':>8} {'quota':>8} "
                  f"{'last h':>7} {'success':>7} {'resp ms':>8}"]
    for s in st.services:
        lines.append(f"{s.service_id:>7} {s.name[:20]:20} {s.state:10} {s.sent_today:>8} "
                     f"{s.daily_quota:>8} {s.sent_last_hour:>7} {s.success_rate:>7.1%} "
                     f"{(s.avg_response_ms or 0):>8.0f}")
    if st.waiting:
        lines += ["", "waiting:"]
        lines += [f"  task {w.task_id} ({w.name}): {w.reason}"
                  + (f" until {w.until:%Y-%m-%d %H:%M:%S%z}" if w.until else "")
                  for w in st.waiting]
    if st.alerts:
        lines += ["", "alerts:"] + [f"  [{a.severity}] {a.message}" for a in st.alerts]
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    from edm_sched.monitoring import status

    with database(args) as dsn:
        st = status(dsn, limit=args.limit)
    emit(args, {"ok": True, **st.model_dump(mode="json")}, _status_text(st))
    return EXIT_OK


def cmd_top(args: argparse.Namespace) -> int:
    from edm_sched.monitoring import status

    with database(args) as dsn:
        rounds = 0
        try:
            while args.iterations is None or rounds < args.iterations:
                st = status(dsn, limit=args.limit)
                # Clear the screen on a terminal only; a pipe gets one block per refresh.
                head = "\x1b[2J\x1b[H" if is_terminal() else ("\n" if rounds else "")
                sys.stdout.write(head + time.strftime("%H:%M:%S ")
                                 + "edm-sched top (Ctrl-C to quit)\n" + _status_text(st) + "\n")
                sys.stdout.flush()
                rounds += 1
                if args.iterations is None or rounds < args.iterations:
                    time.sleep(args.interval)
        except KeyboardInterrupt:
            pass
    return EXIT_OK


def cmd_config(args: argparse.Namespace) -> int:
    from edm_sched import monitoring

    if args.action in ("get", "set") and not args.key:
        raise errors.InvalidInput(f"config {args.action} needs a KEY")
    with database(args) as dsn:
        if args.action == "list":
            entries = monitoring.config_list(dsn)
            emit(args, {"ok": True, "config": [e.model_dump(mode="json") for e in entries]},
                 "\n".join(f"{e.key:38} {json.dumps(e.value):>8}  {e.description}"
                           for e in entries))
        elif args.action == "get":
            e = monitoring.config_get(dsn, args.key)
            emit(args, {"ok": True, **e.model_dump(mode="json")}, json.dumps(e.value))
        else:
            if args.value is None:
                raise errors.InvalidInput("config set needs KEY and VALUE")
            value = monitoring.config_set(dsn, args.key, args.value,
                                          actor=os.environ.get("USER", "cli"))
            emit(args, {"ok": True, "key": args.key, "value": value},
                 f"{args.key} = {json.dumps(value)}")
    return EXIT_OK


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("dispatch", parents=[common], help="run a dispatcher (the sidecar)")
    p.add_argument("--concurrency", type=int, help="sends in flight (default from config)")
    p.add_argument("--batch-size", type=int, help="claims per call (default from config)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    p.add_argument("--no-sweeps", action="store_true", help="never become the sweep leader")
    p.set_defaults(func=cmd_dispatch)

    p = sub.add_parser("sweep", parents=[common], help="run one round of recovery sweeps")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("status", parents=[common], help="system health, tasks, services")
    p.add_argument("--limit", type=int, default=50,
                   help="most tasks and services shown (default 50)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("top", parents=[common], help="live view of tasks and services")
    p.add_argument("--interval", type=float, default=1.0,
                   help="seconds between refreshes (default 1)")
    p.add_argument("--iterations", type=int, help="stop after N refreshes")
    p.add_argument("--limit", type=int, default=30,
                   help="most tasks and services shown (default 30)")
    p.set_defaults(func=cmd_top)

    p = sub.add_parser("config", parents=[common], help="read or change settings")
    p.add_argument("action", choices=["get", "set", "list"],
                   help="list every setting, get one, or set one")
    p.add_argument("key", nargs="?", help="setting name, e.g. queue.max_attempts")
    p.add_argument("value", nargs="?", help='new value, as JSON (5, true, "text")')
    p.set_defaults(func=cmd_config)
