"""Cron schedules without a database: DST in two zones, seconds, validation, misfire plans."""

from __future__ import annotations

import datetime as dt
import itertools

import pytest

from edm_sched.jobs import schedule
from edm_sched.jobs.errors import InvalidCronExpression, InvalidJobConfig

UTC = dt.UTC


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


def runs(expr: str, tz: str, after: dt.datetime, n: int) -> list[dt.datetime]:
    return schedule.upcoming(schedule.parse(expr, tz), after, n)


# -- DST: a fixed-time daily job at 02:30 -------------------------------------


@pytest.mark.parametrize("expr", ["30 2 * * *", "0 30 2 * * *"])
def test_paris_spring_forward_runs_0230_job_at_0300(expr: str) -> None:
    # 2024-03-31: clocks jump from 02:00 CET to 03:00 CEST; 02:30 does not exist.
    got = runs(expr, "Europe/Paris", utc(2024, 3, 29, 12), 3)
    assert got == [
        utc(2024, 3, 30, 1, 30),  # 02:30 CET
        utc(2024, 3, 31, 1, 0),   # 03:00 CEST, the first instant after the gap
        utc(2024, 4, 1, 0, 30),   # 02:30 CEST
    ]


@pytest.mark.parametrize("expr", ["30 2 * * *", "0 30 2 * * *"])
def test_paris_fall_back_runs_0230_job_once_at_first_occurrence(expr: str) -> None:
    # 2024-10-27: 03:00 CEST becomes 02:00 CET; 02:30 happens twice.
    got = runs(expr, "Europe/Paris", utc(2024, 10, 26, 12), 2)
    assert got == [utc(2024, 10, 27, 0, 30), utc(2024, 10, 28, 1, 30)]  # 02:30 CEST, then CET


@pytest.mark.parametrize("expr", ["30 2 * * *", "0 30 2 * * *"])
def test_new_york_spring_forward_runs_0230_job_at_0300(expr: str) -> None:
    # 2024-03-10: 02:00 EST becomes 03:00 EDT.
    got = runs(expr, "America/New_York", utc(2024, 3, 8, 12), 3)
    assert got == [utc(2024, 3, 9, 7, 30), utc(2024, 3, 10, 7, 0), utc(2024, 3, 11, 6, 30)]


def test_new_york_fall_back_0230_is_unaffected_and_0130_runs_once() -> None:
    # 2024-11-03: 02:00 EDT becomes 01:00 EST; 01:00-02:00 happens twice, 02:30 once.
    assert runs("30 2 * * *", "America/New_York", utc(2024, 11, 2, 12), 2) == [
        utc(2024, 11, 3, 7, 30), utc(2024, 11, 4, 7, 30)]
    assert runs("30 1 * * *", "America/New_York", utc(2024, 11, 2, 12), 2) == [
        utc(2024, 11, 3, 5, 30),  # 01:30 EDT only, not 01:30 EST (06:30 UTC)
        utc(2024, 11, 4, 6, 30)]
    assert runs("0 30 1 * * *", "America/New_York", utc(2024, 11, 2, 12), 2) == [
        utc(2024, 11, 3, 5, 30), utc(2024, 11, 4, 6, 30)]


def test_after_the_first_occurrence_of_a_repeated_time_the_second_is_skipped() -> None:
    sched = schedule.parse("30 1 * * *", "America/New_York")
    # From inside the repeated hour's second pass (01:10 EST), the next run is the next day.
    assert schedule.next_after(sched, utc(2024, 11, 3, 6, 10)) == utc(2024, 11, 4, 6, 30)


@pytest.mark.parametrize(("tz", "spring", "fall"), [
    ("Europe/Paris", dt.date(2024, 3, 31), dt.date(2024, 10, 27)),
    ("America/New_York", dt.date(2024, 3, 10), dt.date(2024, 11, 3)),
])
@pytest.mark.parametrize("expr", ["0 * * * *", "0 0 * * * *"])
def test_hourly_jobs_follow_elapsed_time(tz: str, spring: dt.date, fall: dt.date,
                                         expr: str) -> None:
    from zoneinfo import ZoneInfo

    zone = ZoneInfo(tz)
    sched = schedule.parse(expr, tz)
    assert not sched.wall_clock

    def runs_on(day: dt.date) -> list[dt.datetime]:
        start = dt.datetime.combine(day, dt.time(), zone) - dt.timedelta(microseconds=1)
        out = schedule.upcoming(sched, start, 30)
        return [t for t in out if t.astimezone(zone).date() == day]

    spring_runs, fall_runs = runs_on(spring), runs_on(fall)
    assert len(spring_runs) == 23 and len(fall_runs) == 25
    # Every run is exactly one real hour after the previous one.
    for day_runs in (spring_runs, fall_runs):
        gaps = {b - a for a, b in itertools.pairwise(day_runs)}
        assert gaps == {dt.timedelta(hours=1)}


# -- seconds precision ----------------------------------------------------------


def test_six_field_expressions_have_seconds_precision() -> None:
    assert runs("*/15 * * * * *", "UTC", utc(2026, 1, 1, 12, 0, 7), 4) == [
        utc(2026, 1, 1, 12, 0, 15), utc(2026, 1, 1, 12, 0, 30), utc(2026, 1, 1, 12, 0, 45),
        utc(2026, 1, 1, 12, 1, 0)]
    assert runs("5,35 0 12 * * *", "Europe/Paris", utc(2026, 1, 1), 2) == [
        utc(2026, 1, 1, 11, 0, 5), utc(2026, 1, 1, 11, 0, 35)]
    every = runs("* * * * * *", "America/New_York", utc(2026, 1, 1, 0, 0, 0, ), 3)
    assert every == [utc(2026, 1, 1, 0, 0, 1), utc(2026, 1, 1, 0, 0, 2), utc(2026, 1, 1, 0, 0, 3)]


def test_next_run_is_strictly_after_the_given_instant() -> None:
    sched = schedule.parse("*/5 * * * * *")
    assert schedule.next_after(sched, utc(2026, 1, 1, 0, 0, 5)) == utc(2026, 1, 1, 0, 0, 10)
    just_before = utc(2026, 1, 1, 0, 0, 5) - dt.timedelta(microseconds=1)
    assert schedule.next_after(sched, just_before) == utc(2026, 1, 1, 0, 0, 5)


def test_first_run_respects_start_and_end() -> None:
    sched = schedule.parse("0 9 * * *", "Europe/Paris")
    now = utc(2026, 1, 1)
    assert schedule.first_run(sched, now=now) == utc(2026, 1, 1, 8)
    assert schedule.first_run(sched, now=now, start_at=utc(2026, 1, 5, 8)) == utc(2026, 1, 5, 8)
    assert schedule.first_run(sched, now=now, end_at=utc(2026, 1, 1, 7)) is None


def test_aliases() -> None:
    assert schedule.parse("@daily").expr == "0 0 * * *"
    assert runs("@hourly", "UTC", utc(2026, 1, 1, 0, 30), 1) == [utc(2026, 1, 1, 1)]


# -- validation -------------------------------------------------------------------


@pytest.mark.parametrize(("expr", "reason"), [
    ("", "empty"),
    ("* * * *", "expected 5 fields"),
    ("* * * * * * *", "got 7"),
    ("61 * * * *", "Bad minute"),
    ("* 24 * * *", "Bad hour"),
    ("0 0 31 2 *", "Bad day-of-month"),
    ("0 0 * 13 *", "Bad month"),
    ("0 0 * * MON#6", "Bad day-of-week"),
    ("*/0 * * * *", "Bad minute"),
    ("@often", "unknown alias"),
    ("0 0\n* * *", "control characters"),
])
def test_invalid_expressions_say_why(expr: str, reason: str) -> None:
    with pytest.raises(InvalidCronExpression, match=reason) as info:
        schedule.parse(expr)
    assert info.value.code == "INVALID_CRON_EXPRESSION"


def test_unknown_time_zone_is_a_config_error() -> None:
    with pytest.raises(InvalidJobConfig, match="unknown time zone"):
        schedule.parse("* * * * *", "Mars/Olympus")
    with pytest.raises(InvalidJobConfig, match="invalid time zone"):
        schedule.parse("* * * * *", "../../etc/passwd")


# -- misfire plans ------------------------------------------------------------------


EVERY_10 = schedule.parse("*/10 * * * *")
DUE = utc(2026, 1, 5, 10, 10)
AFTER_OUTAGE = utc(2026, 1, 5, 11, 5, 30)  # occurrences 10:10 ... 11:00 missed (6)


def test_on_time_firing_runs_the_due_occurrence() -> None:
    plan = schedule.plan_fire(EVERY_10, due=DUE, now=DUE + dt.timedelta(seconds=2),
                              policy="skip", grace_seconds=60)
    assert plan.run_times == [DUE] and plan.missed == 0
    assert plan.next_run_at == utc(2026, 1, 5, 10, 20)


@pytest.mark.parametrize(("policy", "runs_", "missed"), [
    ("skip", [], 6),
    ("run_once", [utc(2026, 1, 5, 11, 0)], 5),
    ("run_all", [utc(2026, 1, 5, 10, m) for m in (10, 20, 30, 40, 50)]
     + [utc(2026, 1, 5, 11, 0)], 0),
])
def test_misfire_policies(policy: str, runs_: list[dt.datetime], missed: int) -> None:
    plan = schedule.plan_fire(EVERY_10, due=DUE, now=AFTER_OUTAGE, policy=policy,
                              grace_seconds=60)
    assert plan.run_times == runs_
    assert plan.missed == missed
    assert plan.next_run_at == utc(2026, 1, 5, 11, 10)
    assert plan.queue_all == (policy == "run_all")
    if missed:
        assert plan.missed_first == DUE


def test_grace_keeps_the_recent_occurrence_on_time() -> None:
    now = utc(2026, 1, 5, 11, 0, 30)
    plan = schedule.plan_fire(EVERY_10, due=DUE, now=now, policy="skip", grace_seconds=60)
    assert plan.run_times == [utc(2026, 1, 5, 11, 0)]
    assert plan.missed == 5 and plan.missed_last == utc(2026, 1, 5, 10, 50)


def test_run_all_keeps_the_most_recent_occurrences_up_to_the_cap() -> None:
    plan = schedule.plan_fire(EVERY_10, due=DUE, now=AFTER_OUTAGE, policy="run_all",
                              grace_seconds=60, max_catchup=2)
    assert plan.run_times == [utc(2026, 1, 5, 10, 50), utc(2026, 1, 5, 11, 0)]
    assert plan.missed == 4 and plan.missed_last == utc(2026, 1, 5, 10, 40)


def test_end_and_max_executions_end_the_schedule() -> None:
    plan = schedule.plan_fire(EVERY_10, due=DUE, now=DUE, policy="skip", grace_seconds=60,
                              end_at=utc(2026, 1, 5, 10, 15))
    assert plan.run_times == [DUE] and plan.next_run_at is None
    assert plan.end_reason == "end_at reached"
    plan = schedule.plan_fire(EVERY_10, due=DUE, now=AFTER_OUTAGE, policy="run_all",
                              grace_seconds=60, max_executions=5, run_count=3)
    assert len(plan.run_times) == 2 and plan.next_run_at is None
    assert plan.end_reason == "max_executions reached"


def test_long_outage_of_a_seconds_job_is_bounded() -> None:
    sched = schedule.parse("* * * * * *")
    due = utc(2026, 1, 5)
    plan = schedule.plan_fire(sched, due=due, now=due + dt.timedelta(hours=1), policy="run_all",
                              grace_seconds=0, max_catchup=10)
    assert len(plan.run_times) == 10 and plan.missed == 3601 - 10
    assert plan.next_run_at == due + dt.timedelta(hours=1, seconds=1)
