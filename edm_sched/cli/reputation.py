"""``edm-sched reputation``: bounce and complaint rates, and resuming what the breaker paused."""

from __future__ import annotations

import argparse
from typing import Any

from edm_sched import errors, reputation
from edm_sched.cli.base import database, emit


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """``edm-sched reputation status|check|resume``."""
    p = sub.add_parser("reputation", parents=[common],
                       help="bounce and complaint rates; resume what the breaker paused")
    p.add_argument("action", choices=["status", "check", "resume"],
                   help="status: rates per service and user; check: run the breaker now; "
                        "resume: lift a pause (with --service or --user)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--service", type=int, help="resume: the service id")
    target.add_argument("--user", help="resume: the user id")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    with database(args) as dsn:
        if args.action == "status":
            rows = reputation.status(dsn)
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
            n = reputation.check(dsn)
            emit(args, {"ok": True, "raised": n}, f"pauses and warnings raised: {n}")
        elif args.service is not None:
            was = reputation.resume_service(dsn, args.service)
            emit(args, {"ok": True, "service_id": args.service, "was_paused": was},
                 f"service {args.service} resumed" if was
                 else f"service {args.service} was not paused by the breaker; window restarted")
        elif args.user is not None:
            n = reputation.resume_user(dsn, args.user)
            emit(args, {"ok": True, "user_id": args.user, "tasks_resumed": n},
                 f"user {args.user} resumed; {n} task(s) resumed")
        else:
            raise errors.InvalidInput("resume needs --service ID or --user ID")
    return 0
