"""Limits on the wire: the limits benchmark at test size, judged by the SMTP server's log.

Two real dispatcher processes send through a real :class:`SmtpSink` for the
services of ``benchmarks/limits.py`` (an interval, a rate with a burst, a per
minute rate, a calendar-day limit and a rolling 24-hour limit that bind
during the run), with more backlog than the run can send. Every limit is
recomputed from the server's own transaction-start times (the time it read
MAIL FROM, ``Received.mail_from_at``) for every transaction that reached it,
and must hold within the 5 ms tolerance of issue 14; the smallest gap of an
interval service must be at least its interval minus 5 ms.

The small tests first show that the sink records what the checks rely on and
that each check does catch a violation.
"""

from __future__ import annotations

import datetime as dt
import os
import smtplib
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from benchmarks import limits
from edm_sched.dispatcher import ClockMap
from edm_sched.migrations import migrate
from edm_sched.smtp_sink import Received, SmtpSink

# -- the sink's transaction-start times -------------------------------------------------


def test_sink_records_mail_from_time_and_refusals() -> None:
    def rule(rcpt: str) -> tuple[int, str] | None:
        return (451, "4.7.1 later") if rcpt.startswith("later") else None

    with SmtpSink(rules=rule) as sink, smtplib.SMTP("127.0.0.1", sink.port) as client:
        before = time.time()
        client.sendmail("a@sender.example", ["ok@rcpt.example"], b"Subject: x\r\n\r\nbody\r\n")
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("a@sender.example", ["later@rcpt.example"], b"Subject: y\r\n\r\nb\r\n")
        after = time.time()
        received, refused = sink.received, sink.refused
    [ok] = received
    assert ok.mail_from_at is not None and before <= ok.mail_from_at <= ok.received_at <= after
    assert ok.code == 250 and ok.sender == "a@sender.example"
    [no] = refused
    assert no.recipient == "later@rcpt.example" and no.code == 451
    assert no.mail_from_at is not None and ok.received_at <= no.mail_from_at <= after
    # the JSON Lines form keeps the new fields, and old lines still load
    assert Received.from_dict({**no.__dict__}) == no
    assert Received.from_dict({"received_at": 1.0, "recipient": "r", "message_id": None,
                               "service": None}).mail_from_at is None


# -- the checks can fail ----------------------------------------------------------------


def test_gcra_check_is_a_token_bucket() -> None:
    # 20 per second, burst 5: five at once, then one every 50 ms, conforms ...
    ok = [0.0] * 5 + [0.05 * k for k in range(1, 40)]
    assert limits.gcra_check(ok, 20, 1.0, 5, 0.005)[0] == 0
    # ... a sixth at once does not, nor does a start 10 ms early in the steady state
    assert limits.gcra_check([0.0] * 6, 20, 1.0, 5, 0.005)[0] == 1
    early = [*ok[:20], ok[20] - 0.010, *ok[21:]]
    assert limits.gcra_check(early, 20, 1.0, 5, 0.005)[0] == 1
    # burst 1: 2 s apart, within the tolerance; the tolerance is not a rate allowance
    # (always 4 ms early adds up: the third start is 8 ms ahead of its time)
    assert limits.gcra_check([0.0, 1.996, 3.996], 30, 60.0, 1, 0.005)[0] == 0
    assert limits.gcra_check([0.0, 1.996, 3.992], 30, 60.0, 1, 0.005)[0] == 1
    assert limits.gcra_check([0.0, 1.990], 30, 60.0, 1, 0.005)[0] == 1


def test_window_and_day_checks_count_exactly() -> None:
    times = [float(k) for k in range(10)]
    assert limits.window_check(times, 10, 100.0) == (0, 10)
    assert limits.window_check(times, 9, 100.0) == (1, 10)
    assert limits.window_check(times, 5, 5.0) == (0, 5)  # windows (t - 5, t]
    noon = 1_765_022_400.0  # 2025-12-06 12:00 UTC
    assert limits.day_check([noon, noon + 1, noon + 2], 2, "UTC") == (1, 3)
    assert limits.day_check([noon, noon + 43_200], 1, "UTC") == (0, 1)  # next midnight
    d = limits.ServiceDef("s", 100)
    checks, slack = limits.check_service(d, [0.0, 0.1, 0.194], 0.3, "UTC", 1000, 0.005)
    assert slack is not None and abs(slack + 0.006) < 1e-9
    assert [c.violations for c in checks if c.limit == "interval"] == [1]


# -- the dispatcher's clock map ----------------------------------------------------------


def test_clock_map_keeps_the_tightest_recent_bound() -> None:
    base = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    clock = ClockMap(keep=4, max_age=5.0, reset=0.5)
    # replies read 30, 2 and 12 ms after the database stamped them (true offset 100 s)
    for m, delay in ((100.030, 0.030), (101.002, 0.002), (102.012, 0.012)):
        clock.observe(m, base + dt.timedelta(seconds=m - 100.0 - delay))
    slot = base + dt.timedelta(seconds=5)
    # mapped with the fastest reply: 2 ms late, not 12 (the reply at hand) or 30
    assert abs(clock.monotonic(slot) - 105.002) < 1e-6
    # never early: every bound is >= the true offset
    assert clock.monotonic(slot) >= 105.0
    # the 2 ms sample ages out (max_age 5 s): the tightest left is 10 ms ...
    clock.observe(106.5, base + dt.timedelta(seconds=6.49))
    assert abs(clock.monotonic(base) - 100.010) < 1e-6
    # ... and a database clock stepped back (a bound 1.1 s above) restarts the estimate
    clock.observe(107.0, base + dt.timedelta(seconds=5.9))
    assert abs(clock.monotonic(base) - 101.1) < 1e-6


# -- the scenario -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def limits_run(edm_pg_server: Any) -> Iterator[dict[str, Any]]:
    """One short run of the scenario in a database of its own, shared by the tests below."""
    name = f"edm_limits_{os.getpid()}"
    admin = edm_pg_server.dsn(edm_pg_server.maintenance_dbname)
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        dsn = edm_pg_server.dsn(name)
        migrate(dsn)
        result = limits.run_scenario(dsn, limits.short_config(25.0))
        limits.print_report(result, 5.0)  # shown when a test fails (or with -s)
        yield result
    finally:
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                      .format(sql.Identifier(name)))


@pytest.mark.slow
def test_every_service_saturated_and_the_day_and_rolling_limits_bind(
        limits_run: dict[str, Any]) -> None:
    result = limits_run
    assert not result["unclean_stops"]
    assert result["pending_at_stop"] > 0  # every service had work to the end
    assert result["wire_without_mail_time"] == result["wire_unknown_sender"] == 0
    assert result["unmatched_wire"] == result["unmatched_db"] == 0
    assert result["transactions"] > 500
    util = result["utilisation_by_service"]
    assert util["calday"]["binding_limit"] == "per_day"
    assert util["rolling24h"]["binding_limit"] == "rolling_24h"
    # counted on the wire, the day and rolling limits hold exactly and were used up
    assert util["calday"]["starts"] == util["calday"]["allowed"]
    assert util["rolling24h"]["starts"] == util["rolling24h"]["allowed"]
    assert not {k for k in result["violations_by_limit"]
                if k.endswith(("/per_day", "/rolling_24h", "/daily_quota"))}


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "issue 14 point 2 does not hold yet: a service claimed while idle gets the claim's "
    "now() as its first slot, already in the past when the dispatcher receives it (the "
    "first claim of a session takes ~70 ms), so its first send goes late and the next "
    "slot, an interval later on the database's clock, lands less than an interval after "
    "it on the wire; and on a machine short of CPU, single starts go 5-30 ms late; "
    "see docs/performance.md, 'Limits on the wire'"))
def test_every_limit_holds_on_the_wire(limits_run: dict[str, Any]) -> None:
    assert limits_run["limit_violations"] == 0, limits_run["violations_by_limit"]
    assert limits_run["min_gap_slack_ms"] >= -5.0
