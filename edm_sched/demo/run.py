"""``edm-sched demo``: the whole product in about a minute.

Four tenants, five SMTP accounts with different intervals and quotas (a pool
shared by everyone plus one dedicated account), campaigns from 3 to 400
recipients, one scheduled a few seconds later and one small campaign arriving
while the big ones are sending. A real dispatcher sends through a local SMTP
sink; live bars show tasks and services. The summary is computed from the
database and the sink's log — not from counters kept by the demo.
"""

from __future__ import annotations

import datetime as dt
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg

from edm_sched.api import Scheduler
from edm_sched.dispatcher import run_dispatcher
from edm_sched.migrations import migrate
from edm_sched.sqlfiles import query
from edm_sched.transports.smtp import SmtpTransport

USERS = ["acme", "globex", "initech", "umbrella"]
# name, interval (s), daily quota, granted to (None = everyone)
SERVICES: list[tuple[str, float, int, list[str] | None]] = [
    ("pool-fast", 0.05, 400, None),
    ("pool-medium", 0.1, 250, None),
    ("pool-slow", 0.25, 120, None),
    ("pool-capped", 0.1, 30, None),
    ("acme-dedicated", 0.2, 150, ["acme"]),
]
# user, name, recipients, start delay (s)
TASKS: list[tuple[str, str, int, float]] = [
    ("acme", "spring-sale", 400, 0.0),
    ("globex", "newsletter", 250, 0.0),
    ("initech", "onboarding", 60, 0.0),
    ("umbrella", "launch", 120, 5.0),
]
LATE_TASK = ("initech", "password-reset", 3, 8.0)  # a small user arriving mid-run


def run_demo(dsn: str, *, seconds: float = 60.0, json_out: bool = False) -> dict[str, Any]:
    from edm_sched.demo import require

    require("aiosmtpd", "the demo's SMTP server")
    from edm_sched.testing.smtp_sink import SmtpSink, read_log

    migrate(dsn)
    run = uuid.uuid4().hex[:6]
    tmp = tempfile.TemporaryDirectory(prefix="edm-demo-")
    workdir = Path(tmp.name)
    sink = SmtpSink(log_path=workdir / "sink.jsonl").start()
    out = sys.stdout if not json_out else None
    # Live bars redraw the screen only on a terminal; a pipe gets the final table.
    live = out if out is not None and out.isatty() else None
    try:
        with Scheduler(dsn) as s:
            world = _build(s, run, sink.port)
            stop = threading.Event()
            started = time.monotonic()
            thread = threading.Thread(
                target=run_dispatcher,
                kwargs={"dsn": dsn, "transport": {"smtp": SmtpTransport()},
                        "concurrency": 20, "stop_event": stop, "handle_signals": False},
                daemon=True)
            thread.start()
            late_created = False
            try:
                while time.monotonic() - started < seconds:
                    elapsed = time.monotonic() - started
                    if not late_created and elapsed >= LATE_TASK[3]:
                        world["tasks"].append(_task(s, run, *LATE_TASK[:3]))
                        late_created = True
                    done = _progress(dsn, world, live)
                    if done and late_created:
                        break
                    time.sleep(0.5)
            finally:
                stop.set()
                thread.join(60)
            if out:
                _progress(dsn, world, out)
        summary = _summary(dsn, world, read_log(workdir / "sink.jsonl"))
        summary["seconds"] = round(time.monotonic() - started, 1)
    finally:
        sink.stop()
        tmp.cleanup()
    if out:
        _print_summary(summary, out)
    return summary


def _build(s: Scheduler, run: str, port: int) -> dict[str, Any]:
    start = dt.datetime.now(dt.UTC)
    users = [f"{u}-{run}" for u in USERS]
    for u in users:
        s.upsert_user(u, display_name=u.split("-")[0].title(), quota_limit=1000)
    services: dict[int, str] = {}
    for name, interval, quota, granted in SERVICES:
        sid = s.create_service({
            "name": f"{name}-{run}", "from_addresses": [f"{name}@demo.example"],
            "interval_seconds": interval, "daily_quota": quota, "transport": "smtp",
            "settings": {"host": "127.0.0.1", "port": port, "security": "none"}})
        services[sid] = name
        for u in users:
            if granted is None or u.split("-")[0] in granted:
                s.grant(sid, u)
    tasks = [_task(s, run, user, name, n, start + dt.timedelta(seconds=delay))
             for user, name, n, delay in TASKS]
    return {"run": run, "users": users, "services": services, "tasks": tasks}


def _task(s: Scheduler, run: str, user: str, name: str, n: int,
          when: dt.datetime | float | None = None) -> int:
    scheduled = when if isinstance(when, dt.datetime) else dt.datetime.now(dt.UTC)
    created = s.create_task({
        "user_id": f"{user}-{run}", "name": name, "scheduled_at": scheduled,
        "templates": [{"subject": "{{ name }}, news from " + user.title(),
                       "body_text": "Hello {{ name }},\n\nThis is " + name + ".\n"}],
        "recipients": [{"email": f"{name}-{i}@{user}.customers.example",
                        "vars": {"name": f"Reader {i}"}} for i in range(n)],
    })
    return created.task_id


def _bar(done: int, total: int, width: int = 24) -> str:
    filled = width if total == 0 else int(width * done / total)
    return "█" * filled + "·" * (width - filled)


def _progress(dsn: str, world: dict[str, Any], out: Any) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        tasks = conn.execute(query("demo_tasks"), (world["tasks"],)).fetchall()
        services = conn.execute(query("demo_services"), (list(world["services"]),)).fetchall()
    if out is not None:
        clear = "\x1b[2J\x1b[H" if out.isatty() else ""
        lines = [f"{clear} edm-sched demo — tasks"]
        for _tid, user, name, status, total, sent, failed in tasks:
            lines.append(f"  {user.split('-')[0]:9} {name:15} {_bar(sent + failed, total)} "
                         f"{sent:4}/{total:<4} {status}")
        lines.append(" services")
        for _sid, name, interval_ms, quota, sent_today, state in services:
            lines.append(f"  {name.rsplit('-', 1)[0]:15} every {interval_ms / 1000:>4.2f}s "
                         f"{_bar(sent_today, quota)} {sent_today:4}/{quota:<4} {state}")
        print("\n".join(lines), file=out, flush=True)
    live = {"scheduled", "sending", "expanding", "paused"}
    return all(t[3] not in live for t in tasks)


def _summary(dsn: str, world: dict[str, Any], received: list[Any]) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        owner: dict[int, str] = dict(
            conn.execute(query("demo_task_owners"), (world["tasks"],)).fetchall())
        interval_violations = conn.execute(
            query("demo_interval_violations"), (list(world["services"]),)).fetchone()
        quota_violations = conn.execute(
            query("demo_quota_violations"), (list(world["services"]),)).fetchone()
        waits = conn.execute(query("demo_first_waits"), (world["tasks"],)).fetchall()
        db_sent = conn.execute(query("demo_sent"), (world["tasks"],)).fetchone()
    # From the sink: who actually received what (Message-ID "<edm.TASK.SUBTASK@...>").
    per_user: Counter[str] = Counter()
    ids: Counter[str] = Counter()
    for r in received:
        if not r.message_id or not r.message_id.startswith("<edm."):
            continue
        task_id = int(r.message_id[5:].split(".")[0])
        if task_id in owner:
            ids[r.message_id] += 1
            per_user[owner[task_id].split("-")[0]] += 1
    return {
        "ok": True,
        "sent": sum(per_user.values()),
        "sent_recorded_in_db": int(db_sent[0]) if db_sent else 0,
        "duplicates": sum(n - 1 for n in ids.values() if n > 1),
        "interval_violations": int(interval_violations[0]) if interval_violations else 0,
        "quota_violations": int(quota_violations[0]) if quota_violations else 0,
        "per_user_sent": dict(sorted(per_user.items())),
        "first_send_wait_s": {f"{user.split('-')[0]}/{name}": None if w is None else round(w, 3)
                              for user, name, w in waits},
    }


def _print_summary(summary: dict[str, Any], out: Any) -> None:
    print("\nsummary (from the SMTP sink's log and the database)", file=out)
    for key in ("sent", "sent_recorded_in_db", "duplicates", "interval_violations",
                "quota_violations", "seconds"):
        print(f"  {key:22} {summary[key]}", file=out)
    print("  sent per user", file=out)
    for user, n in summary["per_user_sent"].items():
        print(f"    {user:20} {n}", file=out)
    print("  first-send wait per task (s)", file=out)
    for task, w in summary["first_send_wait_s"].items():
        print(f"    {task:30} {w}", file=out)
