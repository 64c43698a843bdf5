"""The SMTP transport, built on aiosmtplib.

Service settings (``ServiceConfig.settings``; no secrets there):

================ ===================================================== ============
key              meaning                                               default
================ ===================================================== ============
host             server name or address                                (required)
port             TCP port                                              25; 465 for
                                                                       ``ssl``; 587
                                                                       for
                                                                       ``starttls``
security         ``none``, ``starttls`` (mandatory upgrade) or         ``none``
                 ``ssl`` (TLS from the first byte)
username         AUTH user name; AUTH is skipped without one           none
validate_certs   verify the server certificate and host name           true
timeout          seconds: the default of the three settings below      transport's
                                                                       (30)
connect_timeout  seconds to open the TCP connection (name lookup       ``timeout``
                 included)
greeting_timeout seconds to wait for the server's 220 greeting (and,   ``timeout``
                 with ``ssl``, the TLS handshake before it)
command_timeout  seconds to wait for the reply to each command: EHLO,  ``timeout``
                 STARTTLS (and its handshake), AUTH, MAIL FROM, RCPT
                 TO, DATA (its 354), RSET
data_timeout     seconds to write the message data and then wait for   600
                 the reply to the final dot (RFC 5321 §4.5.3.2
                 recommends 10 minutes: giving up earlier invites
                 duplicates)
max_connections  connections this transport may open to the service   1
                 at once (each carries one send at a time)
================ ===================================================== ============

The password is obtained only from the transport's ``resolver`` called with
the service's ``credential_ref``, at each (re)connection; it is not kept after
the login, never logged, and removed from any server text that ends up in a
:class:`SendResult`. A ``password`` key in the settings is refused.

Connections: a small pool per service (keyed by ``service_id``), at most
``max_connections`` of them, reused across sends; each carries one send at a
time, and a send waits for a free one. A connection the server closed while
idle is replaced transparently. If a *reused* connection fails at MAIL FROM
or RCPT TO (before any message data went out), the send is tried once more on
a fresh connection; once the DATA command has been issued it is never
retried, since the server may have accepted the message and a retry could
deliver it twice. :meth:`SmtpTransport.prepare` opens, greets and logs in a
service's connection ahead of its first send.

The DATA exchange is done in steps so that the transport knows exactly
whether the final dot left: the DATA command and its 354 reply
(``command_timeout``); the message data, written and flushed to the
operating system (``data_timeout``); only then the final ``.``, and the
wait for its reply (``data_timeout``). A connection lost before the final dot
was written cannot have delivered anything (``TRANSIENT``); lost, reset or
timed out after it, the server may have the message (``UNCERTAIN``). A
message of at most ``ONE_WRITE_MAX`` (64 KiB) is written together with its
dot: the operating system takes it at once, so the event loop could not see a
loss between the two writes anyway, and one system call is saved.

Outcomes (see :func:`classify_reply` for reply codes):

* a 2xx reply to the message data → ``SENT``; ``provider_id`` is the queue id
  in the reply text when there is one (``queued as ID``, ``id=ID``, or a
  leading id-like token), else None.
* failing to connect (refused, reset, timeout, no greeting within
  ``greeting_timeout``, a greeting other than 220, TLS failure),
  authentication failure, a missing credential or invalid settings →
  ``SERVICE``; the connection is dropped.
* a timeout or disconnect after the connection was established and before
  the final dot was written → ``TRANSIENT``: the message is retried later and
  counts an attempt.
* a timeout, reset or disconnect after the final dot was written and before
  its reply → ``UNCERTAIN``: the scheduler records it before any resend.
* every send reports ``response_ms``: the time of the SMTP exchange for this
  message, including (re)connecting and logging in when that was needed, but
  not the wait for a free connection of the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
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



DEFAULT_DATA_TIMEOUT = 600.0
"""Seconds for the message data and the reply to the final dot (RFC 5321 §4.5.3.2)."""

ONE_WRITE_MAX = 64 * 1024
"""Messages up to this size (on the wire) are written with their final dot at once."""

_TIMEOUT_KEYS = ("connect_timeout", "greeting_timeout", "command_timeout")


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int
    security: str
    username: str | None
    validate_certs: bool
    timeout: float
    connect_timeout: float | None = None  # None: ``timeout``
    greeting_timeout: float | None = None
    command_timeout: float | None = None
    data_timeout: float = DEFAULT_DATA_TIMEOUT
    max_connections: int = 1

    @property
    def connect(self) -> float:
        return self.connect_timeout if self.connect_timeout is not None else self.timeout

    @property
    def greeting(self) -> float:
        return self.greeting_timeout if self.greeting_timeout is not None else self.timeout

    @property
    def command(self) -> float:
        return self.command_timeout if self.command_timeout is not None else self.timeout

    @property
    def endpoint(self) -> tuple[str, int, str, str | None, bool]:
        """What a connection is bound to: a change of any of these needs a new one."""
        return (self.host, self.port, self.security, self.username, self.validate_certs)


def _seconds(settings: Mapping[str, Any], key: str, default: float) -> float:
    value = settings.get(key, default)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"settings.{key} must be a number of seconds") from None
    if isinstance(value, bool) or not 0 < seconds < math.inf:
        raise ValueError(f"settings.{key} must be a positive number of seconds")
    return seconds


def parse_settings(
    settings: Mapping[str, Any],
    default_timeout: float = 30.0,
    default_data_timeout: float = DEFAULT_DATA_TIMEOUT,
) -> SmtpSettings:
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
    timeout = _seconds(settings, "timeout", default_timeout)
    phases = {key: _seconds(settings, key, timeout) if key in settings else None
              for key in _TIMEOUT_KEYS}
    data_timeout = _seconds(settings, "data_timeout", default_data_timeout)
    cap = settings.get("max_connections", 1)
    if isinstance(cap, str) and cap.strip().isdigit():
        cap = int(cap)
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ValueError("settings.max_connections must be a positive integer")
    return SmtpSettings(
        host.strip(), port, security, username, validate_certs, timeout,
        data_timeout=data_timeout, max_connections=cap, **phases,
    )


@dataclass
class _Connection:
    smtp: aiosmtplib.SMTP
    settings: SmtpSettings
    credential_ref: str | None
    messages: int = 0

    def usable_for(self, settings: SmtpSettings, credential_ref: str | None) -> bool:
        return (self.smtp.is_connected and self.settings.endpoint == settings.endpoint
                and self.credential_ref == credential_ref)


class _Pool:
    """One service's connections: the idle ones, and how many sends hold one."""

    def __init__(self) -> None:
        self.idle: list[_Connection] = []
        self.busy = 0
        self.changed = asyncio.Condition()
        # When the last prepare() failed to connect, and how (a send that was
        # waiting for that attempt reports it instead of trying again at once).
        self.failure: tuple[float, SendResult] | None = None

    async def take(self, cap: int) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: self.busy < cap)
            self.busy += 1

    async def give_back(self) -> None:
        async with self.changed:
            self.busy -= 1
            self.changed.notify_all()

    def take_idle(self, settings: SmtpSettings, credential_ref: str | None) -> _Connection | None:
        """The most recently used idle connection that still fits; stale ones are closed."""
        while self.idle:
            conn = self.idle.pop()
            if conn.usable_for(settings, credential_ref):
                return conn
            # Closed by the server while idle, or the service was reconfigured.
            conn.smtp.close()
        return None

    async def quiet(self) -> list[_Connection]:
        """Wait until no send holds a connection; hand over (and forget) the idle ones."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.busy == 0)
            idle, self.idle = self.idle, []
        return idle

    def close_idle(self) -> None:
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.smtp.close()


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


_LINE_ENDS = re.compile(rb"\r\n|\n|\r(?!\n)")
_LEADING_DOT = re.compile(rb"(?m)^\.")


def wire_data(data: bytes) -> bytes:
    """The message as it goes after 354, without the final dot.

    Line ends become CRLF, the data ends with CRLF, and a line that starts
    with ``.`` gets another one (RFC 5321 §4.5.2, dot-stuffing).
    """
    # Fast paths (the builder already writes CRLF, and few lines start with a
    # dot): the substitutions cost 0.2 s of event loop on a 5 MB message.
    crlf = data.count(b"\r\n")
    if crlf != data.count(b"\n") or crlf != data.count(b"\r"):
        data = _LINE_ENDS.sub(b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b".") or b"\n." in data:
        data = _LEADING_DOT.sub(b"..", data)
    return data


async def _open_socket(host: str, port: int) -> socket.socket:
    """A connected non-blocking TCP socket to the first address of ``host`` that answers."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
        except BaseException:
            sock.close()
            raise
        else:
            return sock
    raise error


def _abandon(smtp: aiosmtplib.SMTP | None, sock: socket.socket | None) -> None:
    """Close a connection that failed to open.

    Once aiosmtplib has the socket, its transport closes it (closing it here
    could pull a file descriptor from under the event loop).
    """
    if smtp is not None:
        smtp.close()
    elif sock is not None:
        sock.close()


class _Flushed(Exception):
    """The connection was lost while the message data was being flushed."""


async def _flush(smtp: aiosmtplib.SMTP) -> None:
    """Wait until everything written left asyncio's buffers for the operating system.

    Over TLS this sees the TLS layer's buffer only; the dot may then be
    written a little early, which can only turn a certain ``TRANSIENT`` into
    an ``UNCERTAIN``, never the reverse.
    """
    while True:
        transport = smtp.protocol.transport if smtp.protocol is not None else None
        if not isinstance(transport, asyncio.WriteTransport) or transport.is_closing():
            raise _Flushed("connection lost while writing the message")
        if transport.get_write_buffer_size() == 0:
            return
        await asyncio.sleep(0.001)


class SmtpTransport:
    """Sends through SMTP servers over a small pool of reused connections per service.

    ``resolver`` maps a service's ``credential_ref`` to its password;
    ``timeout`` is the default for services without a ``timeout`` setting,
    ``data_timeout`` for those without a ``data_timeout`` setting;
    ``hostname`` is the name sent in EHLO (default: this host's FQDN).
    """

    def __init__(
        self,
        resolver: CredentialResolver | None = None,
        *,
        timeout: float = 30.0,
        hostname: str | None = None,
        data_timeout: float = DEFAULT_DATA_TIMEOUT,
    ) -> None:
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        if not data_timeout > 0:
            raise ValueError("data_timeout must be positive")
        self._resolver = resolver
        self._timeout = timeout
        self._data_timeout = data_timeout
        self._hostname = hostname
        self._pools: dict[int, _Pool] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"SmtpTransport(services={sorted(self._pools)})"

    # -- the protocol --------------------------------------------------------

    async def send(self, service: ServiceConfig, message: Message) -> SendResult:
        sid = service.service_id
        self._adopt_running_loop()
        pool = self._pool(sid)
        try:
            settings = parse_settings(service.settings, self._timeout, self._data_timeout)
        except ValueError as exc:
            pool.close_idle()
            return SendResult(Outcome.SERVICE, detail=f"invalid SMTP settings: {exc}",
                              response_ms=0)
        waiting_since = time.monotonic()
        await pool.take(settings.max_connections)
        try:
            started = time.perf_counter()
            if pool.failure is not None and pool.failure[0] >= waiting_since:
                # prepare() failed to connect while this send waited for it.
                result = pool.failure[1]
            else:
                try:
                    result = await self._send_taken(pool, service, settings, message)
                except Exception as exc:  # a transport returns, never raises
                    log.warning("service %s: unexpected %s in SMTP send",
                                sid, type(exc).__name__)
                    result = SendResult(Outcome.TRANSIENT, detail=_detail(_describe(exc)))
            elapsed_ms = round((time.perf_counter() - started) * 1000)
            return replace(result, response_ms=elapsed_ms)
        finally:
            await pool.give_back()

    async def prepare(self, service: ServiceConfig) -> None:
        """Open, greet and log in one connection of ``service`` ahead of its first send.

        Does nothing when the service has an idle connection already or all of
        its ``max_connections`` are in use. Never raises: a failure is logged,
        and reported by the next send (which tries again, unless it was
        already waiting for this attempt).
        """
        sid = service.service_id
        try:
            self._adopt_running_loop()
            settings = parse_settings(service.settings, self._timeout, self._data_timeout)
        except (ValueError, RuntimeError) as exc:
            log.warning("service %s: cannot prepare: %s", sid, exc)
            return
        pool = self._pool(sid)
        conn = pool.take_idle(settings, service.credential_ref)
        if conn is not None:
            pool.idle.append(conn)
            return
        if pool.busy >= settings.max_connections:
            return
        await pool.take(settings.max_connections)
        try:
            connected = await self._connect(service, settings)
            if isinstance(connected, SendResult):
                pool.failure = (time.monotonic(), replace(
                    connected, detail=_detail(f"prepare: {connected.detail or ''}")))
            else:
                pool.failure = None
                pool.idle.append(connected)
        except Exception as exc:
            log.warning("service %s: unexpected %s while preparing a connection",
                        sid, type(exc).__name__)
        finally:
            await pool.give_back()

    async def aclose(self) -> None:
        """QUIT every connection (each after its in-flight send, if any)."""
        self._adopt_running_loop()
        for pool in list(self._pools.values()):
            for conn in await pool.quiet():
                await self._quit(conn)

    # -- internals -----------------------------------------------------------

    def _adopt_running_loop(self) -> None:
        """Forget connections and pools made on another (finished) event loop."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        self._loop = loop
        stale = [conn for pool in self._pools.values() for conn in pool.idle]
        self._pools.clear()
        for conn in stale:
            # Its loop is closed, so the transport cannot close itself (RuntimeError):
            # end the TCP connection; the file descriptor goes when it is collected.
            with contextlib.suppress(OSError, RuntimeError):
                sock = conn.smtp.get_transport_info("socket")
                if sock is not None:
                    sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(RuntimeError):
                conn.smtp.close()

    def _pool(self, sid: int) -> _Pool:
        pool = self._pools.get(sid)
        if pool is None:
            pool = self._pools[sid] = _Pool()
        return pool

    async def _quit(self, conn: _Connection) -> None:
        try:
            if conn.smtp.is_connected:
                await conn.smtp.quit(timeout=min(conn.settings.command, 5.0))
        except (aiosmtplib.SMTPException, OSError):
            pass
        finally:
            conn.smtp.close()

    async def _send_taken(
        self, pool: _Pool, service: ServiceConfig, settings: SmtpSettings, message: Message
    ) -> SendResult:
        """Send on an idle or new connection of ``pool``, whose slot the caller holds."""
        sid = service.service_id
        conn = pool.take_idle(settings, service.credential_ref)
        for attempt in (1, 2):
            reused = conn is not None
            if conn is None:
                connected = await self._connect(service, settings)
                if isinstance(connected, SendResult):
                    return connected
                conn = connected
            try:
                result, dead_before_data = await self._transaction(conn, settings, message)
            except BaseException:
                conn.smtp.close()  # cancelled or broken mid-conversation: state unknown
                raise
            if result.outcome is Outcome.SERVICE or not conn.smtp.is_connected:
                conn.smtp.close()
            else:
                pool.idle.append(conn)
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
        """Connect, greet, EHLO, STARTTLS, EHLO, AUTH: each within its own timeout."""
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
        local_hostname = await self._local_hostname()
        stage = "connect"
        sock: socket.socket | None = None
        smtp: aiosmtplib.SMTP | None = None
        try:
            try:
                async with asyncio.timeout(settings.connect):
                    sock = await _open_socket(settings.host, settings.port)
            except TimeoutError:
                raise TimeoutError(f"no connection within {settings.connect:g} s") from None
            smtp = aiosmtplib.SMTP(
                hostname=settings.host,
                sock=sock,
                local_hostname=local_hostname,
                timeout=settings.command,  # aiosmtplib's default for each command
                use_tls=settings.security == "ssl",
                start_tls=False,  # done below, within command_timeout
                validate_certs=settings.validate_certs,
            )
            stage = "greeting"
            await smtp.connect(timeout=settings.greeting)
            stage = "EHLO"
            await self._ehlo(smtp, settings)
            if settings.security == "starttls":
                stage = "STARTTLS"
                await smtp.starttls(timeout=settings.command)
                stage = "EHLO"
                await self._ehlo(smtp, settings)
            if settings.username is not None and password is not None:
                stage = "AUTH"
                # Passed to login() only, so the SMTP object never stores it.
                await smtp.login(settings.username, password, timeout=settings.command)
        except aiosmtplib.SMTPResponseException as exc:
            _abandon(smtp, sock)
            detail = _detail(f"{stage}: {exc.code} {exc.message}", password)
            log.warning("service %s: %s:%s refused us: %s",
                        sid, settings.host, settings.port, detail)
            return SendResult(Outcome.SERVICE, code=exc.code, detail=detail)
        except (aiosmtplib.SMTPException, OSError) as exc:  # includes timeouts and TLS errors
            _abandon(smtp, sock)
            detail = _detail(f"{stage}: {_describe(exc)}", password)
            log.warning("service %s: cannot use %s:%s: %s",
                        sid, settings.host, settings.port, detail)
            return SendResult(Outcome.SERVICE, detail=detail)
        except BaseException:
            _abandon(smtp, sock)
            raise
        log.debug("service %s: connected to %s:%s (%s)",
                  sid, settings.host, settings.port, settings.security)
        return _Connection(smtp, settings, service.credential_ref)

    async def _ehlo(self, smtp: aiosmtplib.SMTP, settings: SmtpSettings) -> None:
        try:
            await smtp.ehlo(timeout=settings.command)
        except aiosmtplib.SMTPHeloError:
            if not smtp.is_connected:
                raise
            await smtp.helo(timeout=settings.command)

    async def _transaction(
        self, conn: _Connection, settings: SmtpSettings, message: Message
    ) -> tuple[SendResult, bool]:
        """One MAIL/RCPT/DATA exchange; returns (result, connection died before DATA)."""
        smtp = conn.smtp
        command = settings.command
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
            try:
                await smtp.mail(message.sender, options=options, encoding=encoding,
                                timeout=command)
            finally:
                # The server has seen the transaction start by now (or never will):
                # the lane paces the next start from this instant.
                if message.on_start is not None:
                    message.on_start(time.monotonic())
            stage = "RCPT TO"
            await smtp.rcpt(message.recipient, encoding=encoding, timeout=command)
            stage = "DATA"
            start = await smtp.execute_command(b"DATA", timeout=command)
            if start.code != 354:
                raise aiosmtplib.SMTPDataError(start.code, start.message)
            payload = wire_data(message.data)
            protocol = smtp.protocol
            if protocol is None:
                raise aiosmtplib.SMTPServerDisconnected("connection lost")
            if len(payload) <= ONE_WRITE_MAX:
                # Handed to the OS in one piece: writing the dot apart would not let
                # the event loop see a loss in between, only cost a system call.
                return await self._final_dot(conn, settings, message, payload), False
            # A large message is flushed to the OS before the final dot: a
            # connection lost until then provably delivered nothing.
            protocol.write(payload)
            try:
                async with asyncio.timeout(settings.data_timeout):
                    await _flush(smtp)
            except TimeoutError:
                raise aiosmtplib.SMTPTimeoutError(
                    f"message data not written within {settings.data_timeout:g} s") from None
            except _Flushed as exc:
                raise aiosmtplib.SMTPServerDisconnected(str(exc)) from None
        except aiosmtplib.SMTPResponseException as exc:
            await self._reset(smtp, command)
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
            await self._reset(smtp, command)
            return SendResult(Outcome.PERMANENT, detail=_detail(f"{stage}: {exc}")), False
        except BaseException:
            smtp.close()
            raise
        return await self._final_dot(conn, settings, message), False

    async def _final_dot(
        self, conn: _Connection, settings: SmtpSettings, message: Message, data: bytes = b""
    ) -> SendResult:
        """Write ``data`` and the final dot, then await the reply: a failure now is UNCERTAIN."""
        smtp = conn.smtp
        protocol = smtp.protocol
        try:
            if protocol is None:
                raise aiosmtplib.SMTPServerDisconnected("connection lost")
            # No await between the write and read_response(): the reply cannot be missed.
            protocol.write(data + b".\r\n")
        except Exception as exc:
            # Refused by the transport: the dot never went out.
            smtp.close()
            return SendResult(Outcome.TRANSIENT, detail=_detail(f"DATA: {_describe(exc)}"))
        try:
            reply = await protocol.read_response(timeout=settings.data_timeout)
        except Exception as exc:
            smtp.close()
            what = (f"no reply within {settings.data_timeout:g} s"
                    if isinstance(exc, aiosmtplib.SMTPTimeoutError) else _describe(exc))
            log.warning("%s: uncertain outcome, %s after the final dot",
                        message.message_id, what)
            return SendResult(
                Outcome.UNCERTAIN,
                detail=_detail(f"DATA: after the final dot, {what}; the server may have it"),
            )
        except BaseException:
            smtp.close()
            raise
        conn.messages += 1
        outcome = classify_reply(reply.code)
        if outcome is not Outcome.SENT:
            if reply.code < 200:  # unparseable reply: the conversation is out of step
                smtp.close()
            await self._reset(smtp, settings.command)
            return SendResult(outcome, code=reply.code,
                              detail=_detail(f"DATA: {reply.code} {reply.message}"))
        return SendResult(outcome, code=reply.code, provider_id=parse_queue_id(reply.message))

    async def _reset(self, smtp: aiosmtplib.SMTP, timeout: float) -> None:
        """RSET after a refusal so the connection can carry the next message."""
        if not smtp.is_connected:
            return
        try:
            await smtp.rset(timeout=timeout)
        except (aiosmtplib.SMTPException, OSError):
            smtp.close()
