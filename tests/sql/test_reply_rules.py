"""Reply rules (0017): matching, application in edm.complete, escalation, expiry."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from edm_sched.api import Scheduler
from tests.support.helpers import at, counters_match, make_service, make_task

GMAIL_428 = ("RCPT TO: 421 4.7.28 [192.0.2.1] Our system has detected an unusual rate of"
             " unsolicited mail originating from your IP address.")


@pytest.fixture
def sched(dsn: str) -> Iterator[Scheduler]:
    with Scheduler(dsn) as s:
        yield s


def claim_all(conn: psycopg.Connection[Any], when: dt.datetime, n: int = 100,
              owner: str = "d1") -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute(
        "SELECT subtask_id, service_id, email, attempt FROM edm.claim_v2(%s, %s, 300, %s, %s, 0,"
        " '{}')", (owner, n, when, n)).fetchall()


def complete(conn: psycopg.Connection[Any], when: dt.datetime, ids: list[int], outcome: str,
             code: int | None, detail: str | None, owner: str = "d1") -> list[tuple[Any, ...]]:
    n = len(ids)
    return conn.execute(
        "SELECT subtask_id, accepted, status, reason FROM edm.complete(%s, %s, %s, %s, %s, NULL,"
        " NULL, %s)", (owner, ids, [outcome] * n, [code] * n, [detail] * n, when)).fetchall()


def rule_name(conn: psycopg.Connection[Any], code: int | None, detail: str,
              site: str | None = None) -> str | None:
    row = conn.execute("SELECT r.name FROM edm.reply_rules r"
                       " WHERE r.rule_id = edm.match_reply_rule(%s, %s, %s)",
                       (code, detail, site)).fetchone()
    return None if row is None else row[0]  # type: ignore[no-any-return]


def world(sched: Scheduler, domains: dict[str, int]) -> int:
    """One user, one service without interval, one task per recipient domain."""
    sched.upsert_user("u")
    sid = make_service(sched, "svc", interval=0, users=["u"])
    for i, (domain, n) in enumerate(domains.items()):
        make_task(sched, "u", n, name=f"t{i}", domain=domain)
    return sid


def subtasks(conn: psycopg.Connection[Any], domain: str) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT status, attempts, CASE WHEN not_before > '-infinity' THEN not_before END"
        " FROM edm.subtasks WHERE email LIKE %s"
        " ORDER BY subtask_id", (f"%@{domain}",)).fetchall()


# -- matching -------------------------------------------------------------------


def test_shipped_rules_match_the_providers_replies(conn: psycopg.Connection[Any]) -> None:
    assert rule_name(conn, 421, GMAIL_428) == "gmail-4.7.28-rate"
    assert rule_name(conn, 451, "RCPT TO: 451 4.7.650 The mail server [192.0.2.1] has been"
                     " temporarily rate limited due to IP reputation.") == "microsoft-4.7.650-rate"
    assert rule_name(conn, 451, "RCPT TO: 451 4.7.500 Server busy. Please try again later"
                     ) == "microsoft-4.7.500-busy"
    assert rule_name(conn, 550, "RCPT TO: 550 5.7.606 Access denied, banned sending IP"
                     " [192.0.2.1]") == "microsoft-5.7.6xx-banned-ip"
    assert rule_name(conn, 550, "RCPT TO: 550 5.7.650 something else") is None
    assert rule_name(conn, 421, "MAIL FROM: 421 4.7.0 [TSS04] Messages from 192.0.2.1"
                     " temporarily deferred due to unexpected volume or user complaints"
                     ) == "yahoo-tss-deferred"
    assert rule_name(conn, 421, "RCPT TO: 421 4.7.1 Messages to x@icloud.com deferred due to"
                     " excessive volume. Try again later") == "apple-excessive-volume"
    assert rule_name(conn, None, "[http:429] Too Many Requests") == "http-429"
    assert rule_name(conn, None, "[ses:Throttling] Maximum sending rate exceeded."
                     ) == "ses-max-send-rate"
    assert rule_name(conn, None, "[ses:Throttling] Daily message quota exceeded."
                     ) == "ses-daily-quota"
    assert rule_name(conn, None, "[ses:Throttling] something new") == "ses-throttling"
    # a plain transient failure matches nothing: it stays a retry
    assert rule_name(conn, 451, "RCPT TO: 451 4.3.0 temporary local problem") is None
    # site-specific rules apply to their site only
    comcast = "RCPT TO: 421 Throttled - try again later"
    assert rule_name(conn, 421, comcast, "comcast") == "comcast-throttled"
    assert rule_name(conn, 421, comcast, "google") is None


def test_priority_class_prefix_pattern_site_and_disabling(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SELECT edm.set_reply_rule('any-4.7', 'retry', p_enhanced_code => '4.7.',"
                 " p_priority => 1, p_duration_s => 60)")
    assert rule_name(conn, 421, GMAIL_428) == "any-4.7"
    assert rule_name(conn, 451, "x: 451 4.7.650 y") == "any-4.7"
    assert rule_name(conn, 451, "x: 451 4.2.0 y") is None
    conn.execute("SELECT edm.enable_reply_rule('any-4.7', false)")
    assert rule_name(conn, 421, GMAIL_428) == "gmail-4.7.28-rate"
    conn.execute("SELECT edm.set_reply_rule('google-only', 'bounce', p_pattern => 'UNUSUAL RATE',"
                 " p_site => 'google', p_priority => 2)")
    assert rule_name(conn, 421, GMAIL_428, "google") == "google-only"  # case-insensitive
    assert rule_name(conn, 421, GMAIL_428, "yahoo") == "gmail-4.7.28-rate"
    conn.execute("SELECT edm.delete_reply_rule('google-only')")
    assert rule_name(conn, 421, GMAIL_428, "google") == "gmail-4.7.28-rate"
    # a shipped rule edited becomes the admin's
    conn.execute("SELECT edm.set_reply_rule('gmail-4.7.28-rate', 'suspend_site',"
                 " p_enhanced_code => '4.7.28', p_priority => 10, p_duration_s => 60)")
    row = conn.execute("SELECT source, duration_s FROM edm.reply_rules"
                       " WHERE name = 'gmail-4.7.28-rate'").fetchone()
    assert row == ("admin", 60)


@pytest.mark.parametrize("call", [
    "SELECT edm.set_reply_rule('Bad Name', 'retry', 421, p_duration_s => 1)",
    "SELECT edm.set_reply_rule('r', 'explode', 421, p_duration_s => 1)",
    "SELECT edm.set_reply_rule('r', 'retry', p_duration_s => 1)",  # matches everything
    "SELECT edm.set_reply_rule('r', 'retry', 42, p_duration_s => 1)",
    "SELECT edm.set_reply_rule('r', 'retry', p_enhanced_code => '4.7', p_duration_s => 1)",
    "SELECT edm.set_reply_rule('r', 'retry', p_pattern => '(unclosed', p_duration_s => 1)",
    "SELECT edm.set_reply_rule('r', 'retry', p_transport_code => 'no colon', p_duration_s => 1)",
    "SELECT edm.set_reply_rule('r', 'retry', 421)",  # retry needs a duration
    "SELECT edm.set_reply_rule('r', 'bounce', 421, p_duration_s => 5)",
    "SELECT edm.set_reply_rule('r', 'suspend_site', 421, p_duration_s => 0)",
    "SELECT edm.set_reply_rule('r', 'suspend_site', 421, p_duration_s => 60,"
    " p_max_duration_s => 30)",
    "SELECT edm.set_reply_rule('r', 'suspend_site', 421, p_duration_s => 60,"
    " p_escalation_factor => 0.5)",
])
def test_bad_rules_are_refused_and_nothing_is_written(conn: psycopg.Connection[Any],
                                                      call: str) -> None:
    before = conn.execute("SELECT count(*) FROM edm.reply_rules").fetchone()
    with pytest.raises(psycopg.Error) as err:
        conn.execute(call)
    assert err.value.sqlstate == "ED005", err.value
    assert conn.execute("SELECT count(*) FROM edm.reply_rules").fetchone() == before


def test_unknown_site_or_rule_is_not_found_and_a_broken_pattern_never_gets_in(
        conn: psycopg.Connection[Any]) -> None:
    for call in ("SELECT edm.set_reply_rule('r', 'retry', 421, p_site => 'nosuch',"
                 " p_duration_s => 1)",
                 "SELECT edm.enable_reply_rule('nosuch', false)",
                 "SELECT edm.delete_reply_rule('nosuch')"):
        with pytest.raises(psycopg.Error) as err:
            conn.execute(call)
        assert err.value.sqlstate == "ED001"
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("INSERT INTO edm.reply_rules (name, pattern, action, duration_s)"
                     " VALUES ('direct', '[z-a]', 'retry', 1)")


# -- application in complete ------------------------------------------------------


def test_a_site_throttle_suspends_the_pair_and_spends_nothing(
        sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sid = world(sched, {"gmail.com": 3, "outlook.com": 2})
    rows = claim_all(conn, at(0))
    assert len(rows) == 5
    before = conn.execute("SELECT total_failed, consecutive_failures, backoff_until, sent_today"
                          " FROM edm.services WHERE service_id = %s", (sid,)).fetchone()
    assert before is not None
    gmail = [r["subtask_id"] for r in rows if r["email"].endswith("@gmail.com")]
    others = [r["subtask_id"] for r in rows if not r["email"].endswith("@gmail.com")]
    result = complete(conn, at(1), gmail, "service", 421, GMAIL_428)
    assert {r[1:] for r in result} == {
        (True, "pending", "reply rule gmail-4.7.28-rate: suspend_site google")}
    assert [r[1:3] for r in complete(conn, at(1), others, "sent", 250, None)] == [
        (True, "sent")] * 2
    # the recipients go back in line: no attempt spent, claimable at once
    assert subtasks(conn, "gmail.com") == [("pending", 0, None)] * 3
    # no service failure: statistics and back-off untouched, quota given back
    after = conn.execute("SELECT total_failed, consecutive_failures, backoff_until, sent_today"
                         " FROM edm.services WHERE service_id = %s", (sid,)).fetchone()
    assert after is not None
    assert after[:3] == before[:3] and after[3] == before[3] - 3
    # one suspension, 15 minutes, with the rule and the reply in its reason
    sus = conn.execute("SELECT site, until, level, reason FROM edm.site_suspensions"
                       " WHERE service_id = %s", (sid,)).fetchall()
    assert len(sus) == 1 and sus[0][:3] == ("google", at(1 + 900), 1)
    assert "gmail-4.7.28-rate" in sus[0][3] and "4.7.28" in sus[0][3]
    susp = conn.execute("SELECT edm.suspended_sites(%s, %s)", (sid, at(2))).fetchone()
    assert susp == (["google"],)
    # every application is logged with its reply
    log = conn.execute("SELECT rule_name, site, action, until, level, code, reply"
                       " FROM edm.shaping_actions ORDER BY subtask_id").fetchall()
    assert log == [("gmail-4.7.28-rate", "google", "suspend_site", at(901), 1, 421,
                    GMAIL_428)] * 3
    kinds = conn.execute("SELECT kind, count(*) FROM edm.send_events GROUP BY kind"
                         " ORDER BY kind").fetchall()
    assert kinds == [("sent", 2), ("throttled", 3)]
    view = conn.execute("SELECT site, in_force, level, rule_name, last_code, last_reply"
                        " FROM edm.site_suspension_status").fetchall()
    assert len(view) == 1 and view[0][0] == "google" and view[0][2:] == (
        1, "gmail-4.7.28-rate", 421, GMAIL_428)
    assert counters_match(conn) == []


def test_escalation_repeats_cap_and_reset_after_calm(
        sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    conn.execute("SELECT edm.set_reply_rule('throttle', 'suspend_site', 421, p_priority => 0,"
                 " p_duration_s => 100, p_escalation_factor => 3, p_max_duration_s => 500,"
                 " p_reset_after_s => 1000)")
    sid = world(sched, {"gmail.com": 40})

    def claim(t: float) -> list[int]:
        ids = [r["subtask_id"] for r in claim_all(conn, at(t), n=2)]
        assert ids, t
        return ids

    def throttle(t: float, ids: list[int] | None = None) -> tuple[Any, ...]:
        res = complete(conn, at(t), ids or claim(t), "transient", 421,
                       "RCPT TO: 421 slow down")
        assert all(r[2] == "pending" for r in res)
        row = conn.execute("SELECT level, until FROM edm.site_suspensions"
                           " WHERE service_id = %s AND site = 'google'", (sid,)).fetchone()
        assert row is not None
        return tuple(row)

    under_way = claim(0)  # claimed before the suspension: the claim skips the site after it
    assert throttle(0) == (1, at(100))
    # a reply while the pair is suspended (a send already under way) is no repeat
    assert throttle(50, under_way) == (1, at(100))
    assert throttle(150) == (2, at(150 + 300))
    assert throttle(500) == (3, at(500 + 500))  # 900 capped at 500
    assert throttle(1000) == (4, at(1500))  # ended at 1000 (until is exclusive): a repeat
    # calm for reset_after_s after the end: back to the base duration
    assert throttle(1500 + 1000 + 1) == (1, at(2501 + 100))


def test_unmapped_domain_is_retried_later_without_spending_an_attempt(
        sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sid = world(sched, {"corp.example": 2})
    ids = [r["subtask_id"] for r in claim_all(conn, at(0))]
    res = complete(conn, at(0), ids, "service", 421, GMAIL_428)
    assert {r[3] for r in res} == {
        "reply rule gmail-4.7.28-rate: suspend_site (no site: recipient retried)"}
    assert subtasks(conn, "corp.example") == [("pending", 0, at(900))] * 2
    assert conn.execute("SELECT count(*) FROM edm.site_suspensions").fetchone() == (0,)
    log = conn.execute("SELECT site, until FROM edm.shaping_actions").fetchall()
    assert log == [(None, at(900))] * 2
    svc = conn.execute("SELECT backoff_until, consecutive_failures FROM edm.services"
                       " WHERE service_id = %s", (sid,)).fetchone()
    assert svc == (None, 0)


def test_banned_ip_backs_the_service_off_and_suppresses_nobody(
        sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sid = world(sched, {"outlook.com": 2})
    ids = [r["subtask_id"] for r in claim_all(conn, at(0))]
    reply = "RCPT TO: 550 5.7.606 Access denied, banned sending IP [192.0.2.1]"
    res = complete(conn, at(0), ids, "permanent", 550, reply)
    assert {r[2:] for r in res} == {
        ("pending", "reply rule microsoft-5.7.6xx-banned-ip: suspend_service")}
    svc = conn.execute("SELECT backoff_until, health, last_error, total_failed FROM edm.services"
                       " WHERE service_id = %s", (sid,)).fetchone()
    assert svc is not None and svc[:2] == (at(21600), "backoff") and svc[3] == 0
    assert "5.7.606" in svc[2]
    assert conn.execute("SELECT count(*) FROM edm.suppressions").fetchone() == (0,)
    assert subtasks(conn, "outlook.com") == [("pending", 0, None)] * 2
    log = conn.execute("SELECT DISTINCT action, until FROM edm.shaping_actions").fetchall()
    assert log == [("suspend_service", at(21600))]


def test_bounce_and_retry_rules(sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    conn.execute("SELECT edm.set_reply_rule('full', 'bounce', 452, '4.2.2')")
    conn.execute("SELECT edm.set_reply_rule('later', 'retry', p_pattern => 'come back later',"
                 " p_duration_s => 7200)")
    world(sched, {"a.example": 1, "b.example": 1})
    rows = claim_all(conn, at(0))
    a = [r["subtask_id"] for r in rows if r["email"].endswith("@a.example")]
    b = [r["subtask_id"] for r in rows if r["email"].endswith("@b.example")]
    assert complete(conn, at(0), a, "transient", 452, "RCPT TO: 452 4.2.2 mailbox full"
                    )[0][2:] == ("failed", "reply rule full: bounce")
    assert complete(conn, at(0), b, "transient", 451, "RCPT TO: 451 please come back later"
                    )[0][2:] == ("pending", "reply rule later: retry")
    assert subtasks(conn, "b.example") == [("pending", 1, at(7200))]
    assert conn.execute("SELECT count(*) FROM edm.suppressions").fetchone() == (0,)
    assert counters_match(conn) == []


def test_without_a_matching_rule_nothing_changes(
        sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sid = world(sched, {"gmail.com": 1, "x.example": 1})
    rows = claim_all(conn, at(0))
    ids = [r["subtask_id"] for r in rows]
    res = complete(conn, at(0), ids, "transient", 451, "RCPT TO: 451 4.3.0 local problem")
    assert {r[2:] for r in res} == {("pending", None)}
    assert conn.execute("SELECT count(*) FROM edm.shaping_actions").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM edm.site_suspensions").fetchone() == (0,)
    svc = conn.execute("SELECT total_failed FROM edm.services WHERE service_id = %s",
                       (sid,)).fetchone()
    assert svc == (2,)
    assert conn.execute("SELECT min(attempts) FROM edm.subtasks").fetchone() == (1,)


def test_one_batch_of_many_replies_suspends_each_pair_once(
        sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("u")
    s1 = make_service(sched, "s1", interval=0, users=["u"])
    s2 = make_service(sched, "s2", interval=0, users=["u"])
    make_task(sched, "u", 300, domain="gmail.com")
    make_task(sched, "u", 300, name="y", domain="yahoo.com")
    rows = claim_all(conn, at(0), n=200) + claim_all(conn, at(0), n=200)
    assert {r["service_id"] for r in rows} <= {s1, s2} and len(rows) > 300
    details = [GMAIL_428 if r["email"].endswith("gmail.com") else
               f"MAIL FROM: 421 4.7.0 [TSS04] Messages from 192.0.2.{i % 7} temporarily deferred"
               for i, r in enumerate(rows)]
    n = len(rows)
    res = conn.execute(
        "SELECT count(*) FILTER (WHERE status = 'pending') FROM edm.complete('d1', %s, %s, %s,"
        " %s, NULL, NULL, %s)",
        ([r["subtask_id"] for r in rows], ["service"] * n, [421] * n, details, at(1))).fetchone()
    assert res == (n,)
    pairs = conn.execute("SELECT service_id, site, level FROM edm.site_suspensions"
                         " ORDER BY 1, 2").fetchall()
    expected = sorted({(r["service_id"], "google" if r["email"].endswith("gmail.com") else "yahoo",
                        1) for r in rows})
    assert pairs == expected and len(pairs) >= 2
    assert conn.execute("SELECT count(*) FROM edm.shaping_actions").fetchone() == (n,)
    assert counters_match(conn) == []


def test_lifting_a_suspension_ends_it_and_resets_the_level(
        sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sid = world(sched, {"gmail.com": 4})
    ids = [r["subtask_id"] for r in claim_all(conn, at(0), n=1)]
    complete(conn, at(0), ids, "service", 421, GMAIL_428)
    lifted = conn.execute("SELECT edm.lift_site_suspension(%s, 'google', %s)",
                          (sid, at(10))).fetchone()
    assert lifted == (True,)
    assert conn.execute("SELECT edm.suspended_sites(%s, %s)", (sid, at(11))).fetchone() == ([],)
    assert conn.execute("SELECT edm.lift_site_suspension(%s, 'google', %s)",
                        (sid, at(12))).fetchone() == (False,)
    ids = [r["subtask_id"] for r in claim_all(conn, at(20), n=1)]
    complete(conn, at(20), ids, "service", 421, GMAIL_428)
    row = conn.execute("SELECT level, until FROM edm.site_suspensions").fetchone()
    assert row == (1, at(920))


def test_late_completion_applies_no_rule(sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    world(sched, {"gmail.com": 1})
    ids = [r["subtask_id"] for r in claim_all(conn, at(0))]
    res = complete(conn, at(0), ids, "service", 421, GMAIL_428, owner="intruder")
    assert res[0][1] is False
    assert conn.execute("SELECT count(*) FROM edm.site_suspensions").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM edm.shaping_actions").fetchone() == (0,)
