"""Reply rules on the wire: a real dispatcher, a real SMTP server that throttles one site.

The server (:class:`edm_sched.testing.smtp_sink.Throttle`) answers Gmail's
``421 4.7.28`` to every gmail.com recipient and accepts everything else. The
shipped rule suspends the (service, google) pair; the service's other sites
keep sending, and the throttled recipients wait in pending without having
spent an attempt or counted as a service failure.
"""

from __future__ import annotations

import smtplib
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from edm_sched.api import Scheduler
from edm_sched.testing.smtp_sink import SmtpSink, Throttle, read_log
from tests.support.helpers import counters_match, dispatcher_thread, wait_for


def test_throttle_refuses_the_chosen_domains_from_its_start_every_nth(tmp_path: Path) -> None:
    throttle = Throttle(["gmail.com"], every=2, active=False)
    log = tmp_path / "sink.jsonl"
    with SmtpSink(rules=throttle, log_path=log, log_refused=True) as sink, \
            smtplib.SMTP("127.0.0.1", sink.port) as client:
        client.ehlo()

        def rcpt(to: str) -> int:
            client.mail("s@x.example")
            code = client.rcpt(to)[0]
            client.rset()
            return code

        assert rcpt("a@gmail.com") == 250  # off
        throttle.start_after(0.2)
        assert rcpt("b@gmail.com") == 250  # not yet
        time.sleep(0.25)
        assert [rcpt(f"{i}@GMail.com") for i in range(4)] == [421, 250, 421, 250]
        assert rcpt("c@outlook.com") == 250
        throttle.off()
        assert rcpt("d@gmail.com") == 250
        assert (throttle.throttled, throttle.seen) == (2, 4)
        assert throttle.first_throttled_at is not None
        assert [r.code for r in sink.refused] == [421, 421]
    logged = read_log(log)
    assert [r.code for r in logged] == [421, 421]  # RCPT refusals; nothing reached DATA
    with pytest.raises(ValueError):
        Throttle([], every=1)
    with pytest.raises(ValueError):
        Throttle(["x.example"], (250, "ok"))


@pytest.mark.slow
def test_a_throttled_site_is_suspended_while_the_other_sites_keep_sending(
        dsn: str, conn: psycopg.Connection[Any], tmp_path: Path) -> None:
    throttle = Throttle(["gmail.com"])
    with SmtpSink(rules=throttle, log_path=tmp_path / "sink.jsonl", log_refused=True) as sink, \
            Scheduler(dsn) as s:
        s.upsert_user("u")
        sid = s.create_service({
            "name": "pool", "from_addresses": ["pool@sender.example"], "interval_seconds": 0.02,
            "daily_quota": 100_000, "transport": "smtp",
            "settings": {"host": "127.0.0.1", "port": sink.port, "security": "none"}})
        s.grant(sid, "u")
        domains = {"gmail.com": 8, "outlook.com": 12, "corp.example": 12}
        for domain, n in domains.items():
            s.create_task({"user_id": "u", "name": domain,
                           "templates": [{"subject": "Hi", "body_text": "x"}],
                           "recipients": [{"email": f"r{i}@{domain}"} for i in range(n)]})
        with dispatcher_thread(dsn) as th:
            try:
                wait_for(lambda: len(sink.received) >= 24 and throttle.throttled >= 1,
                         timeout=150)
            except AssertionError:
                state = conn.execute("SELECT status, count(*) FROM edm.subtasks GROUP BY 1"
                                     " ORDER BY 1").fetchall()
                raise AssertionError(
                    f"received {len(sink.received)}, refused {len(sink.refused)}, throttled "
                    f"{throttle.throttled}, dispatcher alive {th.is_alive()}, subtasks {state}, "
                    f"services {s.get_service(sid)}") from None
        assert not th.is_alive()
        received = sink.received
        # the other sites all went out; gmail.com got nothing but refusals
        assert sorted(r.recipient.rpartition("@")[2] for r in received) == (
            ["corp.example"] * 12 + ["outlook.com"] * 12)
        assert throttle.throttled >= 1
        # the pair is suspended by the shipped rule, with the reply in its reason
        (sus,) = s.suspensions(sid)
        assert (sus.site, sus.level, sus.in_force, sus.rule_name, sus.last_code) == (
            "google", 1, True, "gmail-4.7.28-rate", 421)
        assert "4.7.28" in sus.reason and sus.last_reply is not None
        assert "RCPT TO: 421 4.7.28" in sus.last_reply
        # every throttled send is in the action log; none spent an attempt or a failure
        actions = s.shaping_actions(sid, limit=1000)
        assert actions and {(a.action, a.site) for a in actions} == {("suspend_site", "google")}
        rows = conn.execute("SELECT status, attempts FROM edm.subtasks"
                            " WHERE email LIKE '%%@gmail.com'").fetchall()
        assert rows == [("pending", 0)] * 8
        svc = conn.execute("SELECT total_failed, consecutive_failures, health"
                           " FROM edm.services WHERE service_id = %s", (sid,)).fetchone()
        assert svc == (0, 0, "healthy")
        throttled = conn.execute("SELECT count(*) FROM edm.send_events WHERE kind = 'throttled'"
                                 ).fetchone()
        assert throttled is not None and throttled[0] == len(actions)
        assert counters_match(conn) == []


@pytest.mark.slow
def test_sends_queued_for_a_site_just_suspended_are_handed_back_not_sent(
        dsn: str, conn: psycopg.Connection[Any], tmp_path: Path) -> None:
    # One slot a second, claimed up to 5 s ahead: the lane holds several gmail.com
    # sends at once, and the first one's refusal comes back long before the second's slot.
    conn.execute("SELECT edm.config_set('queue.slot_lookahead_ms', '5000')")
    throttle = Throttle(["gmail.com"])
    with SmtpSink(rules=throttle, log_path=tmp_path / "sink.jsonl", log_refused=True) as sink, \
            Scheduler(dsn) as s:
        s.upsert_user("u")
        sid = s.create_service({
            "name": "slow", "from_addresses": ["slow@sender.example"], "interval_seconds": 1.0,
            "daily_quota": 100_000, "transport": "smtp",
            "settings": {"host": "127.0.0.1", "port": sink.port, "security": "none"}})
        s.grant(sid, "u")
        s.create_task({"user_id": "u", "name": "gmail",
                       "templates": [{"subject": "Hi", "body_text": "x"}],
                       "recipients": [{"email": f"r{i}@gmail.com"} for i in range(6)]})

        def released() -> list[tuple[Any, ...]]:
            return conn.execute("SELECT subtask_id, detail FROM edm.send_events"
                                " WHERE kind = 'released' ORDER BY subtask_id").fetchall()
        with dispatcher_thread(dsn) as th:
            wait_for(lambda: throttle.throttled >= 1 and len(released()) >= 1, timeout=60)
            time.sleep(2.5)  # two more slots of the service: nothing else may reach the server
        assert not th.is_alive()
        assert throttle.throttled == 1, [r.recipient for r in sink.refused]
        assert sink.received == []
        events = released()
        assert events and all("site google is suspended" in str(d) for _, d in events)
        # handed back: pending, no attempt spent, and the claim leaves them alone
        rows = conn.execute("SELECT status, attempts FROM edm.subtasks ORDER BY subtask_id"
                            ).fetchall()
        assert rows == [("pending", 0)] * 6
        assert counters_match(conn) == []


def test_the_site_a_completion_reason_names() -> None:
    from edm_sched.dispatcher import _suspended_site

    assert _suspended_site("reply rule gmail-4.7.28-rate: suspend_site google") == "google"
    assert _suspended_site("reply rule ops:custom: suspend_site mail.ru") == "mail.ru"
    assert _suspended_site("reply rule x: suspend_site (no site: recipient retried)") is None
    assert _suspended_site("reply rule x: suspend_service") is None
    assert _suspended_site("lease expired") is None
    assert _suspended_site(None) is None
