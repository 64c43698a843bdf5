"""The reputation breaker: bounce and complaint rates per service and per user.

The rules are in SQL (``edm.check_reputation``, run from the sweeps at most every
``reputation.check_interval`` seconds; ``edm.reputation_rates`` and the view
``edm.reputation_status``). Over a rolling window (``reputation.window_hours``,
24 by default) with at least ``reputation.min_sends`` sends (1000: one bounce in
three sends is chance, not a reputation):

=====================  ========  =======
rate                   warning   pause
=====================  ========  =======
complaints / sends     0.1 %     0.3 %
hard bounces / sends   2 %       5 %
=====================  ========  =======

A warning raises an alert (kind ``reputation``). A pause of a **service** sets
``enabled = false`` with ``services.paused_reason`` (the claim needs no
change); a pause of a **user** pauses its bulk tasks (``tasks.pause_reason``)
and holds any bulk task of it that would start, until resumed — transactional
tasks (``list_unsubscribe=False``) go on. Resuming is explicit:
:func:`resume_service`, :func:`resume_user`, or ``edm-sched reputation resume``;
it restarts the window, so the bounces that tripped the breaker no longer count.
"""

from __future__ import annotations

import argparse
import datetime as dt
from dataclasses import dataclass
from typing import Any

from edm_sched import db
from edm_sched.sqlfiles import query


@dataclass(frozen=True)
class ReputationRow:
    subject: str  # "service" or "user"
    service_id: int | None
    user_id: str | None
    window_start: dt.datetime
    sends: int
    hard_bounces: int
    complaints: int
    bounce_pct: float | None
    complaint_pct: float | None
    judged: bool  # sends >= reputation.min_sends
    paused_reason: str | None


def check(target: db.ConnOrDsn, *, now: dt.datetime | None = None, force: bool = True) -> int:
    """Run the breaker once (``force``: even if it ran less than
    ``reputation.check_interval`` ago); returns pauses and warnings raised."""
    with db.using(target) as conn, conn.transaction():
        row = conn.execute(query("sweep_reputation"), (now, force)).fetchone()
    return int(row[0]) if row else 0


def status(target: db.ConnOrDsn, *, now: dt.datetime | None = None) -> list[ReputationRow]:
    """Rates per service and user with activity in the window, and pause reasons."""
    with db.using(target) as conn:
        rows = conn.execute(query("reputation_status"), (now,)).fetchall()
    return [ReputationRow(r[0], r[1], r[2], r[3], int(r[4]), int(r[5]), int(r[6]),
                          None if r[7] is None else float(r[7]),
                          None if r[8] is None else float(r[8]), bool(r[9]), r[10])
            for r in rows]


def resume_service(target: db.ConnOrDsn, service_id: int, *,
                   now: dt.datetime | None = None) -> bool:
    """Re-enable a service the breaker disabled and restart its window; True when it
    was paused by the breaker. :class:`edm_sched.errors.NotFound` for an unknown id."""
    with db.using(target) as conn, conn.transaction():
        row = conn.execute(query("reputation_resume_service"), (service_id, now)).fetchone()
    return bool(row and row[0])


def resume_user(target: db.ConnOrDsn, user_id: str, *, now: dt.datetime | None = None) -> int:
    """Resume a user the breaker paused: its window restarts and the tasks the breaker
    paused resume; returns how many."""
    with db.using(target) as conn, conn.transaction():
        row = conn.execute(query("reputation_resume_user"), (user_id, now)).fetchone()
    return int(row[0]) if row else 0


# ------------------------------------------------------------------------ CLI


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """``edm-sched reputation status|check|resume``."""
    p = sub.add_parser("reputation", parents=[common],
                       help="bounce and complaint rates; resume what the breaker paused")
    p.add_argument("action", choices=["status", "check", "resume"])
    target = p.add_mutually_exclusive_group()
    target.add_argument("--service", type=int, help="resume: the service id")
    target.add_argument("--user", help="resume: the user id")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    from edm_sched import errors
    from edm_sched.cli import database, emit

    with database(args) as dsn:
        if args.action == "status":
            rows = status(dsn)
            emit(args, {"ok": True, "rows": [
                {**r.__dict__, "window_start": r.window_start.isoformat()} for r in rows]},
                "\n".join(
                    f"{r.subject:7} {r.service_id or r.user_id!s:20} sends {r.sends:>8} "
                    f"bounces {r.hard_bounces:>6} ({r.bounce_pct or 0:.3f} %) complaints "
                    f"{r.complaints:>6} ({r.complaint_pct or 0:.3f} %)"
                    + ("" if r.judged else " [too few sends to judge]")
                    + (f"\n        PAUSED: {r.paused_reason}" if r.paused_reason else "")
                    for r in rows) or "no sends, bounces or complaints in the window")
        elif args.action == "check":
            n = check(dsn)
            emit(args, {"ok": True, "raised": n}, f"pauses and warnings raised: {n}")
        elif args.service is not None:
            was = resume_service(dsn, args.service)
            emit(args, {"ok": True, "service_id": args.service, "was_paused": was},
                 f"service {args.service} resumed" if was
                 else f"service {args.service} was not paused by the breaker; window restarted")
        elif args.user is not None:
            n = resume_user(dsn, args.user)
            emit(args, {"ok": True, "user_id": args.user, "tasks_resumed": n},
                 f"user {args.user} resumed; {n} task(s) resumed")
        else:
            raise errors.InvalidInput("resume needs --service ID or --user ID")
    return 0
