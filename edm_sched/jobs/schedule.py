"""Cron schedules in a time zone: validation and run times, computed with cronsim.

SQL has no cron parser, so ``edm.jobs.next_run_at`` is computed here and
stored. cronsim does the cron matching; this module decides how wall-clock
matches become instants in a time zone with daylight saving time, the same
way for 5- and 6-field expressions:

* **Fixed-time schedules** — the minute and the hour fields both written
  without a leading ``*`` (``30 2 * * *``, ``0 0 9-17 * * 1-5``): the fields
  are read on the local wall clock. A time that does not exist (inside the
  spring-forward gap) runs once, at the first instant after the gap (a 02:30
  daily job runs at 03:00 local on that day in Europe/Paris and
  America/New_York); a time that happens twice (fall-back) runs once, at its
  first occurrence (the summer-time one). This is what Debian cron and
  cronsim do for 5-field expressions; cronsim itself does not apply it to
  6-field ones, so this module does.
* **Interval-like schedules** — the minute or the hour field starts with ``*``
  (``*/5 * * * *``, ``0 * * * *``, ``*/10 * * * * *``): they follow real
  elapsed time. Nothing runs in the skipped hour, and the repeated hour runs
  twice (an hourly job runs 23 times on spring-forward day, 25 on fall-back).

All instants returned are timezone-aware UTC datetimes.
"""

from __future__ import annotations

import collections
import datetime as dt
import re
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass

from cronsim import CronSim, CronSimError

from edm_sched.jobs.errors import InvalidCronExpression, InvalidJobConfig

UTC = dt.UTC

ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

_FIELD_HELP = {
    "second": "0-59",
    "minute": "0-59",
    "hour": "0-23",
    "day-of-month": "1-31, L or LW",
    "month": "1-12 or JAN-DEC",
    "day-of-week": "0-7 or SUN-SAT, with # and L",
}
_MAX_EXPR = 200
_TZ_NAME = re.compile(r"^[A-Za-z0-9_+\-]+(/[A-Za-z0-9_+\-]+)*$")
# Occurrences examined by one firing after an outage; beyond it the missed
# count is a lower bound and the next run is computed from now.
SCAN_LIMIT = 100_000


@dataclass(frozen=True)
class CronSchedule:
    """A validated cron expression bound to a time zone."""

    expr: str
    """The expression as cronsim reads it (aliases expanded, spaces normalised)."""
    timezone: str
    fields: int
    """5, or 6 when the first field is seconds."""
    wall_clock: bool
    """True for fixed-time schedules (see the module documentation)."""

    @property
    def tz(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.timezone)

    def describe(self) -> str | None:
        """cronsim's English description (``Every fifth second of every minute``)."""
        try:
            return str(CronSim(self.expr, dt.datetime(2000, 1, 1)).explain())
        except Exception:  # explain() does not cover every expression cronsim accepts
            return None


def load_timezone(name: str) -> zoneinfo.ZoneInfo:
    """The zone called ``name``; InvalidJobConfig when it is not a known IANA name."""
    if not isinstance(name, str) or len(name) > 64 or not _TZ_NAME.match(name) or ".." in name:
        raise InvalidJobConfig(f"invalid time zone name {name!r}")
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise InvalidJobConfig(f"unknown time zone {name!r} (use an IANA name such as "
                               "Europe/Paris)") from None


def parse(expr: str, timezone: str = "UTC") -> CronSchedule:
    """Validate ``expr`` (5 or 6 fields, or an @alias) in ``timezone``.

    Raises InvalidCronExpression with the reason, or InvalidJobConfig for an
    unknown time zone.
    """
    if not isinstance(expr, str):
        raise InvalidCronExpression("the cron expression must be a string")
    if len(expr) > _MAX_EXPR:
        raise InvalidCronExpression(f"the cron expression is longer than {_MAX_EXPR} characters")
    if any(ord(c) < 32 and c not in " \t" for c in expr):
        raise InvalidCronExpression("the cron expression contains control characters")
    text = " ".join(expr.split())
    if not text:
        raise InvalidCronExpression("the cron expression is empty")
    if text.startswith("@"):
        if text.lower() not in ALIASES:
            raise InvalidCronExpression(
                f"unknown alias {text!r}; use one of {', '.join(sorted(ALIASES))}")
        text = ALIASES[text.lower()]
    parts = text.split(" ")
    if len(parts) not in (5, 6):
        raise InvalidCronExpression(
            f"expected 5 fields (minute hour day-of-month month day-of-week) or 6 with "
            f"leading seconds, got {len(parts)} in {text!r}")
    load_timezone(timezone)
    try:
        probe = CronSim(text, dt.datetime.now(UTC).replace(tzinfo=None))
        next(probe)
    except CronSimError as exc:
        reason = str(exc)
        field = reason.removeprefix("Bad ").strip()
        hint = f" (allowed: {_FIELD_HELP[field]}, lists, ranges, steps or *)" \
            if field in _FIELD_HELP else ""
        raise InvalidCronExpression(f"{reason} in {text!r}{hint}") from None
    except StopIteration:
        raise InvalidCronExpression(f"{text!r} never fires in the next 50 years") from None
    six = parts if len(parts) == 6 else ["0", *parts]
    wall_clock = not six[1].startswith("*") and not six[2].startswith("*")
    return CronSchedule(expr=text, timezone=timezone, fields=len(parts), wall_clock=wall_clock)


def _exists(local: dt.datetime) -> bool:
    """True when the aware local time is a real one (not inside a DST gap)."""
    back = local.astimezone(UTC).astimezone(local.tzinfo)
    return back.replace(tzinfo=None) == local.replace(tzinfo=None)


def _resolve_wall(naive: dt.datetime, tz: zoneinfo.ZoneInfo) -> dt.datetime:
    """The instant of wall-clock time ``naive`` under the fixed-time rules."""
    local = naive.replace(tzinfo=tz, fold=0)  # fold=0: the first of a repeated time
    if _exists(local):
        return local.astimezone(UTC)
    # Inside a spring-forward gap: the first whole minute after it.
    probe = naive.replace(second=0, microsecond=0)
    for _ in range(24 * 60):
        probe += dt.timedelta(minutes=1)
        candidate = probe.replace(tzinfo=tz, fold=0)
        if _exists(candidate):
            return candidate.astimezone(UTC)
    raise InvalidJobConfig(f"time zone {tz.key} has a gap longer than a day at {naive}")


def iter_after(schedule: CronSchedule, after: dt.datetime) -> Iterator[dt.datetime]:
    """Occurrences strictly after ``after`` (aware), ascending, as UTC instants."""
    if after.tzinfo is None:
        raise ValueError("iter_after needs an aware datetime")
    tz = schedule.tz
    last = after.astimezone(UTC)
    if schedule.wall_clock:
        start = after.astimezone(tz).replace(tzinfo=None)
        for naive in CronSim(schedule.expr, start):
            instant = _resolve_wall(naive, tz)
            if instant > last:
                last = instant
                yield instant
    else:
        for local in CronSim(schedule.expr, after.astimezone(tz)):
            instant = local.astimezone(UTC)
            if instant > last:
                last = instant
                yield instant


def next_after(schedule: CronSchedule, after: dt.datetime) -> dt.datetime | None:
    """The first occurrence strictly after ``after``; None when there is none."""
    return next(iter_after(schedule, after), None)


def upcoming(schedule: CronSchedule, after: dt.datetime, count: int) -> list[dt.datetime]:
    """The next ``count`` occurrences after ``after``."""
    out: list[dt.datetime] = []
    for t in iter_after(schedule, after):
        out.append(t)
        if len(out) >= count:
            break
    return out


def first_run(schedule: CronSchedule, *, now: dt.datetime, start_at: dt.datetime | None = None,
              end_at: dt.datetime | None = None) -> dt.datetime | None:
    """The first occurrence after ``now`` and at or after ``start_at``, if not after ``end_at``."""
    base = now
    if start_at is not None and start_at > now:
        base = start_at - dt.timedelta(microseconds=1)
    nxt = next_after(schedule, base)
    if nxt is None or (end_at is not None and nxt > end_at):
        return None
    return nxt


@dataclass(frozen=True)
class FirePlan:
    """What one firing of a due job does; the arguments of ``edm.job_fire``."""

    run_times: list[dt.datetime]
    next_run_at: dt.datetime | None
    end_reason: str | None
    queue_all: bool
    missed: int
    missed_first: dt.datetime | None
    missed_last: dt.datetime | None
    scan_truncated: bool = False


def plan_fire(
    schedule: CronSchedule,
    *,
    due: dt.datetime,
    now: dt.datetime,
    policy: str,
    grace_seconds: float,
    end_at: dt.datetime | None = None,
    max_executions: int | None = None,
    run_count: int = 0,
    max_catchup: int = 100,
    scan_limit: int = SCAN_LIMIT,
) -> FirePlan:
    """Decide the runs of a job whose ``next_run_at`` (``due``) has come at ``now``.

    Every occurrence from ``due`` up to ``now`` is examined. Those at most
    ``grace_seconds`` old are on time and always run; older ones are missed
    (the runners were down) and the misfire policy applies: ``run_once`` runs
    the latest missed one unless an on-time run already covers it, ``skip``
    runs none, ``run_all`` runs each (the ``max_catchup`` most recent). The
    next run is the first occurrence after ``now``.
    """
    grace = dt.timedelta(seconds=grace_seconds)
    recent: collections.deque[dt.datetime] = collections.deque(maxlen=max(1, max_catchup))
    evicted: dt.datetime | None = None
    total = 0
    truncated = False
    nxt: dt.datetime | None
    if end_at is not None and due > end_at:
        nxt = None
    else:
        it = iter_after(schedule, due)
        current = due
        while True:
            total += 1
            if len(recent) == recent.maxlen:
                evicted = recent[0]
            recent.append(current)
            candidate = next(it, None)
            if candidate is None or candidate > now or (end_at is not None and candidate > end_at):
                nxt = candidate
                break
            if total >= scan_limit:
                truncated = True
                nxt = next_after(schedule, now)
                break
            current = candidate

    on_time = [t for t in recent if now - t <= grace]
    late_in_window = [t for t in recent if now - t > grace]
    late_total = total - len(on_time)
    runs: list[dt.datetime]
    if late_total == 0:
        runs = on_time
    elif policy == "run_all":
        runs = list(recent)
    elif policy == "run_once":
        runs = on_time if on_time else late_in_window[-1:]
    else:  # skip
        runs = on_time
    queue_all = policy == "run_all" and late_total > 0

    run_set = set(runs)
    missed = total - len(runs)
    missed_first: dt.datetime | None = None
    missed_last: dt.datetime | None = None
    if missed > 0:
        missed_first = due
        not_run = [t for t in recent if t not in run_set]
        missed_last = not_run[-1] if not_run else (evicted or due)

    end_reason: str | None = None
    if max_executions is not None:
        runs = runs[: max(0, max_executions - run_count)]
        if run_count + len(runs) >= max_executions:
            nxt, end_reason = None, "max_executions reached"
    if end_reason is None and nxt is None:
        end_reason = "end_at reached" if end_at is not None else "no further occurrence"
    elif nxt is not None and end_at is not None and nxt > end_at:
        nxt, end_reason = None, "end_at reached"
    return FirePlan(runs, nxt, end_reason, queue_all, missed, missed_first, missed_last, truncated)


__all__ = [
    "ALIASES",
    "CronSchedule",
    "FirePlan",
    "first_run",
    "iter_after",
    "load_timezone",
    "next_after",
    "parse",
    "plan_fire",
    "upcoming",
]
