"""Feedback intake (issue 16): edm.record_feedback found by Message-ID, and the
parsers of RFC 3464 DSNs, RFC 5965 ARF reports and the webhooks of Amazon SES (via
SNS, signature checked against a real self-signed certificate), SendGrid, Mailgun
(HMAC) and Postmark, fed payloads written after the providers' public docs."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from edm_sched import errors, feedback
from edm_sched.api import Scheduler
from edm_sched.feedback import FeedbackEvent, InvalidFeedback
from tests.support.helpers import T0, at, claim, complete, counters_match, make_service


@pytest.fixture
def world(dsn: str, conn: psycopg.Connection[Any]) -> Iterator[dict[str, Any]]:
    """u1 sent one task to ann, bob and cat; u1 and u2 each have a pending task to ann."""
    with Scheduler(dsn) as s:
        for u in ("u1", "u2"):
            s.upsert_user(u, quota_limit=100)
        make_service(s, "svc", interval=0, users=["u1", "u2"])
        s.upsert_contacts("u1", [{"email": "ann@rcpt.example"}])
        spec = {"user_id": "u1", "name": "sent", "scheduled_at": T0,
                "templates": [{"subject": "s", "body_text": "b"}],
                "recipients": [{"email": f"{n}@rcpt.example"} for n in ("ann", "bob", "cat")]}
        sent = s.create_task(spec).task_id
        while rows := claim(conn, at(1), batch=1):
            complete(conn, at(1), [r["subtask_id"] for r in rows])
        pending = {u: s.create_task({**spec, "user_id": u, "name": "later",
                                     "scheduled_at": at(86400)}).task_id for u in ("u1", "u2")}
        ids = dict(conn.execute("SELECT email, subtask_id FROM edm.subtasks WHERE task_id = %s",
                                (sent,)).fetchall())
        mids = {e.split("@")[0]: f"<edm.{sent}.{i}@sender.example>" for e, i in ids.items()}
        yield {"s": s, "conn": conn, "dsn": dsn, "sent": sent, "pending": pending, "mid": mids}


def suppressions(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT user_id, email, reason FROM edm.suppressions"
                        " ORDER BY email, user_id NULLS FIRST").fetchall()


# ------------------------------------------------------------------ the record API


def test_a_hard_bounce_suppresses_for_everyone(world: dict[str, Any]) -> None:
    conn = world["conn"]
    got = feedback.record(world["dsn"], FeedbackEvent(
        "hard_bounce", world["mid"]["ann"], source="dsn", raw="the DSN", detail="5.1.1"))
    assert (got.duplicate, got.suppressed, got.cancelled) == (False, True, 2)
    assert got.subtask_id is not None
    assert suppressions(conn) == [(None, "ann@rcpt.example", "hard_bounce")]
    row = conn.execute("SELECT kind, recipient, task_id, user_id, service_id, raw, detail"
                       " FROM edm.feedback_events").fetchone()
    assert row == ("hard_bounce", "ann@rcpt.example", world["sent"], "u1", 1, "the DSN", "5.1.1")
    for task in world["pending"].values():  # both users' pending mail to ann: cancelled
        st = world["s"].get_task(task)
        assert (st.pending_count, st.cancelled_count) == (2, 1)
    assert counters_match(conn) == []


def test_a_complaint_suppresses_for_the_user_only(world: dict[str, Any]) -> None:
    conn, s = world["conn"], world["s"]
    got = feedback.record(conn, FeedbackEvent("complaint", world["mid"]["ann"], source="arf"))
    assert (got.suppressed, got.cancelled) == (True, 1)
    assert suppressions(conn) == [("u1", "ann@rcpt.example", "complaint")]
    assert conn.execute("SELECT unsubscribed FROM edm.contacts").fetchall() == [(True,)]
    assert s.get_task(world["pending"]["u2"]).pending_count == 3


def test_unsubscribe_soft_bounce_and_delivery(world: dict[str, Any]) -> None:
    conn = world["conn"]
    assert feedback.record(conn, FeedbackEvent("unsubscribe", world["mid"]["bob"])).suppressed
    for kind in ("soft_bounce", "delivered"):
        got = feedback.record(conn, FeedbackEvent(kind, world["mid"]["cat"]))  # type: ignore[arg-type]
        assert (got.suppressed, got.cancelled) == (False, 0)
    assert suppressions(conn) == [("u1", "bob@rcpt.example", "unsubscribe")]


def test_a_repeated_webhook_is_recorded_once(world: dict[str, Any]) -> None:
    event = FeedbackEvent("hard_bounce", world["mid"]["ann"], source="sendgrid", event_key="ev-1")
    first, again = feedback.record_many(world["conn"], [event, event])
    assert (first.duplicate, again.duplicate, again.event_id) == (False, True, first.event_id)
    assert world["conn"].execute("SELECT count(*) FROM edm.feedback_events").fetchone() == (1,)


def test_unknown_message_ids(world: dict[str, Any]) -> None:
    conn = world["conn"]
    with pytest.raises(errors.NotFound):
        feedback.record(conn, FeedbackEvent("hard_bounce", "<other@elsewhere.example>"))
    with pytest.raises(errors.NotFound):  # a well-formed id of a subtask that is not there
        feedback.record(conn, FeedbackEvent("hard_bounce", "<edm.999.999@x.example>"))
    with pytest.raises(errors.InvalidInput):
        feedback.record(conn, FeedbackEvent("bounced", world["mid"]["ann"]))  # type: ignore[arg-type]
    assert conn.execute("SELECT count(*) FROM edm.feedback_events").fetchone() == (0,)
    # with the recipient, the event is kept and a hard bounce still suppresses
    got = feedback.record(conn, FeedbackEvent("hard_bounce", "<x@esp.example>",
                                              recipient="Zed@Rcpt.example"))
    assert (got.subtask_id, got.suppressed) == (None, True)
    assert suppressions(conn) == [(None, "zed@rcpt.example", "hard_bounce")]


# ------------------------------------------------------------------- RFC 3464


def dsn(message_id: str) -> bytes:
    """After RFC 3464 appendix A (a failure and a delay in one report)."""
    return f"""\
From: Mail Delivery Subsystem <MAILER-DAEMON@mx.rcpt.example>
To: bounces@sender.example
Subject: Delivery Status Notification (Failure)
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
  boundary="RAA14128.773615765/CS.UTK.EDU"

--RAA14128.773615765/CS.UTK.EDU
Content-Type: text/plain

The original message was received but could not be delivered to some recipients.

--RAA14128.773615765/CS.UTK.EDU
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.rcpt.example
Arrival-Date: Wed, 29 Apr 2026 16:19:11 -0400

Final-Recipient: rfc822; ann@rcpt.example
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 <ann@rcpt.example>... User unknown
Last-Attempt-Date: Wed, 29 Apr 2026 16:19:20 -0400

Original-Recipient: rfc822;bob@rcpt.example
Final-Recipient: rfc822; bob@rcpt.example
Action: delayed
Status: 4.4.7
Diagnostic-Code: smtp; 451 4.4.7 mailbox
  temporarily unavailable
Will-Retry-Until: Fri, 1 May 2026 16:19:11 -0400

Final-Recipient: rfc822; cat@rcpt.example
Action: failed
Status: 5.2.2
Diagnostic-Code: smtp; 552 5.2.2 Mailbox full

--RAA14128.773615765/CS.UTK.EDU
Content-Type: text/rfc822-headers

From: news@sender.example
To: ann@rcpt.example
Subject: Spring sale
Message-ID: {message_id}

--RAA14128.773615765/CS.UTK.EDU--
""".replace("\n", "\r\n").encode()


def test_rfc_3464_delivery_status_notifications(world: dict[str, Any]) -> None:
    events = feedback.parse_dsn(dsn(world["mid"]["ann"]))
    assert [(e.kind, e.recipient) for e in events] == [
        ("hard_bounce", "ann@rcpt.example"), ("soft_bounce", "bob@rcpt.example"),
        ("soft_bounce", "cat@rcpt.example")]  # mailbox full: the address is kept
    assert {e.message_id for e in events} == {world["mid"]["ann"]}
    assert events[0].detail is not None and "User unknown" in events[0].detail
    assert events[1].detail is not None and "temporarily unavailable" in events[1].detail
    assert events[0].occurred_at == dt.datetime(2026, 4, 29, 20, 19, 20, tzinfo=dt.UTC)
    feedback.record_many(world["dsn"], events)
    assert suppressions(world["conn"]) == [(None, "ann@rcpt.example", "hard_bounce")]
    assert world["conn"].execute("SELECT DISTINCT raw FROM edm.feedback_events").fetchone() == (
        dsn(world["mid"]["ann"]).decode(),)
    with pytest.raises(InvalidFeedback):
        feedback.parse_dsn(b"From: a@b.example\r\nSubject: hi\r\n\r\nnot a report\r\n")


# ------------------------------------------------------------------- RFC 5965


def arf(message_id: str, feedback_type: str = "abuse") -> str:
    """After RFC 5965 appendix B.2."""
    return f"""\
From: <abusedesk@mailbox.example>
Date: Thu, 8 Mar 2026 14:00:00 EDT
Subject: FW: Spring sale
To: <fbl@sender.example>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report;
     boundary="part1_13d.2e68ed54_boundary"

--part1_13d.2e68ed54_boundary
Content-Type: text/plain; charset="US-ASCII"
Content-Transfer-Encoding: 7bit

This is an email abuse report for an email message received from IP
192.0.2.1 on Thu, 8 Mar 2026 14:00:00 EDT.

--part1_13d.2e68ed54_boundary
Content-Type: message/feedback-report

Feedback-Type: {feedback_type}
User-Agent: SomeGenerator/1.0
Version: 1
Original-Mail-From: <bounces@sender.example>
Original-Rcpt-To: <bob@rcpt.example>
Arrival-Date: Thu, 8 Mar 2026 14:00:00 EDT
Source-IP: 192.0.2.1
Reported-Domain: sender.example

--part1_13d.2e68ed54_boundary
Content-Type: message/rfc822
Content-Disposition: inline

From: <news@sender.example>
Received: from mailserver.example by mailbox.example; Thu, 8 Mar 2026 13:59:00 EDT
To: Undisclosed Recipients
Subject: Spring sale
Message-ID: {message_id}
Date: Thu, 8 Mar 2026 13:58:00 EDT

Buy now!

--part1_13d.2e68ed54_boundary--
"""


def test_rfc_5965_abuse_reports(world: dict[str, Any]) -> None:
    (event,) = feedback.parse_arf(arf(world["mid"]["bob"]))
    assert (event.kind, event.recipient, event.message_id, event.source) == (
        "complaint", "bob@rcpt.example", world["mid"]["bob"], "arf")
    assert event.detail == "feedback-type abuse"
    assert feedback.parse_arf(arf(world["mid"]["bob"], "not-spam")) == []
    feedback.record(world["dsn"], event)
    assert suppressions(world["conn"]) == [("u1", "bob@rcpt.example", "complaint")]


# --------------------------------------------------------- Amazon SES via SNS


@pytest.fixture(scope="module")
def sns_signer() -> dict[str, Any]:
    """A self-signed certificate standing in for the one SNS publishes."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30)).sign(key, hashes.SHA256()))
    return {"key": key, "pem": cert.public_bytes(serialization.Encoding.PEM)}


CERT_URL = "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-0000000000.pem"


def sns(signer: dict[str, Any], message: dict[str, Any], *, version: str = "2",
        cert_url: str = CERT_URL) -> dict[str, Any]:
    """An SNS HTTP(S) notification, after the SNS developer guide."""
    body = {"Type": "Notification", "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
            "TopicArn": "arn:aws:sns:us-east-1:123456789012:ses-feedback",
            "Message": json.dumps(message), "Timestamp": "2026-05-01T00:00:00.000Z",
            "SignatureVersion": version, "SigningCertURL": cert_url,
            "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe"}
    signed = "".join(f"{k}\n{body[k]}\n" for k in ("Message", "MessageId", "Timestamp",
                                                    "TopicArn", "Type")).encode()
    algorithm = hashes.SHA1() if version == "1" else hashes.SHA256()
    body["Signature"] = base64.b64encode(
        signer["key"].sign(signed, padding.PKCS1v15(), algorithm)).decode()
    return body


def ses_bounce(message_id: str) -> dict[str, Any]:
    """After the SES developer guide, "Amazon SES notification examples"."""
    return {
        "notificationType": "Bounce",
        "bounce": {"bounceType": "Permanent", "bounceSubType": "General",
                   "bouncedRecipients": [{"emailAddress": "cat@rcpt.example", "action": "failed",
                                          "status": "5.1.1",
                                          "diagnosticCode": "smtp; 550 5.1.1 user unknown"}],
                   "timestamp": "2026-05-01T00:00:01.000Z",
                   "feedbackId": "00000137860315fd-869464a4-8680-4114-98d3-716fe35851f9-000000",
                   "reportingMTA": "dsn; a8-70.smtp-out.amazonses.com"},
        "mail": {"timestamp": "2026-05-01T00:00:00.000Z", "source": "news@sender.example",
                 "messageId": "00000137860315fd-34208509-5b74-41f3-95c5-22c1edc3c924-000000",
                 "destination": ["cat@rcpt.example"], "headersTruncated": False,
                 "headers": [{"name": "From", "value": "news@sender.example"},
                             {"name": "Message-ID", "value": message_id}],
                 "commonHeaders": {"from": ["news@sender.example"], "messageId": message_id}}}


def test_amazon_ses_through_sns(world: dict[str, Any], sns_signer: dict[str, Any]) -> None:
    fetched: list[str] = []

    def fetch(url: str) -> bytes:
        fetched.append(url)
        return bytes(sns_signer["pem"])

    for version in ("1", "2"):
        body = json.dumps(sns(sns_signer, ses_bounce(world["mid"]["cat"]), version=version))
        (event,) = feedback.parse_ses_sns(body, fetch=fetch)
        assert (event.kind, event.recipient, event.message_id, event.source) == (
            "hard_bounce", "cat@rcpt.example", world["mid"]["cat"], "ses")
    assert fetched == [CERT_URL, CERT_URL]
    feedback.record(world["dsn"], event)
    feedback.record(world["dsn"], event)  # SNS retries: one event
    assert world["conn"].execute("SELECT count(*) FROM edm.feedback_events").fetchone() == (1,)
    assert suppressions(world["conn"]) == [(None, "cat@rcpt.example", "hard_bounce")]

    tampered = sns(sns_signer, ses_bounce(world["mid"]["cat"]))
    tampered["Message"] = tampered["Message"].replace("cat@", "dog@")
    with pytest.raises(InvalidFeedback, match="signature"):
        feedback.parse_ses_sns(json.dumps(tampered), fetch=fetch)
    for url in ("https://evil.example/cert.pem", "http://sns.us-east-1.amazonaws.com/c.pem",
                "https://sns.us-east-1.amazonaws.com.evil.example/c.pem"):
        with pytest.raises(InvalidFeedback, match="host"):
            feedback.parse_ses_sns(json.dumps(sns(sns_signer, ses_bounce("x"), cert_url=url)),
                                   fetch=fetch)
    assert fetched == [CERT_URL, CERT_URL, CERT_URL]  # foreign hosts never fetched


def test_ses_complaints_and_deliveries(world: dict[str, Any]) -> None:
    mail = ses_bounce(world["mid"]["ann"])["mail"]
    complaint = {"notificationType": "Complaint", "mail": mail, "complaint": {
        "userAgent": "AnyCompany Feedback Loop (V0.01)", "complaintFeedbackType": "abuse",
        "complainedRecipients": [{"emailAddress": "ann@rcpt.example"}],
        "timestamp": "2026-05-01T00:00:02.000Z",
        "feedbackId": "000001378603177f-18c07c78-fa81-4a58-9dd1-fedc3cb8f49a-000000"}}
    delivery = {"eventType": "Delivery", "mail": mail, "delivery": {
        "timestamp": "2026-05-01T00:00:01.000Z", "processingTimeMillis": 546,
        "recipients": ["ann@rcpt.example"], "smtpResponse": "250 ok: Message 64111812 accepted",
        "reportingMTA": "a8-70.smtp-out.amazonses.com"}}
    assert [e.kind for e in feedback.parse_ses(complaint)] == ["complaint"]
    assert [e.kind for e in feedback.parse_ses(delivery)] == ["delivered"]


# ------------------------------------------------------------------- SendGrid


def test_sendgrid_event_webhook(world: dict[str, Any]) -> None:
    """After SendGrid's "Event Webhook Reference" sample payloads."""
    mid = world["mid"]
    payload = json.dumps([
        {"email": "ann@rcpt.example", "timestamp": 1777593600, "smtp-id": mid["ann"],
         "event": "processed", "sg_event_id": "rbtnWrG1DVDGGGFHFyun0A",
         "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.000000000"},
        {"email": "ann@rcpt.example", "timestamp": 1777593601, "smtp-id": mid["ann"],
         "event": "bounce", "type": "bounce", "status": "5.0.0",
         "reason": "500 unknown recipient", "sg_event_id": "6g4ZI7SA-xmRDv57GoPIPw"},
        {"email": "bob@rcpt.example", "timestamp": 1777593602, "smtp-id": mid["bob"],
         "event": "bounce", "type": "blocked", "status": "5.7.1",
         "reason": "550 blocked by policy", "sg_event_id": "bl0cked-event-id"},
        {"email": "cat@rcpt.example", "timestamp": 1777593603, "smtp-id": mid["cat"],
         "event": "spamreport", "sg_event_id": "37nvH5QBz858KGVYCM4uOA"},
        {"email": "cat@rcpt.example", "timestamp": 1777593604, "smtp-id": mid["cat"],
         "event": "open", "sg_event_id": "FOTFFO0ecsBE-zxFXfs6WA", "useragent": "Mozilla/4.0"},
    ])
    events = feedback.parse_sendgrid(payload)
    assert [(e.kind, e.recipient) for e in events] == [
        ("hard_bounce", "ann@rcpt.example"), ("soft_bounce", "bob@rcpt.example"),
        ("complaint", "cat@rcpt.example")]
    feedback.record_many(world["dsn"], events)
    assert suppressions(world["conn"]) == [(None, "ann@rcpt.example", "hard_bounce"),
                                           ("u1", "cat@rcpt.example", "complaint")]


# -------------------------------------------------------------------- Mailgun


def mailgun(key: str, event: dict[str, Any], timestamp: str = "1777593600") -> str:
    """After Mailgun's "Webhooks" documentation (the signature object and event-data)."""
    token = "a8ce0edb2dd8301dee6c2405235584e45aa91d1e9f979f3de0"
    signature = hmac.new(key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()
    return json.dumps({"signature": {"timestamp": timestamp, "token": token,
                                     "signature": signature}, "event-data": event})


def mailgun_failed(message_id: str) -> dict[str, Any]:
    return {"id": "G9Bn5sl1TC6nu79C8C0bwg", "timestamp": 1777593600.0,
            "log-level": "error", "event": "failed", "severity": "permanent",
            "reason": "suppress-bounce", "recipient": "ann@rcpt.example",
            "recipient-domain": "rcpt.example",
            "delivery-status": {"code": 550, "attempt-no": 1, "message": "",
                                "description": "No such mailbox", "session-seconds": 0.1},
            "message": {"headers": {"to": "ann@rcpt.example",
                                    "message-id": message_id.strip("<>"),
                                    "from": "news@sender.example", "subject": "Spring sale"},
                        "attachments": [], "size": 111}}


def test_mailgun_webhooks(world: dict[str, Any]) -> None:
    key = "key-3ax6xnjp29jd6fds4gc373sgvjxteol0"
    body = mailgun(key, mailgun_failed(world["mid"]["ann"]))
    (event,) = feedback.parse_mailgun(body, key, now=1777593610)
    assert (event.kind, event.recipient, event.event_key) == (
        "hard_bounce", "ann@rcpt.example", "G9Bn5sl1TC6nu79C8C0bwg")
    assert event.detail is not None and "No such mailbox" in event.detail
    assert feedback.record(world["dsn"], event).subtask_id is not None  # found without brackets
    with pytest.raises(InvalidFeedback, match="does not match"):
        feedback.parse_mailgun(body, "key-wrong", now=1777593610)
    with pytest.raises(InvalidFeedback, match="old"):
        feedback.parse_mailgun(body, key, now=1777593600 + 3600)
    temporary = {**mailgun_failed(world["mid"]["bob"]), "severity": "temporary"}
    assert [e.kind for e in feedback.parse_mailgun(mailgun(key, temporary), key, max_age=None)
            ] == ["soft_bounce"]


# ------------------------------------------------------------------- Postmark


def test_postmark_webhooks(world: dict[str, Any]) -> None:
    """After Postmark's "Bounce webhook" and "Spam complaint webhook" examples; the
    service sent with X-PM-KeepID: true, so MessageID is edm-sched's."""
    bounce = {"RecordType": "Bounce", "MessageStream": "outbound", "ID": 4323372036854775807,
              "Type": "HardBounce", "TypeCode": 1, "Name": "Hard bounce", "Tag": "spring",
              "MessageID": world["mid"]["bob"], "ServerID": 23, "Description":
              "The server was unable to deliver your message (ex: unknown user, mailbox not "
              "found).", "Details": "Test bounce details", "Email": "bob@rcpt.example",
              "From": "news@sender.example", "BouncedAt": "2026-05-01T00:00:00Z",
              "DumpAvailable": True, "Inactive": True, "CanActivate": True,
              "Subject": "Spring sale", "Content": "Return-Path:<>"}
    complaint = {**bounce, "RecordType": "SpamComplaint", "ID": 42, "Type": "SpamComplaint",
                 "TypeCode": 512, "MessageID": world["mid"]["cat"], "Email": "cat@rcpt.example"}
    delivery = {"RecordType": "Delivery", "ServerID": 23, "MessageStream": "outbound",
                "MessageID": world["mid"]["ann"], "Recipient": "ann@rcpt.example",
                "Tag": "spring", "DeliveredAt": "2026-05-01T00:00:00Z",
                "Details": "Test delivery webhook details"}
    events = [e for item in (bounce, complaint, delivery)
              for e in feedback.parse_postmark(json.dumps(item))]
    assert [(e.kind, e.recipient) for e in events] == [
        ("hard_bounce", "bob@rcpt.example"), ("complaint", "cat@rcpt.example"),
        ("delivered", "ann@rcpt.example")]
    recorded = feedback.record_many(world["dsn"], events)
    assert all(r.subtask_id is not None for r in recorded)
    assert suppressions(world["conn"]) == [(None, "bob@rcpt.example", "hard_bounce"),
                                           ("u1", "cat@rcpt.example", "complaint")]
    assert feedback.parse_postmark(json.dumps({"RecordType": "Open"})) == []
