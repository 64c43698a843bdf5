"""Limits on the wire: the limits benchmark at test size, judged by the SMTP server's log.

Two real dispatcher processes send through a real :class:`SmtpSink` for the
services of ``benchmarks/limits.py`` (an interval, a rate with a burst, a per
minute rate, a calendar-day limit and a rolling 24-hour limit that bind
during the run), with more backlog than the run can send. Every limit is
recomputed from the server's own transaction-start times (the time it read
MAIL FROM, ``Received.mail_from_at``) for every transaction that reached it,
and must hold within the 5 ms tolerance of issue 14; the smallest gap of an
interval service must be at least its interval minus 5 ms.

The scenario runs as its own process (tests never import benchmarks/); the
small tests first show that the sink records what the checks rely on and that
the dispatcher's clock map keeps the tightest bound.
"""

from __future__ import annotations

import datetime as dt
import json
import smtplib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from edm_sched.dispatcher import ClockMap
from edm_sched.testing.smtp_sink import Received, SmtpSink

ROOT = Path(__file__).resolve().parents[2]

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
def limits_run(edm_pg_server: Any) -> dict[str, Any]:
    """One short run of the scenario (``python -m benchmarks limits``, as its own process:
    tests never import benchmarks/), in a database of its own on the session's server,
    shared by the tests below."""
    dsn = edm_pg_server.dsn(edm_pg_server.maintenance_dbname)
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "limits", "--json",
                           "--seconds", "25", "--dsn", dsn], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    print(proc.stdout[-4000:])  # the report, shown when a test fails (or with -s)
    assert proc.stdout.strip(), proc.stderr[-4000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


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
def test_every_limit_holds_on_the_wire(limits_run: dict[str, Any]) -> None:
    """Lanes pace from the provider's acknowledgement of each start (edm_sched/lanes.py):
    whatever the jitter of this busy machine, no start comes early as the server saw it
    by more than the 5 ms pace tolerance."""
    assert limits_run["limit_violations"] == 0, limits_run["violations_by_limit"]
    assert limits_run["min_gap_slack_ms"] >= -5.0
