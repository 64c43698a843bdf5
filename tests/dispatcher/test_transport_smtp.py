"""The SMTP transport against a real SMTP server (edm_sched.testing.smtp_sink), no mocks.

Every test is a plain function driving its coroutine with ``asyncio.run``; the
sink runs aiosmtpd on a background thread and picks a free port.
"""

from __future__ import annotations

import asyncio
import datetime
import email.policy
import ipaddress
import logging
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edm_sched.testing.smtp_sink import Received, SmtpSink, read_log
from edm_sched.transports.base import Message, Outcome, SendResult, ServiceConfig
from edm_sched.transports.null import NullTransport
from edm_sched.transports.smtp import (
    SmtpTransport,
    classify_reply,
    parse_queue_id,
    parse_settings,
)

T = TypeVar("T")

SENDER = "news@sender.example.com"
PASSWORD = "s3cret-Pa55word-never-shown"
ROOT = Path(__file__).resolve().parents[2]


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def make_message(
    n: int, recipient: str = "alice@example.org", *, service: str = "svc-1"
) -> Message:
    message_id = f"<edm.{n}.42@sender.example.com>"
    em = EmailMessage()
    em["From"] = f"News <{SENDER}>"
    em["To"] = recipient
    em["Subject"] = f"Campaign message {n} – ünïcode subject"
    em["Message-ID"] = message_id
    em["X-Edm-Service"] = service
    em["List-Unsubscribe"] = "<https://sender.example.com/u/abc>"
    em.set_content(f"Hello {n},\n.\n..a line starting with dots\nBye.\n")
    return Message(
        subtask_id=n,
        task_id=42,
        message_id=message_id,
        sender=SENDER,
        recipient=recipient,
        data=em.as_bytes(policy=email.policy.SMTP),
    )


def service_for(port: int, service_id: int = 1, **settings: Any) -> ServiceConfig:
    cfg: dict[str, Any] = {"host": "127.0.0.1", "port": port, "timeout": 5.0}
    credential_ref = settings.pop("credential_ref", None)
    cfg.update(settings)
    return ServiceConfig(
        service_id=service_id, name=f"svc-{service_id}", transport="smtp", settings=cfg,
        credential_ref=credential_ref,
    )


def transport(**kwargs: Any) -> SmtpTransport:
    return SmtpTransport(hostname="client.test", **kwargs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def refuse(prefix_to_reply: dict[str, tuple[int, str]]) -> Callable[[str], tuple[int, str] | None]:
    def rule(recipient: str) -> tuple[int, str] | None:
        for prefix, reply in prefix_to_reply.items():
            if recipient.startswith(prefix):
                return reply
        return None

    return rule


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink(
        rules=refuse({
            "later": (451, "4.7.1 try later"),
            "full": (452, "4.2.2 mailbox full"),
            "nobody": (550, "5.1.1 no such user"),
            "closing": (421, "4.3.2 service shutting down"),
        })
    ) as s:
        yield s


# -- pure functions ------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (250, Outcome.SENT), (251, Outcome.SENT),
        (421, Outcome.SERVICE), (454, Outcome.SERVICE), (530, Outcome.SERVICE),
        (534, Outcome.SERVICE), (535, Outcome.SERVICE),
        (450, Outcome.TRANSIENT), (451, Outcome.TRANSIENT), (452, Outcome.TRANSIENT),
        (550, Outcome.PERMANENT), (552, Outcome.PERMANENT), (554, Outcome.PERMANENT),
        (354, Outcome.TRANSIENT), (-1, Outcome.TRANSIENT),
    ],
)
def test_classify_reply(code: int, outcome: Outcome) -> None:
    assert classify_reply(code) is outcome


def test_sender_refusal_never_blames_the_recipient() -> None:
    # 550/553 at MAIL FROM would suppress the recipient if reported PERMANENT.
    assert classify_reply(553, at_mail_from=True) is Outcome.SERVICE
    assert classify_reply(550, at_mail_from=True) is Outcome.SERVICE
    assert classify_reply(552, at_mail_from=True) is Outcome.PERMANENT
    assert classify_reply(451, at_mail_from=True) is Outcome.TRANSIENT


@pytest.mark.parametrize(
    ("text", "queue_id"),
    [
        ("2.0.0 Ok: queued as 4Bc1Xy2Z3w", "4Bc1Xy2Z3w"),
        ("OK id=1rAbCd-000123-XY", "1rAbCd-000123-XY"),
        ("2.0.0 x1ABcd123456 Message accepted for delivery", "x1ABcd123456"),
        ("Ok 0100018c1c5a4e5b-1f2e3d4c-0000-000000", "0100018c1c5a4e5b-1f2e3d4c-0000-000000"),
        ("2.0.0 Ok", None),
        ("OK", None),
        ("Message accepted", None),
    ],
)
def test_parse_queue_id(text: str, queue_id: str | None) -> None:
    assert parse_queue_id(text) == queue_id


def test_settings_defaults_and_validation() -> None:
    assert parse_settings({"host": "mx"}).port == 25
    assert parse_settings({"host": "mx", "security": "ssl"}).port == 465
    assert parse_settings({"host": "mx", "security": "STARTTLS"}).port == 587
    s = parse_settings({"host": "mx"}, default_timeout=7)
    assert (s.security, s.username, s.validate_certs, s.timeout) == ("none", None, True, 7.0)
    for bad in ({}, {"host": ""}, {"host": "mx", "security": "tls"}, {"host": "mx", "port": 0},
                {"host": "mx", "port": "x"}, {"host": "mx", "timeout": 0},
                {"host": "mx", "validate_certs": "yes"}):
        with pytest.raises(ValueError):
            parse_settings(bad)


# -- sending ---------------------------------------------------------------------


def test_sent_with_provider_id_and_response_ms(sink: SmtpSink) -> None:
    async def go() -> SendResult:
        t = transport()
        try:
            return await t.send(service_for(sink.port), make_message(1))
        finally:
            await t.aclose()

    result = run(go())
    assert result.outcome is Outcome.SENT
    assert result.code == 250
    assert result.provider_id is not None and len(result.provider_id) == 16
    assert result.response_ms is not None and 0 <= result.response_ms < 5000
    assert result.detail is None


def test_message_id_and_headers_arrive_intact(tmp_path: Path) -> None:
    log_path = tmp_path / "received.jsonl"
    message = make_message(7, "bob@example.org", service="svc-7")
    with SmtpSink(log_path=log_path) as s:
        async def go() -> SendResult:
            t = transport()
            try:
                return await t.send(service_for(s.port), message)
            finally:
                await t.aclose()

        assert run(go()).outcome is Outcome.SENT
        [got] = s.received
        [raw] = s.messages

    # Byte for byte: dot-stuffing undone, CRLF kept, 8-bit-free encoded headers untouched.
    assert raw == message.data
    parsed = BytesParser(policy=email.policy.default).parsebytes(raw)
    assert parsed["Message-ID"] == message.message_id
    assert parsed["Subject"] == "Campaign message 7 – ünïcode subject"
    assert parsed["List-Unsubscribe"] == "<https://sender.example.com/u/abc>"
    assert "\r\n.\r\n..a line starting with dots\r\n" in parsed.get_content()

    assert got.recipient == "bob@example.org"
    assert got.message_id == message.message_id
    assert got.service == "svc-7"
    assert got.sender == SENDER
    assert abs(got.received_at - time.time()) < 60
    assert read_log(log_path) == [got]


@pytest.mark.parametrize(
    ("recipient", "code"), [("later@example.org", 451), ("full@example.org", 452)]
)
def test_4xx_is_transient(sink: SmtpSink, recipient: str, code: int) -> None:
    async def go() -> tuple[SendResult, SendResult]:
        t = transport()
        try:
            refused = await t.send(service_for(sink.port), make_message(1, recipient))
            # The connection stays usable after the refusal (RSET).
            after = await t.send(service_for(sink.port), make_message(2))
            return refused, after
        finally:
            await t.aclose()

    refused, after = run(go())
    assert refused.outcome is Outcome.TRANSIENT
    assert refused.code == code
    assert refused.detail is not None and str(code) in refused.detail
    assert after.outcome is Outcome.SENT
    assert sink.connections == 1
    assert [r.recipient for r in sink.received] == ["alice@example.org"]


@pytest.mark.parametrize("refuse_at", ["rcpt", "data"])
def test_550_is_permanent_at_rcpt_and_at_data(refuse_at: Any) -> None:
    rules = refuse({"nobody": (550, "5.1.1 no such user")})
    with SmtpSink(rules=rules, refuse_at=refuse_at) as s:
        async def go() -> SendResult:
            t = transport()
            try:
                return await t.send(service_for(s.port), make_message(1, "nobody@example.org"))
            finally:
                await t.aclose()

        result = run(go())
        assert s.received == []
    assert result.outcome is Outcome.PERMANENT
    assert result.code == 550
    expected_stage = "RCPT TO" if refuse_at == "rcpt" else "DATA"
    assert result.detail == f"{expected_stage}: 550 5.1.1 no such user"


def test_421_is_service_and_the_connection_is_replaced(sink: SmtpSink) -> None:
    async def go() -> tuple[SendResult, SendResult]:
        t = transport()
        try:
            closing = await t.send(service_for(sink.port), make_message(1, "closing@example.org"))
            after = await t.send(service_for(sink.port), make_message(2))
            return closing, after
        finally:
            await t.aclose()

    closing, after = run(go())
    assert closing.outcome is Outcome.SERVICE
    assert closing.code == 421
    assert after.outcome is Outcome.SENT
    assert sink.connections == 2


def test_connection_refused_is_service() -> None:
    port = free_port()  # nothing listens there

    async def go() -> SendResult:
        t = transport()
        try:
            return await t.send(service_for(port), make_message(1))
        finally:
            await t.aclose()

    result = run(go())
    assert result.outcome is Outcome.SERVICE
    assert result.code is None
    assert result.detail is not None and result.detail.startswith("connect:")


def test_no_greeting_is_a_connect_timeout_hence_service() -> None:
    # A listener that never accepts: the TCP handshake completes in the kernel
    # backlog, the 220 greeting never comes.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        port = listener.getsockname()[1]

        async def go() -> SendResult:
            t = transport()
            try:
                return await t.send(service_for(port, timeout=0.3), make_message(1))
            finally:
                await t.aclose()

        result = run(go())
    assert result.outcome is Outcome.SERVICE
    assert result.detail is not None and "Timed out" in result.detail


def test_dropped_connection_is_transient(sink: SmtpSink) -> None:
    """The sink hangs up at RCPT, without a reply, on a fresh connection: TRANSIENT.

    Not SERVICE, because the account demonstrably works: the server accepted
    the connection, EHLO and MAIL FROM, then dropped *this* transaction. The
    message is retried later and the attempt counts, so a message that always
    kills the connection ends up failed instead of blocking its service; if
    the server is really gone, the next send cannot connect and reports
    SERVICE. (A drop after DATA is also TRANSIENT, see the next test.)
    """

    async def go() -> tuple[SendResult, SendResult]:
        t = transport()
        try:
            dropped = await t.send(service_for(sink.port), make_message(1, "drop-connection@x.org"))
            after = await t.send(service_for(sink.port), make_message(2))
            return dropped, after
        finally:
            await t.aclose()

    dropped, after = run(go())
    assert dropped.outcome is Outcome.TRANSIENT
    assert dropped.code is None
    assert dropped.detail is not None and dropped.detail.startswith("RCPT TO:")
    assert after.outcome is Outcome.SENT
    # Fresh connection, so no second try: one dropped connection, one new one.
    assert sink.connections == 2


def test_drop_after_data_is_uncertain_and_never_retried(sink: SmtpSink) -> None:
    async def go() -> tuple[SendResult, SendResult]:
        t = transport()
        try:
            first = await t.send(service_for(sink.port), make_message(1))
            # On the reused connection: a retry here could deliver twice.
            dropped = await t.send(service_for(sink.port), make_message(2, "drop-after-data@x.org"))
            return first, dropped
        finally:
            await t.aclose()

    first, dropped = run(go())
    assert first.outcome is Outcome.SENT
    # The server had the whole message, final dot included: it may have kept it.
    assert dropped.outcome is Outcome.UNCERTAIN
    assert dropped.detail is not None and dropped.detail.startswith("DATA:")
    assert sink.connections == 1


def test_timeout_after_connecting_is_transient() -> None:
    def slow(recipient: str) -> tuple[int, str] | None:
        if recipient.startswith("slow"):
            time.sleep(0.6)  # blocks the sink past the client's 0.2 s timeout
        return None

    with SmtpSink(rules=slow) as s:
        async def go() -> tuple[SendResult, SendResult]:
            t = transport()
            try:
                svc = service_for(s.port, timeout=0.2)
                slow_one = await t.send(svc, make_message(1, "slow@example.org"))
                await asyncio.sleep(0.5)
                after = await t.send(svc, make_message(2))
                return slow_one, after
            finally:
                await t.aclose()

        slow_one, after = run(go())
        assert s.connections == 2
    assert slow_one.outcome is Outcome.TRANSIENT
    assert slow_one.detail is not None and "RCPT TO: SMTPReadTimeoutError" in slow_one.detail
    assert after.outcome is Outcome.SENT


# -- connections -------------------------------------------------------------------


def test_one_connection_per_service_reused_and_serialised(sink: SmtpSink) -> None:
    async def go() -> list[SendResult]:
        t = transport()
        try:
            results = [await t.send(service_for(sink.port), make_message(1)),
                       await t.send(service_for(sink.port), make_message(2))]
            assert sink.connections == 1
            # Concurrent sends on one service share its one connection, one at a time.
            results += await asyncio.gather(
                *(t.send(service_for(sink.port), make_message(n)) for n in range(3, 9))
            )
            assert sink.connections == 1
            # Another service gets its own connection.
            results.append(await t.send(service_for(sink.port, service_id=2), make_message(9)))
            assert sink.connections == 2
            assert sink.open_connections == 2
            return results
        finally:
            await t.aclose()

    results = run(go())
    assert [r.outcome for r in results] == [Outcome.SENT] * 9
    assert len({r.provider_id for r in results}) == 9
    assert len(sink.received) == 9
    deadline = time.monotonic() + 2
    while sink.open_connections and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sink.open_connections == 0  # aclose() sent QUIT on both


def test_reconnect_after_the_server_closed_an_idle_connection(sink: SmtpSink) -> None:
    async def go() -> list[SendResult]:
        t = transport()
        try:
            first = await t.send(service_for(sink.port), make_message(1))
            assert await asyncio.to_thread(sink.close_connections) == 1
            await asyncio.sleep(0.05)  # the client sees the EOF while idle
            second = await t.send(service_for(sink.port), make_message(2))
            return [first, second]
        finally:
            await t.aclose()

    assert [r.outcome for r in run(go())] == [Outcome.SENT, Outcome.SENT]
    assert sink.connections == 2


def test_dead_reused_connection_is_retried_once_on_a_fresh_one(
    sink: SmtpSink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edm_sched.transports.smtp")

    async def go() -> list[SendResult]:
        t = transport()
        try:
            first = await t.send(service_for(sink.port), make_message(1))
            # Blocking call on the event loop: the client cannot notice the close
            # before it writes MAIL FROM on the dead connection.
            sink.close_connections()
            second = await t.send(service_for(sink.port), make_message(2))
            return [first, second]
        finally:
            await t.aclose()

    assert [r.outcome for r in run(go())] == [Outcome.SENT, Outcome.SENT]
    assert sink.connections == 2
    assert len(sink.received) == 2
    assert any("reused connection was dead" in r.getMessage() for r in caplog.records)


# -- authentication ------------------------------------------------------------------


def _all_text(results: list[SendResult], caplog: pytest.LogCaptureFixture) -> str:
    parts = [repr(r) for r in results]
    for record in caplog.records:
        parts.append(record.getMessage())
        parts.append(repr(record.args))
        if record.exc_text:
            parts.append(record.exc_text)
    return "\n".join(parts)


# aiosmtpd warns about AUTH without TLS; this is a local test server.
no_tls_auth_warning = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")


@no_tls_auth_warning
def test_auth_uses_the_resolved_password_and_never_shows_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = {"vault:good": PASSWORD, "vault:bad": PASSWORD + "-wrong"}
    with SmtpSink(credentials={"mailer": PASSWORD}) as s:
        def svc(sid: int, ref: str | None, username: str | None = "mailer") -> ServiceConfig:
            extra: dict[str, Any] = {"credential_ref": ref}
            if username is not None:
                extra["username"] = username
            return service_for(s.port, service_id=sid, **extra)

        async def go() -> list[SendResult]:
            t = transport(resolver=secrets.get)
            try:
                return [
                    await t.send(svc(1, "vault:good"), make_message(1)),
                    await t.send(svc(2, "vault:bad"), make_message(2)),
                    await t.send(svc(3, "vault:missing"), make_message(3)),
                    await t.send(svc(4, None, username=None), make_message(4)),
                ]
            finally:
                await t.aclose()

        good, wrong, missing, anonymous = run(go())
        assert len(s.received) == 1
    assert good.outcome is Outcome.SENT
    assert wrong.outcome is Outcome.SERVICE
    assert wrong.code == 535
    assert wrong.detail is not None and wrong.detail.startswith("AUTH: 535")
    assert missing.outcome is Outcome.SERVICE
    assert missing.detail is not None and "vault:missing" in missing.detail
    assert anonymous.outcome is Outcome.SERVICE  # 530 authentication required at MAIL FROM
    assert anonymous.code == 530

    text = _all_text([good, wrong, missing, anonymous], caplog)
    assert caplog.records  # the check below looked at something
    assert PASSWORD not in text


@no_tls_auth_warning
def test_a_server_echoing_the_password_is_redacted(caplog: pytest.LogCaptureFixture) -> None:
    from aiosmtpd.smtp import AuthResult

    class EchoingSink(SmtpSink):
        def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str,
                          auth_data: Any) -> AuthResult:
            shown = auth_data.password.decode()
            return AuthResult(success=False, handled=False,
                              message=f"535 5.7.8 bad password {shown} for you")

    caplog.set_level(logging.DEBUG, logger="edm_sched")
    with EchoingSink(credentials={"mailer": "other"}) as s:
        async def go() -> SendResult:
            t = transport(resolver=lambda ref: PASSWORD)
            try:
                svc = service_for(s.port, username="mailer", credential_ref="env:SMTP_PW")
                return await t.send(svc, make_message(1))
            finally:
                await t.aclose()

        result = run(go())
    assert result.outcome is Outcome.SERVICE
    assert result.detail is not None and "[redacted]" in result.detail
    assert PASSWORD not in _all_text([result], caplog)


def test_a_password_in_the_settings_is_refused() -> None:
    async def go() -> SendResult:
        t = transport()
        try:
            return await t.send(service_for(1, password=PASSWORD), make_message(1))
        finally:
            await t.aclose()

    result = run(go())
    assert result.outcome is Outcome.SERVICE
    assert result.detail is not None and "credential_ref" in result.detail
    assert PASSWORD not in repr(result)


# -- TLS (skipped unless the cryptography package happens to be installed) ------------


@pytest.fixture(scope="module")
def server_tls() -> ssl.SSLContext:
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)  # noqa: UP017
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        ), critical=False)
        .sign(key, hashes.SHA256())
    )
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cert_path, key_path = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_path, key_path)
    return context


def test_starttls(server_tls: ssl.SSLContext) -> None:
    with SmtpSink(tls_context=server_tls, require_tls=True) as s:
        async def go() -> list[SendResult]:
            t = transport()
            try:
                return [
                    await t.send(service_for(s.port, 1, security="starttls",
                                             validate_certs=False), make_message(1)),
                    # Self-signed: refused when the certificate is checked.
                    await t.send(service_for(s.port, 2, security="starttls"), make_message(2)),
                    # The server insists on STARTTLS (530 at MAIL FROM).
                    await t.send(service_for(s.port, 3, security="none"), make_message(3)),
                ]
            finally:
                await t.aclose()

        tls, unverified, plain = run(go())
        assert len(s.received) == 1
    assert tls.outcome is Outcome.SENT
    assert unverified.outcome is Outcome.SERVICE
    assert unverified.detail is not None and "CERTIFICATE_VERIFY_FAILED" in unverified.detail
    assert plain.outcome is Outcome.SERVICE and plain.code == 530


def test_implicit_tls(server_tls: ssl.SSLContext) -> None:
    with SmtpSink(tls_context=server_tls, implicit_tls=True) as s:
        async def go() -> SendResult:
            t = transport()
            try:
                svc = service_for(s.port, security="ssl", validate_certs=False)
                return await t.send(svc, make_message(1))
            finally:
                await t.aclose()

        assert run(go()).outcome is Outcome.SENT
        assert len(s.received) == 1


# -- the sink itself and the null transport ------------------------------------------


def test_read_log_ignores_a_torn_last_line(tmp_path: Path) -> None:
    row = Received(1.5, "a@x.org", "<m@x>", "svc", "s@x.org", 10)
    path = tmp_path / "log.jsonl"
    path.write_text(row.to_json() + "\n" + row.to_json()[:12], encoding="utf-8")
    assert read_log(path) == [row]
    path.write_text("garbage\n" + row.to_json() + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not a sink log line"):
        read_log(path)


def test_sink_as_a_separate_process(tmp_path: Path) -> None:
    log_path = tmp_path / "sink.jsonl"
    with subprocess.Popen(
        [sys.executable, "-m", "edm_sched.testing.smtp_sink", "--port", "0",
         "--log", str(log_path)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            port = int(proc.stdout.readline())

            async def go() -> SendResult:
                t = transport()
                try:
                    return await t.send(service_for(port), make_message(5, service="svc-5"))
                finally:
                    await t.aclose()

            assert run(go()).outcome is Outcome.SENT
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    [row] = read_log(log_path)
    assert (row.recipient, row.message_id, row.service) == (
        "alice@example.org", "<edm.5.42@sender.example.com>", "svc-5"
    )


def test_null_transport() -> None:
    def fail(message: Message) -> SendResult | None:
        return SendResult(Outcome.PERMANENT, code=550) if message.subtask_id == 2 else None

    async def go() -> tuple[NullTransport, list[SendResult]]:
        t = NullTransport(delay=0.001, fail=fail, record=True)
        svc = service_for(25, service_id=9)
        results = [await t.send(svc, make_message(n)) for n in (1, 2, 3)]
        await t.aclose()
        return t, results

    t, results = run(go())
    assert [r.outcome for r in results] == [Outcome.SENT, Outcome.PERMANENT, Outcome.SENT]
    assert [(sid, rcpt, mid) for _, sid, rcpt, mid in t.sent] == [
        (9, "alice@example.org", "<edm.1.42@sender.example.com>"),
        (9, "alice@example.org", "<edm.3.42@sender.example.com>"),
    ]
    assert t.sent[0][0] <= t.sent[1][0]
    assert NullTransport().sent == []


def test_a_transport_survives_a_new_event_loop(sink: SmtpSink) -> None:
    t = transport()
    svc = service_for(sink.port)
    # No aclose() in this first loop (a caller's mistake): its connection is
    # abandoned; the next loop connects afresh instead of failing on it.
    assert asyncio.run(t.send(svc, make_message(1))).outcome is Outcome.SENT

    async def second_loop() -> SendResult:
        try:
            return await t.send(svc, make_message(2))
        finally:
            await t.aclose()

    assert asyncio.run(second_loop()).outcome is Outcome.SENT
    assert sink.connections == 2


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=60) | st.lists(
    st.sampled_from([b"a", b"\r", b"\n", b"\r\n", b".", b"x."]), max_size=20).map(b"".join))
def test_wire_data_fast_paths_change_nothing(data: bytes) -> None:
    """wire_data skips its substitutions when nothing needs them; the result is the one
    the plain substitutions give."""
    from edm_sched.transports.smtp import _LEADING_DOT, _LINE_ENDS, wire_data

    expected = _LINE_ENDS.sub(b"\r\n", data)
    if not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    assert wire_data(data) == _LEADING_DOT.sub(b"..", expected)
