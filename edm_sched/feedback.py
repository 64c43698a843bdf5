"""Feedback intake: what is learned after sending, found by Message-ID.

One typed API, :func:`record` (SQL: ``edm.record_feedback``), records a
:class:`FeedbackEvent` — ``hard_bounce``, ``soft_bounce``, ``complaint``,
``unsubscribe`` or ``delivered`` — for the subtask its Message-ID names
(``<edm.TASK.SUBTASK@domain>``, see :func:`edm_sched.rendering.message_id`),
keeping the raw source. Hard bounces suppress the address for everyone,
complaints and unsubscribes for the task's user; pending subtasks to it are
cancelled at once. The reputation breaker (:mod:`edm_sched.reputation`) counts
these events.

Parsers turn what providers send into events:

* :func:`parse_dsn` — RFC 3464 delivery status notifications (bounce mail);
* :func:`parse_arf` — RFC 5965 abuse feedback reports (complaint loops);
* :func:`parse_ses_sns` — Amazon SES notifications delivered by SNS, after
  verifying the SNS signature (:func:`verify_sns`, the certificate fetcher
  injectable);
* :func:`parse_sendgrid` — the SendGrid Event Webhook;
* :func:`parse_mailgun` — Mailgun webhooks, after verifying their HMAC;
* :func:`parse_postmark` — Postmark bounce, spam complaint, delivery and
  subscription-change webhooks.

Parsers never touch the database; they return events (possibly none: an
event kind edm-sched does not track, such as an open or a click).
"""

from __future__ import annotations

import base64
import datetime as dt
import email
import email.message
import email.policy
import email.utils
import hashlib
import hmac
import json
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from edm_sched import core, db, errors
from edm_sched.core import Fetch, Op
from edm_sched.sqlfiles import query

Kind = Literal["hard_bounce", "soft_bounce", "complaint", "unsubscribe", "delivered"]
KINDS: frozenset[str] = frozenset(
    {"hard_bounce", "soft_bounce", "complaint", "unsubscribe", "delivered"})
MAX_RAW = 1_000_000


@dataclass(frozen=True)
class FeedbackEvent:
    kind: Kind
    message_id: str | None  # the Message-ID header of the message the event is about
    recipient: str | None = None
    source: str = "api"  # dsn, arf, ses, sendgrid, mailgun, postmark, or the host's name
    raw: str = ""  # the raw source, kept with the event
    detail: str | None = None  # status code and diagnostic
    event_key: str | None = None  # the provider's event id: a repeated webhook counts once
    occurred_at: dt.datetime | None = None


@dataclass(frozen=True)
class Recorded:
    event_id: int
    subtask_id: int | None  # None when the Message-ID is not edm-sched's (recorded by address)
    duplicate: bool  # the same (source, event_key) was recorded before: nothing done
    suppressed: bool  # this event suppressed the address
    cancelled: int  # pending subtasks to the address cancelled


class InvalidFeedback(errors.InvalidInput):
    """A report or webhook payload that cannot be parsed, or whose signature is wrong."""

    code = "INVALID_FEEDBACK"


def record(target: db.ConnOrDsn, event: FeedbackEvent, *,
           now: dt.datetime | None = None) -> Recorded:
    """Record one event (``target``: a connection, whose transaction is used, or a DSN).

    Raises :class:`errors.NotFound` when the Message-ID is not edm-sched's and no
    recipient is given, :class:`errors.InvalidInput` for a bad kind or address.
    """
    return record_many(target, [event], now=now)[0]


def record_many(target: db.ConnOrDsn, events: Iterable[FeedbackEvent], *,
                now: dt.datetime | None = None) -> list[Recorded]:
    """Record several events in one transaction (all or none)."""
    return core.run(target, record_op(list(events), now))


def record_op(events: list[FeedbackEvent], now: dt.datetime | None = None
              ) -> Op[list[Recorded]]:
    """The operation behind :func:`record_many` and ``Scheduler.record_feedback``."""
    for e in events:  # checked at the door, before any statement
        if e.kind not in KINDS:
            raise errors.InvalidInput(f"unknown feedback kind {e.kind!r}")
        if len(e.raw) > MAX_RAW:
            raise errors.PayloadTooLarge(f"raw source longer than {MAX_RAW} characters")
    out: list[Recorded] = []
    for e in events:
        row = yield Fetch(query("record_feedback"), {
            "kind": e.kind, "message_id": e.message_id, "recipient": e.recipient,
            "source": e.source, "raw": e.raw, "detail": e.detail, "event_key": e.event_key,
            "occurred_at": e.occurred_at, "now": now})
        assert row is not None
        out.append(Recorded(int(row[0]), row[1], bool(row[2]), bool(row[3]), int(row[4])))
    return out


# ------------------------------------------------------------------- helpers


def _text(data: bytes | str) -> str:
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


def _message(data: bytes | str) -> email.message.Message:
    raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogateescape")
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def _addr(value: str | None) -> str | None:
    """``rfc822; a@b`` or ``<a@b>`` → ``a@b``."""
    if not value:
        return None
    value = value.split(";", 1)[1] if ";" in value else value
    value = email.utils.parseaddr(value.strip())[1] or value.strip()
    return value.strip("<> ") or None


def _date(value: Any) -> dt.datetime | None:
    if value in (None, ""):
        return None
    try:
        if isinstance(value, (int, float)):
            return dt.datetime.fromtimestamp(float(value), dt.UTC)
        text = str(value)
        if re.fullmatch(r"\d+(\.\d+)?", text):
            return dt.datetime.fromtimestamp(float(text), dt.UTC)
        try:
            parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            parsed = email.utils.parsedate_to_datetime(text)
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
    except (ValueError, TypeError, OverflowError):
        return None


def _field_blocks(text: str) -> list[dict[str, str]]:
    """RFC 3464 / 5965 field groups: header-style blocks separated by blank lines
    (continuation lines folded), keys lower-cased."""
    blocks: list[dict[str, str]] = []
    for chunk in re.split(r"\r?\n\s*\r?\n", text.strip()):
        fields: dict[str, str] = {}
        last = None
        for line in chunk.splitlines():
            if line[:1] in (" ", "\t") and last:
                fields[last] += " " + line.strip()
            elif ":" in line:
                name, _, value = line.partition(":")
                last = name.strip().lower()
                fields[last] = value.strip()
        if fields:
            blocks.append(fields)
    return blocks


def _part_text(part: email.message.Message) -> str:
    payload = part.get_payload()
    if isinstance(payload, list):  # message/* parts parse as a nested message
        return "\n\n".join(p.as_string() if isinstance(p, email.message.Message) else str(p)
                           for p in payload)
    data = part.get_payload(decode=True)
    if isinstance(data, bytes) and data:
        return data.decode(part.get_content_charset() or "utf-8", "replace")
    return str(payload)


def _original_headers(report: email.message.Message) -> email.message.Message | None:
    """The returned message (message/rfc822) or its headers (text/rfc822-headers)."""
    for part in report.walk():
        ctype = part.get_content_type()
        if ctype in ("message/rfc822", "message/global"):
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0],
                                                                     email.message.Message):
                return payload[0]
        if ctype in ("text/rfc822-headers", "message/global-headers"):
            return _message(_part_text(part).lstrip())
    return None


# --------------------------------------------------------------------- RFC 3464


# Enhanced status codes (RFC 3463) that do not mean the address is bad:
# mailbox full, message too big, policy and content refusals. A failure with
# one of them is a soft bounce (the address is kept, the breaker does not count it).
_SOFT_PERMANENT = re.compile(r"5\.(2\.2|2\.3|3\.4|7\.\d+|6\.\d+)$")


def dsn_kind(action: str, status: str) -> Kind | None:
    """The event of one DSN recipient: ``failed`` with a 5.x.x status → hard bounce
    (but for mailbox full, too big, policy and content codes → soft bounce);
    ``failed`` 4.x.x or ``delayed`` → soft bounce; ``delivered`` → delivered;
    ``relayed`` and ``expanded`` → None."""
    action = action.strip().lower()
    status = status.strip().split()[0] if status.strip() else ""
    if action == "failed":
        if status.startswith("5") and not _SOFT_PERMANENT.match(status):
            return "hard_bounce"
        return "soft_bounce"
    if action == "delayed":
        return "soft_bounce"
    if action == "delivered":
        return "delivered"
    return None


def parse_dsn(data: bytes | str) -> list[FeedbackEvent]:
    """Events of an RFC 3464 delivery status notification: one per recipient block."""
    msg = _message(data)
    if msg.get_content_type() != "multipart/report":
        raise InvalidFeedback("not a delivery status notification (multipart/report)")
    status_part = next((p for p in msg.walk()
                        if p.get_content_type() in ("message/delivery-status",
                                                    "message/global-delivery-status")), None)
    if status_part is None:
        raise InvalidFeedback("DSN without a message/delivery-status part")
    blocks = _field_blocks(_part_text(status_part))
    original = _original_headers(msg)
    message_id = original.get("Message-ID") if original is not None else None
    per_message = blocks[0] if blocks and "final-recipient" not in blocks[0] else {}
    envelope_id = per_message.get("original-envelope-id")
    raw = _text(data)
    events = []
    for fields in blocks:
        if "final-recipient" not in fields and "original-recipient" not in fields:
            continue
        kind = dsn_kind(fields.get("action", ""), fields.get("status", ""))
        if kind is None:
            continue
        recipient = _addr(fields.get("original-recipient") or fields.get("final-recipient"))
        detail = " ".join(filter(None, [fields.get("status"), fields.get("diagnostic-code")]))
        events.append(FeedbackEvent(
            kind=kind, message_id=(message_id or envelope_id or "").strip() or None,
            recipient=recipient, source="dsn", raw=raw, detail=detail or None,
            occurred_at=_date(fields.get("last-attempt-date")
                              or per_message.get("arrival-date"))))
    return events


# --------------------------------------------------------------------- RFC 5965


def parse_arf(data: bytes | str) -> list[FeedbackEvent]:
    """The complaint of an RFC 5965 abuse report (Feedback-Type abuse, fraud, virus
    or other); ``not-spam`` reports give no event."""
    msg = _message(data)
    part = next((p for p in msg.walk() if p.get_content_type() == "message/feedback-report"),
                None)
    if msg.get_content_type() != "multipart/report" or part is None:
        raise InvalidFeedback("not an abuse report (multipart/report with message/feedback-report)")
    fields: dict[str, str] = {}
    for block in _field_blocks(_part_text(part)):
        fields.update(block)
    feedback_type = fields.get("feedback-type", "").lower()
    if feedback_type == "not-spam":
        return []
    original = _original_headers(msg)
    message_id = original.get("Message-ID") if original is not None else None
    recipient = _addr(fields.get("original-rcpt-to")) or (
        _addr(original.get("To")) if original is not None else None)
    if recipient is not None and "@" not in recipient:
        recipient = None  # redacted by the reporter
    return [FeedbackEvent(kind="complaint", message_id=message_id, recipient=recipient,
                          source="arf", raw=_text(data),
                          detail=f"feedback-type {feedback_type or 'unknown'}",
                          occurred_at=_date(fields.get("arrival-date")
                                            or fields.get("received-date")))]


# --------------------------------------------------------- Amazon SES via SNS

SNS_CERT_HOST = re.compile(r"sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?")
CertificateFetcher = Callable[[str], bytes]
_cert_cache: dict[str, bytes] = {}


def fetch_certificate(url: str) -> bytes:
    """The PEM certificate at ``url`` (cached per URL); the default fetcher."""
    if url not in _cert_cache:
        with urllib.request.urlopen(url, timeout=10) as resp:
            _cert_cache[url] = resp.read(65536)
    return _cert_cache[url]


def _sns_string_to_sign(body: Mapping[str, Any]) -> bytes:
    if body.get("Type") == "Notification":
        keys = ["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"]
    else:  # SubscriptionConfirmation, UnsubscribeConfirmation
        keys = ["Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"]
    return "".join(f"{k}\n{body[k]}\n" for k in keys if k in body).encode("utf-8")


def verify_sns(data: bytes | str, *, fetch: CertificateFetcher = fetch_certificate,
               cert_host: re.Pattern[str] = SNS_CERT_HOST) -> dict[str, Any]:
    """The SNS message after checking its signature (SignatureVersion 1: SHA1withRSA,
    2: SHA256withRSA) with the certificate at ``SigningCertURL``, which must be https
    on an SNS host (``cert_host``). Raises :class:`InvalidFeedback`.

    Needs the ``cryptography`` package (``pip install edm-sched[feedback]``).
    """
    try:
        from cryptography import x509
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding, rsa
    except ImportError:  # pragma: no cover - an optional dependency
        raise errors.ConfigurationError(
            "verifying SNS signatures needs the cryptography package "
            "(pip install edm-sched[feedback])") from None
    try:
        body = json.loads(_text(data))
        url = urllib.parse.urlsplit(body["SigningCertURL"])
        signature = base64.b64decode(body["Signature"], validate=True)
        version = str(body.get("SignatureVersion", "1"))
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidFeedback(f"not an SNS message: {exc}") from None
    if url.scheme != "https" or not cert_host.fullmatch(url.hostname or ""):
        raise InvalidFeedback(f"SNS certificate URL not on an SNS host: {url.geturl()!r}")
    algorithm: hashes.HashAlgorithm = {"1": hashes.SHA1(), "2": hashes.SHA256()}.get(
        version, hashes.SHA256())
    if version not in ("1", "2"):
        raise InvalidFeedback(f"unknown SNS SignatureVersion {version!r}")
    try:
        key = x509.load_pem_x509_certificate(fetch(url.geturl())).public_key()
    except (ValueError, OSError) as exc:
        raise InvalidFeedback(f"cannot load the SNS certificate: {exc}") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise InvalidFeedback("the SNS certificate does not hold an RSA key")
    try:
        key.verify(signature, _sns_string_to_sign(body), padding.PKCS1v15(), algorithm)
    except InvalidSignature:
        raise InvalidFeedback("SNS signature does not match") from None
    return dict(body)


def parse_ses(notification: Mapping[str, Any], *, raw: str = "") -> list[FeedbackEvent]:
    """Events of one SES notification (``notificationType``) or event
    (``eventType``): Bounce, Complaint, Delivery."""
    kind_name = notification.get("notificationType") or notification.get("eventType")
    mail = notification.get("mail") or {}
    message_id = (mail.get("commonHeaders") or {}).get("messageId")
    for header in mail.get("headers") or []:
        if str(header.get("name", "")).lower() == "message-id":
            message_id = header.get("value")
    raw = raw or json.dumps(notification)
    events: list[FeedbackEvent] = []
    if kind_name == "Bounce":
        bounce = notification.get("bounce") or {}
        kind: Kind = "hard_bounce" if bounce.get("bounceType") == "Permanent" else "soft_bounce"
        for r in bounce.get("bouncedRecipients") or []:
            events.append(FeedbackEvent(
                kind=kind, message_id=message_id, recipient=_addr(r.get("emailAddress")),
                source="ses", raw=raw,
                event_key=f"{bounce.get('feedbackId')}:{r.get('emailAddress')}",
                detail=" ".join(filter(None, [bounce.get("bounceType"),
                                              bounce.get("bounceSubType"),
                                              r.get("status"), r.get("diagnosticCode")])),
                occurred_at=_date(bounce.get("timestamp"))))
    elif kind_name == "Complaint":
        complaint = notification.get("complaint") or {}
        if complaint.get("complaintFeedbackType") == "not-spam":
            return []
        for r in complaint.get("complainedRecipients") or []:
            events.append(FeedbackEvent(
                kind="complaint", message_id=message_id, recipient=_addr(r.get("emailAddress")),
                source="ses", raw=raw,
                event_key=f"{complaint.get('feedbackId')}:{r.get('emailAddress')}",
                detail=complaint.get("complaintFeedbackType"),
                occurred_at=_date(complaint.get("timestamp"))))
    elif kind_name == "Delivery":
        delivery = notification.get("delivery") or {}
        for r in delivery.get("recipients") or []:
            events.append(FeedbackEvent(
                kind="delivered", message_id=message_id, recipient=_addr(r), source="ses",
                raw=raw, event_key=f"{mail.get('messageId')}:delivery:{r}",
                detail=delivery.get("smtpResponse"), occurred_at=_date(delivery.get("timestamp"))))
    return events


def parse_ses_sns(data: bytes | str, *, fetch: CertificateFetcher = fetch_certificate,
                  cert_host: re.Pattern[str] = SNS_CERT_HOST) -> list[FeedbackEvent]:
    """Events of an SNS-delivered SES notification, after :func:`verify_sns`. A
    subscription confirmation gives no event: confirm it by fetching its
    ``SubscribeURL`` (see :func:`verify_sns`' result)."""
    body = verify_sns(data, fetch=fetch, cert_host=cert_host)
    if body.get("Type") != "Notification":
        return []
    try:
        notification = json.loads(body["Message"])
    except (ValueError, TypeError) as exc:
        raise InvalidFeedback(f"SNS message is not SES JSON: {exc}") from None
    return parse_ses(notification, raw=_text(data))


# ------------------------------------------------------------------- SendGrid

_SENDGRID: dict[str, Kind] = {"delivered": "delivered", "deferred": "soft_bounce",
                              "spamreport": "complaint", "unsubscribe": "unsubscribe",
                              "group_unsubscribe": "unsubscribe"}


def parse_sendgrid(data: bytes | str) -> list[FeedbackEvent]:
    """Events of a SendGrid Event Webhook POST (a JSON array). ``bounce`` events of
    type ``bounce`` are hard bounces, of type ``blocked`` soft ones; opens, clicks,
    processed and dropped events give none. The Message-ID is the ``smtp-id`` field."""
    try:
        items = json.loads(_text(data))
    except ValueError as exc:
        raise InvalidFeedback(f"SendGrid payload is not JSON: {exc}") from None
    if not isinstance(items, list):
        raise InvalidFeedback("a SendGrid payload is a JSON array of events")
    events = []
    for item in items:
        if not isinstance(item, dict):
            continue
        name = item.get("event")
        kind: Kind | None
        if name == "bounce":
            kind = "soft_bounce" if item.get("type") == "blocked" else "hard_bounce"
        else:
            kind = _SENDGRID.get(str(name))
        if kind is None:
            continue
        events.append(FeedbackEvent(
            kind=kind, message_id=item.get("smtp-id"), recipient=_addr(item.get("email")),
            source="sendgrid", raw=json.dumps(item, ensure_ascii=False),
            event_key=item.get("sg_event_id"),
            detail=" ".join(str(item[k]) for k in ("status", "reason", "response") if item.get(k))
            or None, occurred_at=_date(item.get("timestamp"))))
    return events


# -------------------------------------------------------------------- Mailgun


def verify_mailgun(signature: Mapping[str, Any], signing_key: str | bytes, *,
                   max_age: float | None = 300.0, now: float | None = None) -> None:
    """Check a Mailgun webhook ``signature`` object (``timestamp``, ``token``,
    ``signature`` = hex HMAC-SHA256 of timestamp + token under the signing key) and
    that it is at most ``max_age`` seconds old. Raises :class:`InvalidFeedback`."""
    key = signing_key.encode() if isinstance(signing_key, str) else signing_key
    try:
        timestamp, token, given = (str(signature["timestamp"]), str(signature["token"]),
                                   str(signature["signature"]))
    except (KeyError, TypeError):
        raise InvalidFeedback("Mailgun signature needs timestamp, token and signature") from None
    expected = hmac.new(key, (timestamp + token).encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, given):
        raise InvalidFeedback("Mailgun signature does not match")
    if max_age is not None:
        try:
            age = (time.time() if now is None else now) - float(timestamp)
        except ValueError:
            raise InvalidFeedback("Mailgun timestamp is not a number") from None
        if abs(age) > max_age:
            raise InvalidFeedback(f"Mailgun signature is {age:.0f} s old")


def parse_mailgun(data: bytes | str, signing_key: str | bytes, *, max_age: float | None = 300.0,
                  now: float | None = None) -> list[FeedbackEvent]:
    """The event of a Mailgun webhook POST (JSON with ``signature`` and
    ``event-data``), after :func:`verify_mailgun`. ``failed`` is a hard bounce when
    its severity is permanent, else a soft one; ``complained``, ``unsubscribed`` and
    ``delivered`` map as named. Mailgun gives the Message-ID without brackets."""
    try:
        body = json.loads(_text(data))
        signature, event = body["signature"], body["event-data"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidFeedback(f"not a Mailgun webhook: {exc}") from None
    verify_mailgun(signature, signing_key, max_age=max_age, now=now)
    name = event.get("event")
    mailgun_kinds: dict[str, Kind] = {"complained": "complaint", "unsubscribed": "unsubscribe",
                                      "delivered": "delivered"}
    kind = mailgun_kinds.get(str(name))
    if name == "failed":
        kind = "hard_bounce" if event.get("severity") == "permanent" else "soft_bounce"
    if kind is None:
        return []
    headers = (event.get("message") or {}).get("headers") or {}
    message_id = headers.get("message-id")
    status = event.get("delivery-status") or {}
    detail = " ".join(str(x) for x in (status.get("code"), event.get("reason"),
                                       status.get("description") or status.get("message"))
                      if x) or None
    return [FeedbackEvent(kind=kind, message_id=message_id, recipient=_addr(event.get("recipient")),
                          source="mailgun", raw=_text(data), event_key=event.get("id"),
                          detail=detail, occurred_at=_date(event.get("timestamp")))]


# ------------------------------------------------------------------- Postmark

_POSTMARK_HARD = {"HardBounce", "BadEmailAddress", "ManuallyDeactivated"}
_POSTMARK_SOFT = {"SoftBounce", "Transient", "DnsError", "Blocked", "DMARCPolicy",
                  "AutoResponder", "ChallengeVerification", "Unknown"}


def parse_postmark(data: bytes | str) -> list[FeedbackEvent]:
    """The event of a Postmark webhook POST (one JSON object, ``RecordType``
    Bounce, SpamComplaint, Delivery or SubscriptionChange). Postmark reports its
    own ``MessageID`` unless the message kept edm-sched's: give the service the
    custom header ``X-PM-KeepID: true``; the recipient is recorded either way."""
    try:
        item = json.loads(_text(data))
    except ValueError as exc:
        raise InvalidFeedback(f"Postmark payload is not JSON: {exc}") from None
    if not isinstance(item, dict):
        raise InvalidFeedback("a Postmark payload is a JSON object")
    record_type = item.get("RecordType")
    recipient = _addr(item.get("Email") or item.get("Recipient"))
    kind: Kind | None = None
    when: Any = None
    if record_type == "Bounce":
        bounce_type = str(item.get("Type"))
        if bounce_type in _POSTMARK_HARD:
            kind = "hard_bounce"
        elif bounce_type == "SpamComplaint":
            kind = "complaint"
        elif bounce_type == "Unsubscribe":
            kind = "unsubscribe"
        elif bounce_type in _POSTMARK_SOFT:
            kind = "soft_bounce"
        when = item.get("BouncedAt")
    elif record_type == "SpamComplaint":
        kind, when = "complaint", item.get("BouncedAt")
    elif record_type == "Delivery":
        kind, when = "delivered", item.get("DeliveredAt")
    elif record_type == "SubscriptionChange" and item.get("SuppressSending"):
        reason = item.get("SuppressionReason")
        kind = ("hard_bounce" if reason == "HardBounce"
                else "complaint" if reason == "SpamComplaint" else "unsubscribe")
        when = item.get("ChangedAt")
    if kind is None:
        return []
    key = item.get("ID") or f"{record_type}:{item.get('MessageID')}:{recipient}"
    detail = " ".join(str(item[k]) for k in ("Type", "Description", "Details", "SuppressionReason")
                      if item.get(k)) or None
    return [FeedbackEvent(kind=kind, message_id=item.get("MessageID"), recipient=recipient,
                          source="postmark", raw=_text(data), event_key=str(key), detail=detail,
                          occurred_at=_date(when))]
