"""A local SMTP sink for the demo, the tests and chaos benchmarks.

:class:`SmtpSink` runs an aiosmtpd server in a background thread and accepts
every message, recording for each envelope recipient the receive time, the
``Message-ID`` header and the ``X-Edm-Service`` header, and the time the
server read the transaction's ``MAIL FROM`` (``mail_from_at``: when the send
started, as a provider's rate limiter sees it). Records are kept in
memory (:attr:`SmtpSink.received`) and, with ``log_path``, appended to a JSON
Lines file, one flushed line per recipient, written *before* the sink answers
``250``: a sender killed with ``kill -9`` after that point cannot make a
message vanish from the log. :func:`read_log` loads such a file.

Misbehaviour on demand:

* ``rules(recipient)`` returns ``None`` to accept, or a reply such as
  ``(451, "4.7.1 try later")`` or ``(550, "5.1.1 no such user")`` to refuse
  that recipient at RCPT time (default) or at the end of DATA
  (``refuse_at="data"``). Refused transactions are kept in memory too
  (:attr:`SmtpSink.refused`, with the reply ``code``; not in the log file), so
  every transaction that reached the server can be counted against a limit.
* The recipient local part ``drop-connection`` makes the sink close the
  connection at RCPT without answering; ``drop-after-data`` closes it after
  the message body was received, without answering and without recording it
  (the "was it accepted?" case a sender cannot resolve).
* ``credentials`` (username → password) makes AUTH mandatory (PLAIN and LOGIN,
  allowed without TLS since this is a local test server).
* ``tls_context`` offers STARTTLS with that server context (mandatory with
  ``require_tls=True``), or with ``implicit_tls=True`` serves TLS from the
  first byte (port 465 style).
* :meth:`SmtpSink.close_connections` closes every open client connection,
  as a server does to idle connections.
* :class:`Throttle` is a ready-made ``rules`` that behaves like a throttling
  mailbox provider: from a given time (or while switched on), RCPT TO for
  recipients of chosen domains is answered with a throttling reply (by
  default Gmail's ``421 4.7.28 ... rate limited``), optionally only every Nth
  one; every other recipient is accepted. With ``log_refused=True`` the sink
  also writes refused recipients to its log (with their ``code``; accepted
  lines have ``code`` 250), so a run's whole conversation with the "provider"
  can be recomputed from the file.

As a separate process (used by chaos runs)::

    python -m edm_sched.testing.smtp_sink --port 0 --log received.jsonl

prints the bound port on the first line of stdout, then runs until SIGTERM
or SIGINT. A throttle is set up with ``--throttle-domains gmail.com,googlemail.com``
(plus ``--throttle-after SECONDS`` from start, ``--throttle-every N``,
``--throttle-reply "421 4.7.28 ..."``, ``--throttle-off`` to start switched
off), and SIGUSR1 switches it on and off; ``--log-refused`` logs refusals.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import signal
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Literal

try:
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("edm_sched.testing.smtp_sink needs the 'demo' extra (aiosmtpd): "
                      "pip install 'edm-sched[demo]'") from exc

log = logging.getLogger("edm_sched.testing.smtp_sink")

Rule = Callable[[str], tuple[int, str] | None]
"""Maps an envelope recipient to a refusal ``(code, text)``, or None to accept it."""

DROP_CONNECTION = "drop-connection"
"""Recipient local part that makes the sink hang up at RCPT without answering."""

DROP_AFTER_DATA = "drop-after-data"
"""Recipient local part that makes the sink hang up after the body, without answering."""

SERVICE_HEADER = "X-Edm-Service"

THROTTLE_REPLY = (421, "4.7.28 [127.0.0.1] Our system has detected an unusual rate of "
                       "unsolicited mail originating from your IP address. To protect our "
                       "users from spam, mail sent from your IP address has been temporarily "
                       "rate limited.")
"""Gmail's throttling reply, the default of :class:`Throttle`."""

_SERVER_NAME = "edm-sink.localhost"


@dataclass(frozen=True)
class Received:
    """One accepted message for one envelope recipient."""

    received_at: float  # time.time() when the sink accepted it
    recipient: str  # envelope recipient
    message_id: str | None  # the Message-ID header, as sent
    service: str | None  # the X-Edm-Service header, if any
    sender: str | None = None  # envelope sender
    size: int = 0  # bytes of message data received
    mail_from_at: float | None = None  # time.time() when the server read MAIL FROM
    code: int = 250  # the sink's reply: 250, or the refusal's code (SmtpSink.refused)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> Received:
        return cls(
            received_at=float(row["received_at"]),
            recipient=str(row["recipient"]),
            message_id=None if row.get("message_id") is None else str(row["message_id"]),
            service=None if row.get("service") is None else str(row["service"]),
            sender=None if row.get("sender") is None else str(row["sender"]),
            size=int(row.get("size") or 0),
            mail_from_at=None if row.get("mail_from_at") is None
            else float(row["mail_from_at"]),
            code=int(row.get("code") or 250),
        )


def read_log(path: str | Path) -> list[Received]:
    """Load a sink's JSON Lines log.

    A torn last line (the sink itself killed mid-write) is ignored; a bad line
    anywhere else raises ``ValueError``.
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    out: list[Received] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            out.append(Received.from_dict(json.loads(line)))
        except (ValueError, KeyError, TypeError) as exc:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a sink log line: {exc}") from exc
    return out


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _header(value: str | None) -> str | None:
    return None if value is None else " ".join(value.split())


def _local_part(address: str) -> str:
    return address.rsplit("@", 1)[0].strip("<>").lower()


class _SinkSMTP(SMTP):  # aiosmtpd ships no type information
    """aiosmtpd's server protocol, reporting connections to the sink."""

    def __init__(self, sink: SmtpSink, *args: Any, **kwargs: Any) -> None:
        self._sink = sink
        super().__init__(*args, **kwargs)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # STARTTLS calls connection_made again for the TLS layer: count TCP only.
        new_tcp = self._original_transport is None
        super().connection_made(transport)
        if new_tcp:
            self._sink._connection_opened(self)

    def connection_lost(self, error: Exception | None) -> None:
        self._sink._connection_closed(self)
        super().connection_lost(error)


class _SinkController(Controller):  # aiosmtpd ships no type information
    def __init__(self, sink: SmtpSink, *args: Any, **kwargs: Any) -> None:
        self._sink = sink
        super().__init__(*args, **kwargs)

    def factory(self) -> _SinkSMTP:
        return _SinkSMTP(self._sink, self.handler, **self.SMTP_kwargs)


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self._sink = sink

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        # What aiosmtpd does without this hook, plus the time the transaction started.
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        envelope.edm_mail_from_at = time.time()
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if _local_part(address) == DROP_CONNECTION:
            await _hang_up(server)
        if self._sink.refuse_at == "rcpt":
            refusal = self._sink._refusal(address)
            if refusal is not None:
                self._sink._record_refusal(envelope, [address], refusal)
                return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        recipients: list[str] = list(envelope.rcpt_tos)
        if any(_local_part(r) == DROP_AFTER_DATA for r in recipients):
            await _hang_up(server)
        if self._sink.refuse_at == "data":
            for recipient in recipients:
                refusal = self._sink._refusal(recipient)
                if refusal is not None:
                    self._sink._record_refusal(envelope, recipients, refusal, data=True)
                    return refusal
        data = envelope.original_content or b""
        if isinstance(data, str):  # pragma: no cover - only with decode_data=True
            data = data.encode("utf-8", "surrogateescape")
        queue_id = uuid.uuid4().hex[:16].upper()
        self._sink._record(envelope.mail_from, recipients, data,
                           getattr(envelope, "edm_mail_from_at", None))
        return f"250 2.0.0 Ok: queued as {queue_id}"


class Throttle:
    """A ``rules`` for :class:`SmtpSink` that throttles recipients of some domains.

    ``Throttle(domains, reply=THROTTLE_REPLY, *, every=1, start_at=None, active=True)``
    refuses a recipient (returns ``reply``, a ``(code, text)`` pair) when its
    domain (after the last ``@``, case-insensitive) is one of ``domains``,
    the throttle is on, and it is the 1st, (N+1)th, (2N+1)th... such recipient
    seen while on (``every=N``; 1 refuses them all). Everything else is
    accepted. The throttle is on when ``active`` and ``time.time() >=
    start_at`` (``None``: at once). Thread-safe: switch it from any thread.

    * :meth:`on` / :meth:`off` switch it; :meth:`start_after` turns it on
      ``seconds`` from now (``start_at = time.time() + seconds``);
    * :attr:`throttled` counts refusals, :attr:`seen` the recipients of the
      throttled domains it looked at while on, :attr:`first_throttled_at`
      is the ``time.time()`` of the first refusal (None before);
    * ``fallback`` (another rule) decides for recipients it lets through.

    The sink records each refusal in :attr:`SmtpSink.refused` (and in its log
    with ``log_refused=True``) with the reply's code.
    """

    def __init__(self, domains: Iterable[str], reply: tuple[int, str] = THROTTLE_REPLY, *,
                 every: int = 1, start_at: float | None = None, active: bool = True,
                 fallback: Rule | None = None) -> None:
        code, text = reply
        if not 400 <= int(code) < 600 or "\r" in text or "\n" in text:
            raise ValueError("reply must be a 4xx or 5xx code and a one-line text")
        if every < 1:
            raise ValueError("every must be at least 1")
        self.domains = frozenset(d.strip().lower() for d in domains)
        if not self.domains or "" in self.domains:
            raise ValueError("give at least one domain")
        self.reply = (int(code), text)
        self.every = every
        self.start_at = start_at
        self.active = active
        self.fallback = fallback
        self.throttled = 0
        self.seen = 0
        self.first_throttled_at: float | None = None
        self._lock = threading.Lock()

    def on(self) -> None:
        """Throttle from now on (clears a ``start_at`` still in the future)."""
        with self._lock:
            self.active = True
            if self.start_at is not None and self.start_at > time.time():
                self.start_at = None

    def off(self) -> None:
        """Stop throttling (accept every recipient) until :meth:`on`."""
        with self._lock:
            self.active = False

    def start_after(self, seconds: float) -> None:
        """Throttle from ``seconds`` from now."""
        with self._lock:
            self.active = True
            self.start_at = time.time() + seconds

    @property
    def is_on(self) -> bool:
        with self._lock:
            return self.active and (self.start_at is None or time.time() >= self.start_at)

    def __call__(self, recipient: str) -> tuple[int, str] | None:
        domain = recipient.strip("<>").rpartition("@")[2].lower()
        if domain in self.domains and self.is_on:
            with self._lock:
                self.seen += 1
                refuse = (self.seen - 1) % self.every == 0
                if refuse:
                    self.throttled += 1
                    if self.first_throttled_at is None:
                        self.first_throttled_at = time.time()
            if refuse:
                return self.reply
        return None if self.fallback is None else self.fallback(recipient)


async def _hang_up(server: Any) -> None:
    """Close the client connection without a reply; never returns normally."""
    if server.transport is not None:
        server.transport.close()
    # connection_lost() cancels the session task, and with it this wait.
    await asyncio.sleep(3600)
    raise ConnectionResetError("connection dropped on purpose")  # pragma: no cover


class SmtpSink:
    """An SMTP server on a background thread that records what it accepts.

    ``port=0`` picks a free port (read :attr:`port` after :meth:`start`).
    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        log_path: Path | None = None,
        rules: Rule | None = None,
        *,
        refuse_at: Literal["rcpt", "data"] = "rcpt",
        credentials: Mapping[str, str] | None = None,
        tls_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        require_tls: bool = False,
        idle_timeout: float = 300.0,
        keep_data: bool = True,
        log_refused: bool = False,
    ) -> None:
        if refuse_at not in ("rcpt", "data"):
            raise ValueError("refuse_at must be 'rcpt' or 'data'")
        if (implicit_tls or require_tls) and tls_context is None:
            raise ValueError("implicit_tls and require_tls need a tls_context")
        self.host = host
        self.port = port
        self.log_path = log_path
        self.rules = rules
        self.refuse_at = refuse_at
        self.keep_data = keep_data
        self.log_refused = log_refused
        self._credentials = dict(credentials) if credentials is not None else None
        self._tls_context = tls_context
        self._implicit_tls = implicit_tls
        self._require_tls = require_tls
        self._idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self._received: list[Received] = []
        self._refused: list[Received] = []
        self._data: list[bytes] = []
        self._connections = 0
        self._open: set[_SinkSMTP] = set()
        self._controller: _SinkController | None = None
        self._log_file: IO[str] | None = None

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> SmtpSink:
        if self._controller is not None:
            raise RuntimeError("sink already started")
        if self.port == 0:
            self.port = _free_port(self.host)
        if self.log_path is not None:
            self._log_file = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115
        kwargs: dict[str, Any] = {
            "hostname": self.host,
            "port": self.port,
            "server_hostname": _SERVER_NAME,
            "ident": "edm-sched sink",
            "timeout": self._idle_timeout,
            "enable_SMTPUTF8": True,
        }
        if self._credentials is not None:
            kwargs.update(
                authenticator=self._authenticate, auth_required=True, auth_require_tls=False
            )
        if self._tls_context is not None:
            if self._implicit_tls:
                kwargs["ssl_context"] = self._tls_context
            else:
                kwargs["tls_context"] = self._tls_context
                kwargs["require_starttls"] = self._require_tls
        controller = _SinkController(self, _Handler(self), **kwargs)
        try:
            controller.start()
        except BaseException:
            self._close_log()
            raise
        self._controller = controller
        # Controller.start() opens one probe connection of its own: not a client's.
        with self._lock:
            self._connections = 0
        log.info("SMTP sink listening on %s:%s", self.host, self.port)
        return self

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()
        self._close_log()

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- what was received ---------------------------------------------------

    @property
    def received(self) -> list[Received]:
        """A snapshot of every accepted (message, recipient), in arrival order."""
        with self._lock:
            return list(self._received)

    @property
    def refused(self) -> list[Received]:
        """A snapshot of every refused (transaction, recipient), in order, with its ``code``."""
        with self._lock:
            return list(self._refused)

    @property
    def messages(self) -> list[bytes]:
        """The raw data of each entry of :attr:`received` (same order), if ``keep_data``."""
        with self._lock:
            return list(self._data)

    @property
    def connections(self) -> int:
        """TCP connections clients opened since :meth:`start`."""
        with self._lock:
            return self._connections

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._open)

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Received]:
        """Wait until at least ``count`` messages were received; return them."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.received
            if len(got) >= count or time.monotonic() >= deadline:
                return got
            time.sleep(0.01)

    def close_connections(self, timeout: float = 5.0) -> int:
        """Close every open client connection (as an idle timeout would); return how many."""
        controller = self._controller
        if controller is None:
            return 0
        future = asyncio.run_coroutine_threadsafe(self._close_all(timeout), controller.loop)
        return future.result(timeout + 1.0)

    async def _close_all(self, timeout: float) -> int:
        with self._lock:
            servers = list(self._open)
        for server in servers:
            if server.transport is not None:
                server.transport.close()
        deadline = time.monotonic() + timeout
        while self.open_connections and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return len(servers)

    # -- called from the server thread ---------------------------------------

    def _connection_opened(self, server: _SinkSMTP) -> None:
        with self._lock:
            self._connections += 1
            self._open.add(server)

    def _connection_closed(self, server: _SinkSMTP) -> None:
        with self._lock:
            self._open.discard(server)

    def _refusal(self, recipient: str) -> str | None:
        if self.rules is None:
            return None
        reply = self.rules(recipient)
        if reply is None:
            return None
        code, text = reply
        return f"{int(code)} {text}"

    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if not isinstance(auth_data, LoginPassword) or self._credentials is None:
            return AuthResult(success=False, handled=False)
        login = auth_data.login.decode("utf-8", "replace")
        expected = self._credentials.get(login)
        ok = expected is not None and hmac.compare_digest(
            expected.encode("utf-8"), auth_data.password
        )
        return AuthResult(success=ok, handled=False)

    def _record_refusal(self, envelope: Any, recipients: Sequence[str], reply: str,
                        *, data: bool = False) -> None:
        content = envelope.original_content if data else None
        headers = (BytesHeaderParser(policy=compat32).parsebytes(content)
                   if isinstance(content, bytes) else None)
        rows = [
            Received(
                received_at=time.time(),
                recipient=recipient,
                message_id=None if headers is None else _header(headers.get("Message-ID")),
                service=None if headers is None else _header(headers.get(SERVICE_HEADER)),
                sender=envelope.mail_from,
                size=len(content) if isinstance(content, bytes) else 0,
                mail_from_at=getattr(envelope, "edm_mail_from_at", None),
                code=int(reply.split(" ", 1)[0]),
            )
            for recipient in recipients
        ]
        with self._lock:
            if self.log_refused and self._log_file is not None:
                for row in rows:
                    self._log_file.write(row.to_json() + "\n")
                self._log_file.flush()
            self._refused.extend(rows)

    def _record(self, sender: str | None, recipients: Sequence[str], data: bytes,
                mail_from_at: float | None = None) -> None:
        headers = BytesHeaderParser(policy=compat32).parsebytes(data)
        now = time.time()
        rows = [
            Received(
                received_at=now,
                recipient=recipient,
                message_id=_header(headers.get("Message-ID")),
                service=_header(headers.get(SERVICE_HEADER)),
                sender=sender,
                size=len(data),
                mail_from_at=mail_from_at,
            )
            for recipient in recipients
        ]
        with self._lock:
            if self._log_file is not None:
                for row in rows:
                    self._log_file.write(row.to_json() + "\n")
                self._log_file.flush()
            self._received.extend(rows)
            if self.keep_data:
                self._data.extend(data for _ in rows)

    def _close_log(self) -> None:
        with self._lock:
            log_file, self._log_file = self._log_file, None
        if log_file is not None:
            log_file.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edm_sched.testing.smtp_sink",
        description="Run a local SMTP sink until SIGTERM; print the bound port first.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--log", type=Path, default=None, help="append received messages here")
    parser.add_argument("--idle-timeout", type=float, default=300.0)
    parser.add_argument("--log-refused", action="store_true",
                        help="also log refused recipients (with their code)")
    parser.add_argument("--throttle-domains", default=None,
                        help="comma-separated domains whose recipients get the throttle reply")
    parser.add_argument("--throttle-reply", default=None,
                        help='the reply, e.g. "421 4.7.28 rate limited" (default: Gmail\'s)')
    parser.add_argument("--throttle-after", type=float, default=0.0,
                        help="seconds after start before throttling begins")
    parser.add_argument("--throttle-every", type=int, default=1,
                        help="refuse only every Nth recipient of those domains")
    parser.add_argument("--throttle-off", action="store_true",
                        help="start with the throttle off (SIGUSR1 switches it)")
    args = parser.parse_args(argv)
    throttle: Throttle | None = None
    if args.throttle_domains:
        reply = THROTTLE_REPLY
        if args.throttle_reply:
            code, _, text = args.throttle_reply.strip().partition(" ")
            if not code.isdigit():
                parser.error("--throttle-reply must start with a 3-digit code")
            reply = (int(code), text)
        throttle = Throttle(args.throttle_domains.split(","), reply,
                            every=args.throttle_every, active=not args.throttle_off)
        if args.throttle_after > 0:
            throttle.start_at = time.time() + args.throttle_after

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    def on_usr1(signum: int, frame: FrameType | None) -> None:
        if throttle is not None:
            if throttle.is_on:
                throttle.off()
            else:
                throttle.on()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGUSR1, on_usr1)
    sink = SmtpSink(
        args.host, args.port, log_path=args.log, rules=throttle, idle_timeout=args.idle_timeout,
        keep_data=False, log_refused=args.log_refused,
    )
    sink.start()
    try:
        print(sink.port, flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        sink.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
