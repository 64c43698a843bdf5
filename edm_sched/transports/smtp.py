"""The SMTP transport, built on aiosmtplib.

Service settings (``ServiceConfig.settings``; no secrets there):

============== ======================================================= ==========
key            meaning                                                 default
============== ======================================================= ==========
host           server name or address                                  (required)
port           TCP port                                                25; 465 for
                                                                       ``ssl``; 587
                                                                       for
                                                                       ``starttls``
security       ``none``, ``starttls`` (mandatory upgrade) or ``ssl``   ``none``
               (TLS from the first byte)
username       AUTH user name; AUTH is skipped without one             none
validate_certs verify the server certificate and host name             true
timeout        seconds for connecting and for each server reply        transport's
============== ======================================================= ==========

The password is obtained only from the transport's ``resolver`` called with
the service's ``credential_ref``, at each (re)connection; it is not kept after
the login, never logged, and removed from any server text that ends up in a
:class:`SendResult`. A ``password`` key in the settings is refused.

Connections: one per service (keyed by ``service_id``), reused across sends
and used by one send at a time (an ``asyncio.Lock`` per service). A connection
the server closed while idle is replaced transparently. If a *reused*
connection fails at MAIL FROM or RCPT TO (before any message data went out),
the send is tried once more on a fresh connection; once the DATA command has
been issued it is never retried, since the server may have accepted the
message and a retry could deliver it twice.

Outcomes (see :func:`classify_reply` for reply codes):

* a 2xx reply to the message data → ``SENT``; ``provider_id`` is the queue id
  in the reply text when there is one (``queued as ID``, ``id=ID``, or a
  leading id-like token), else None.
* failing to connect (refused, reset, timeout, a greeting other than 220, TLS
  failure), authentication failure, a missing credential or invalid settings
  → ``SERVICE``; the connection is dropped.
* a timeout or disconnect after the connection was established →
  ``TRANSIENT``: the message is retried later and counts an attempt.
* every send reports ``response_ms``: the time of the SMTP exchange for this
  message, including (re)connecting and logging in when that was needed, but
  not the wait for the service's lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import aiosmtplib

from edm_sched.transports.base import (
    CredentialResolver,
    Message,
    Outcome,
    SendResult,
    ServiceConfig,
)

log = logging.getLogger("edm_sched.transports.smtp")

SECURITY_MODES = ("none", "starttls", "ssl")
DEFAULT_PORTS = {"none": 25, "starttls": 587, "ssl": 465}

SERVICE_CODES = frozenset({421, 432, 454, 530, 534, 535, 538})
"""Replies that say the account or server is unusable now, whatever the message."""

MAX_DETAIL = 500


def classify_reply(code: int, *, at_mail_from: bool = False) -> Outcome:
    """Map an SMTP reply code onto what the scheduler must do.

    ====================================== ==============================================
    code                                   outcome
    ====================================== ==============================================
    2xx                                    ``SENT``
    421 service closing, 454 temporary     ``SERVICE``: the account backs off; the
    auth/TLS failure, 432 password         message goes back to pending without using
    transition, 530 auth required, 534     an attempt
    mechanism too weak, 535 bad
    credentials, 538 encryption required
    other 4xx (450, 451, 452...)           ``TRANSIENT``: this message, later
    other 5xx (550, 552, 554...)           ``PERMANENT``: this message never goes
                                           (550/551/553 also suppress the address, in SQL)
    anything else (1xx, 3xx, garbage)      ``TRANSIENT``: an unexpected reply mid-
                                           transaction is not proof of anything
    ====================================== ==============================================

    ``at_mail_from=True`` is for a refusal of MAIL FROM, i.e. of our *sender*:
    a 5xx there (sender not allowed for this account, client blocked...) says
    nothing about the recipient, so it is ``SERVICE`` rather than
    ``PERMANENT`` (which for 550/551/553 would suppress an innocent
    recipient); only 552 (message too large for the announced SIZE) stays
    ``PERMANENT``, as it is about this message.
    """
    if 200 <= code < 300:
        return Outcome.SENT
    if code in SERVICE_CODES:
        return Outcome.SERVICE
    if 400 <= code < 500:
        return Outcome.TRANSIENT
    if 500 <= code < 600:
        if at_mail_from and code != 552:
            return Outcome.SERVICE
        return Outcome.PERMANENT
    return Outcome.TRANSIENT


_QUEUED_AS = re.compile(r"\bqueued as\s+<?([^\s<>;,]+)", re.IGNORECASE)
_ID_EQUALS = re.compile(r"\bid=<?([^\s<>;,]+)", re.IGNORECASE)
_ENHANCED_STATUS = re.compile(r"^\s*[245]\.\d{1,3}\.\d{1,3}\s*")
_ID_TOKEN = re.compile(r"^<?([A-Za-z0-9][A-Za-z0-9._@:+=-]{5,199})>?[;,.]?$")


def parse_queue_id(text: str) -> str | None:
    """The provider's queue/message id in a reply to DATA, or None.

    Recognises Postfix-style ``queued as ID``, Exim-style ``id=ID``, and else
    the longest id-like token (at least 6 characters, with a digit) among the
    first four words after the enhanced status code ("2.0.0 Ok: 4Bc1X9z2Q"),
    as sendmail, SES and most providers answer. "250 OK" has none.
    """
    for pattern in (_QUEUED_AS, _ID_EQUALS):
        match = pattern.search(text)
        if match:
            return match.group(1)[:200]
    best: str | None = None
    for word in _ENHANCED_STATUS.sub("", text, count=1).split()[:4]:
        match = _ID_TOKEN.match(word)
        if match and any(c.isdigit() for c in match.group(1)):
            token = match.group(1)
            if best is None or len(token) > len(best):
                best = token
    return best


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int
    security: str
    username: str | None
    validate_certs: bool
    timeout: float


def parse_settings(settings: Mapping[str, Any], default_timeout: float = 30.0) -> SmtpSettings:
    """Validate a service's settings; ``ValueError`` (without any values) when invalid."""
    if "password" in settings:
        raise ValueError("settings must not hold a password; use the service's credential_ref")
    host = settings.get("host")
    if not isinstance(host, str) or not host.strip():
        raise ValueError("settings.host is required")
    security = settings.get("security", "none")
    if not isinstance(security, str) or security.lower() not in SECURITY_MODES:
        raise ValueError(f"settings.security must be one of {', '.join(SECURITY_MODES)}")
    security = security.lower()
    port_setting = settings.get("port")
    if port_setting is None:
        port = DEFAULT_PORTS[security]
    else:
        try:
            port = int(port_setting)
        except (TypeError, ValueError):
            raise ValueError("settings.port must be an integer") from None
        if isinstance(port_setting, bool) or not 0 < port < 65536:
            raise ValueError("settings.port must be an integer between 1 and 65535")
    username = settings.get("username")
    if username is not None and (not isinstance(username, str) or not username):
        raise ValueError("settings.username must be a non-empty string")
    validate_certs = settings.get("validate_certs", True)
    if not isinstance(validate_certs, bool):
        raise ValueError("settings.validate_certs must be true or false")
    timeout_setting = settings.get("timeout", default_timeout)
    try:
        timeout = float(timeout_setting)
    except (TypeError, ValueError):
        raise ValueError("settings.timeout must be a number of seconds") from None
    if isinstance(timeout_setting, bool) or not timeout > 0:
        raise ValueError("settings.timeout must be a positive number of seconds")
    return SmtpSettings(host.strip(), port, security, username, validate_certs, timeout)


@dataclass
class _Connection:
    smtp: aiosmtplib.SMTP
    settings: SmtpSettings
    credential_ref: str | None
    messages: int = 0


def _redact(text: str, secret: str | None) -> str:
    if secret:
        text = text.replace(secret, "[redacted]")
    return text


def _detail(text: str, secret: str | None = None) -> str:
    text = _redact(" ".join(text.split()), secret)
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 3] + "..."


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class SmtpTransport:
    """Sends through SMTP servers, one reused connection per service.

    ``resolver`` maps a service's ``credential_ref`` to its password;
    ``timeout`` is the default for services without a ``timeout`` setting;
    ``hostname`` is the name sent in EHLO (default: this host's FQDN).
    """

    def __init__(
        self,
        resolver: CredentialResolver | None = None,
        *,
        timeout: float = 30.0,
        hostname: str | None = None,
    ) -> None:
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        self._resolver = resolver
        self._timeout = timeout
        self._hostname = hostname
        self._connections: dict[int, _Connection] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"SmtpTransport(connections={sorted(self._connections)})"

    # -- the protocol --------------------------------------------------------

    async def send(self, service: ServiceConfig, message: Message) -> SendResult:
        sid = service.service_id
        self._adopt_running_loop()
        async with self._lock(sid):
            started = time.perf_counter()
            try:
                result = await self._send_locked(service, message)
            except asyncio.CancelledError:
                # Cancelled mid-conversation: the connection's state is unknown.
                self._discard(sid)
                raise
            except Exception as exc:  # a transport returns, never raises
                self._discard(sid)
                log.warning("service %s: unexpected %s in SMTP send", sid, type(exc).__name__)
                result = SendResult(Outcome.TRANSIENT, detail=_detail(_describe(exc)))
            elapsed_ms = round((time.perf_counter() - started) * 1000)
            return replace(result, response_ms=elapsed_ms)

    async def aclose(self) -> None:
        """QUIT every connection (each after its in-flight send, if any)."""
        self._adopt_running_loop()
        for sid in list(self._connections):
            async with self._lock(sid):
                conn = self._connections.pop(sid, None)
                if conn is not None:
                    await self._quit(conn)

    # -- internals -----------------------------------------------------------

    def _adopt_running_loop(self) -> None:
        """Forget connections and locks made on another (finished) event loop."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        self._loop = loop
        stale = list(self._connections.values())
        self._connections.clear()
        self._locks.clear()
        for conn in stale:
            # Its loop is closed, so the transport cannot close itself (RuntimeError):
            # end the TCP connection; the file descriptor goes when it is collected.
            with contextlib.suppress(OSError, RuntimeError):
                sock = conn.smtp.get_transport_info("socket")
                if sock is not None:
                    sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(RuntimeError):
                conn.smtp.close()

    def _lock(self, sid: int) -> asyncio.Lock:
        lock = self._locks.get(sid)
        if lock is None:
            lock = self._locks[sid] = asyncio.Lock()
        return lock

    def _discard(self, sid: int) -> None:
        conn = self._connections.pop(sid, None)
        if conn is not None:
            conn.smtp.close()

    async def _quit(self, conn: _Connection) -> None:
        try:
            if conn.smtp.is_connected:
                await conn.smtp.quit(timeout=min(conn.settings.timeout, 5.0))
        except (aiosmtplib.SMTPException, OSError):
            pass
        finally:
            conn.smtp.close()

    async def _send_locked(self, service: ServiceConfig, message: Message) -> SendResult:
        sid = service.service_id
        try:
            settings = parse_settings(service.settings, self._timeout)
        except ValueError as exc:
            self._discard(sid)
            return SendResult(Outcome.SERVICE, detail=f"invalid SMTP settings: {exc}")

        conn = self._connections.get(sid)
        if conn is not None and (
            not conn.smtp.is_connected
            or conn.settings != settings
            or conn.credential_ref != service.credential_ref
        ):
            # Closed by the server while idle, or the service was reconfigured.
            self._discard(sid)
            conn = None

        for attempt in (1, 2):
            reused = conn is not None
            if conn is None:
                connected = await self._connect(service, settings)
                if isinstance(connected, SendResult):
                    return connected
                conn = self._connections[sid] = connected
            result, dead_before_data = await self._transaction(conn, message)
            if result.outcome is Outcome.SERVICE or not conn.smtp.is_connected:
                self._discard(sid)
            if dead_before_data and reused and attempt == 1:
                log.info("service %s: reused connection was dead (%s); reconnecting",
                         sid, result.detail)
                conn = None
                continue
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _resolve_password(self, service: ServiceConfig) -> str | None:
        if self._resolver is None or service.credential_ref is None:
            return None
        try:
            return self._resolver(service.credential_ref)
        except Exception as exc:
            # The exception text could quote the secret store: log the type only.
            log.warning("service %s: credential resolver raised %s",
                        service.service_id, type(exc).__name__)
            return None

    async def _local_hostname(self) -> str:
        if self._hostname is None:
            self._hostname = await asyncio.to_thread(socket.getfqdn)
        return self._hostname

    async def _connect(
        self, service: ServiceConfig, settings: SmtpSettings
    ) -> _Connection | SendResult:
        sid = service.service_id
        password: str | None = None
        if settings.username is not None:
            password = self._resolve_password(service)
            if not password:
                log.warning("service %s: no credential for credential_ref %r",
                            sid, service.credential_ref)
                return SendResult(
                    Outcome.SERVICE,
                    detail=f"no credential for credential_ref {service.credential_ref!r}",
                )
        smtp = aiosmtplib.SMTP(
            hostname=settings.host,
            port=settings.port,
            local_hostname=await self._local_hostname(),
            timeout=settings.timeout,
            use_tls=settings.security == "ssl",
            start_tls=settings.security == "starttls",
            validate_certs=settings.validate_certs,
        )
        stage = "connect"
        try:
            await smtp.connect()
            if smtp.is_ehlo_or_helo_needed:
                # EHLO before the first MAIL FROM reads the extensions: without it a
                # fresh plain connection offers no SMTPUTF8 (nor SIZE) to _transaction.
                stage = "EHLO"
                await smtp.ehlo()
            if settings.username is not None and password is not None:
                stage = "AUTH"
                # Passed to login() only, so the SMTP object never stores it.
                await smtp.login(settings.username, password)
        except aiosmtplib.SMTPResponseException as exc:
            smtp.close()
            detail = _detail(f"{stage}: {exc.code} {exc.message}", password)
            log.warning("service %s: %s:%s refused us: %s",
                        sid, settings.host, settings.port, detail)
            return SendResult(Outcome.SERVICE, code=exc.code, detail=detail)
        except (aiosmtplib.SMTPException, OSError) as exc:  # includes timeouts and TLS errors
            smtp.close()
            detail = _detail(f"{stage}: {_describe(exc)}", password)
            log.warning("service %s: cannot use %s:%s: %s",
                        sid, settings.host, settings.port, detail)
            return SendResult(Outcome.SERVICE, detail=detail)
        log.debug("service %s: connected to %s:%s (%s)",
                  sid, settings.host, settings.port, settings.security)
        return _Connection(smtp, settings, service.credential_ref)

    async def _transaction(
        self, conn: _Connection, message: Message
    ) -> tuple[SendResult, bool]:
        """One MAIL/RCPT/DATA exchange; returns (result, connection died before DATA)."""
        smtp = conn.smtp
        stage = "MAIL FROM"
        try:
            utf8 = not (message.sender.isascii() and message.recipient.isascii())
            options: list[str] = []
            if utf8:
                if not smtp.supports_extension("smtputf8"):
                    return SendResult(
                        Outcome.PERMANENT,
                        detail="non-ASCII address and the server does not offer SMTPUTF8",
                    ), False
                options.append("SMTPUTF8")
            if smtp.supports_extension("size"):
                options.append(f"SIZE={len(message.data)}")
            if not message.data.isascii() and smtp.supports_extension("8bitmime"):
                options.append("BODY=8BITMIME")
            encoding = "utf-8" if utf8 else "ascii"
            await smtp.mail(message.sender, options=options, encoding=encoding)
            stage = "RCPT TO"
            await smtp.rcpt(message.recipient, encoding=encoding)
            stage = "DATA"
            reply = await smtp.data(message.data)
        except aiosmtplib.SMTPResponseException as exc:
            await self._reset(smtp)
            outcome = classify_reply(exc.code, at_mail_from=stage == "MAIL FROM")
            if exc.code < 200:  # unparseable reply: the conversation is out of step
                smtp.close()
            detail = _detail(f"{stage}: {exc.code} {exc.message}")
            return SendResult(outcome, code=exc.code, detail=detail), False
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
            smtp.close()
            detail = _detail(f"{stage}: {_describe(exc)}")
            return SendResult(Outcome.TRANSIENT, detail=detail), stage != "DATA"
        except ValueError as exc:
            # An address that cannot go on the wire (bad syntax, CR/LF in it).
            await self._reset(smtp)
            return SendResult(Outcome.PERMANENT, detail=_detail(f"{stage}: {exc}")), False
        conn.messages += 1
        return SendResult(
            classify_reply(reply.code),
            code=reply.code,
            provider_id=parse_queue_id(reply.message),
        ), False

    async def _reset(self, smtp: aiosmtplib.SMTP) -> None:
        """RSET after a refusal so the connection can carry the next message."""
        if not smtp.is_connected:
            return
        try:
            await smtp.rset()
        except (aiosmtplib.SMTPException, OSError):
            smtp.close()
