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

import datetime as dt
from dataclasses import dataclass

from edm_sched import core, db
from edm_sched.core import Fetch, Op
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


def check_op(now: dt.datetime | None = None, force: bool = True) -> Op[int]:
    row = yield Fetch(query("sweep_reputation"), (now, force))
    return int(row[0]) if row else 0


def status_op(now: dt.datetime | None = None) -> Op[list[ReputationRow]]:
    rows = yield Fetch(query("reputation_status"), (now,), rows="all")
    return [ReputationRow(r[0], r[1], r[2], r[3], int(r[4]), int(r[5]), int(r[6]),
                          None if r[7] is None else float(r[7]),
                          None if r[8] is None else float(r[8]), bool(r[9]), r[10])
            for r in rows]


def resume_service_op(service_id: int, now: dt.datetime | None = None) -> Op[bool]:
    row = yield Fetch(query("reputation_resume_service"), (service_id, now))
    return bool(row and row[0])


def resume_user_op(user_id: str, now: dt.datetime | None = None) -> Op[int]:
    row = yield Fetch(query("reputation_resume_user"), (user_id, now))
    return int(row[0]) if row else 0


def check(target: db.ConnOrDsn, *, now: dt.datetime | None = None, force: bool = True) -> int:
    """Run the breaker once (``force``: even if it ran less than
    ``reputation.check_interval`` ago); returns pauses and warnings raised."""
    return core.run(target, check_op(now, force))


def status(target: db.ConnOrDsn, *, now: dt.datetime | None = None) -> list[ReputationRow]:
    """Rates per service and user with activity in the window, and pause reasons."""
    return core.run(target, status_op(now))


def resume_service(target: db.ConnOrDsn, service_id: int, *,
                   now: dt.datetime | None = None) -> bool:
    """Re-enable a service the breaker disabled and restart its window; True when it
    was paused by the breaker. :class:`edm_sched.errors.NotFound` for an unknown id."""
    return core.run(target, resume_service_op(service_id, now))


def resume_user(target: db.ConnOrDsn, user_id: str, *, now: dt.datetime | None = None) -> int:
    """Resume a user the breaker paused: its window restarts and the tasks the breaker
    paused resume; returns how many."""
    return core.run(target, resume_user_op(user_id, now))
