"""A misbehaving SMTP server for tests and benchmarks (standard library only).

One :class:`FaultySmtp` listens on several ports, each with a *mode*:

==================== ===========================================================
mode[:seconds]       behaviour
==================== ===========================================================
``healthy``          answers everything at once, accepts every message
``slow:S``           delays every reply, the greeting included, by S s (1)
``slow_final:S``     answers at once, except the reply to the final dot: S s (5)
``drop_after_dot``   reads the whole message, final dot included, then closes
                     without replying (the server *has* the message)
``drop_during_data`` answers 354, reads one chunk of the message data, then
                     resets the connection (the server never has the message)
``hang_greeting``    accepts the TCP connection and never says a word
``refuse_then_open`` refuses connections for the first S s after start, then
:S                   behaves as ``healthy`` (2)
``greet_421``        greets with ``421`` and closes
``tls_fail``         offers STARTTLS, answers ``220`` to it, then answers the
                     client's TLS hello with garbage and closes
==================== ===========================================================

A client can only know that ``drop_during_data`` cut it off *before* its
final dot when it was still writing the message: the port's receive buffer
is kept small, but a message smaller than the client's socket send buffer (a
few megabytes) is handed to the operating system whole, final dot included,
and the client must then report an uncertain outcome.

Every complete message (final dot received) is recorded, whether or not it was
answered, as a :class:`Record`: the port and its mode, ``time.time()`` when
MAIL FROM and when the final dot arrived, the envelope sender and recipient
(one record per recipient), the ``Message-ID`` header, the size, and whether
the server answered ``250``. A record is written before the ``250`` goes out,
so a client that got its ``250`` finds its record. Records are kept in memory
(:attr:`FaultySmtp.records`) and, with ``log_path``, appended to a JSON Lines
file, one flushed line each (:func:`read_log` loads it).

In-process, it runs on a background thread with its own event loop::

    with FaultySmtp(["healthy", "slow:2.5", "drop_after_dot"]) as server:
        port = server.port("slow")          # ports are picked at start
        ...
        server.records, server.connections(port)

As a separate process (for multi-process benchmarks)::

    python -m edm_sched.testing.faulty_smtp --port-mode 2525=slow:2.5 \\
        --port-mode 0=healthy --log received.jsonl

prints one JSON line, ``{"ports": [{"port": 2525, "mode": "slow", "seconds":
2.5}, ...]}``, then runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

MODES = {
    # mode: default seconds (0: the mode takes none)
    "healthy": 0.0,
    "slow": 1.0,
    "slow_final": 5.0,
    "drop_after_dot": 0.0,
    "drop_during_data": 0.0,
    "hang_greeting": 0.0,
    "refuse_then_open": 2.0,
    "greet_421": 0.0,
    "tls_fail": 0.0,
}

_NAME = "faulty.localhost"
_LINE_LIMIT = 1 << 20
_SMALL_RECEIVE_BUFFER = 4096


@dataclass(frozen=True)
class PortMode:
    """One listening port: its mode, the mode's seconds, the port (0: pick a free one)."""

    mode: str
    seconds: float = -1.0  # < 0: the mode's default
    port: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; modes: {', '.join(MODES)}")
        if self.seconds < 0:
            object.__setattr__(self, "seconds", MODES[self.mode])
        if not 0 <= self.port < 65536:
            raise ValueError(f"bad port {self.port}")

    @classmethod
    def parse(cls, text: str) -> PortMode:
        """``[PORT=]MODE[:SECONDS]``, e.g. ``slow:2.5`` or ``2525=drop_after_dot``."""
        port, _, rest = text.rpartition("=")
        mode, _, seconds = rest.partition(":")
        try:
            return cls(mode.strip(), float(seconds) if seconds else -1.0,
                       int(port) if port else 0)
        except ValueError as exc:
            raise ValueError(f"bad port mode {text!r}: {exc}") from None


@dataclass(frozen=True)
class Record:
    """One complete message (final dot received) for one envelope recipient."""

    port: int
    mode: str
    mail_at: float  # time.time() when MAIL FROM arrived
    dot_at: float  # time.time() when the final dot arrived
    sender: str
    recipient: str
    message_id: str | None  # the Message-ID header, as sent
    size: int  # bytes of message data, after undoing the dot-stuffing
    answered: bool  # True if the server answered 250 to the final dot

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":"))


def read_log(path: str | Path) -> list[Record]:
    """Load a JSON Lines receive log; a torn last line (server killed mid-write) is ignored."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    out: list[Record] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            out.append(Record(**json.loads(line)))
        except (ValueError, TypeError) as exc:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a receive log line: {exc}") from exc
    return out


@dataclass
class _Listener:
    spec: PortMode
    sock: socket.socket
    port: int
    server: asyncio.Server | None = None
    accepted: list[float] = field(default_factory=list)  # time.time() of each connection


def _address(arg: str) -> str:
    """The address in ``MAIL FROM:<a> ...`` / ``RCPT TO:<a> ...``."""
    value = arg.split(":", 1)[1].strip()
    if value.startswith("<"):
        return value[1:].split(">", 1)[0]
    return value.split(" ", 1)[0]


class FaultySmtp:
    """SMTP ports with faults on demand, served by a background thread.

    ``ports`` are :class:`PortMode` or their text form (``"2525=slow:2.5"``).
    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        ports: Iterable[PortMode | str],
        *,
        host: str = "127.0.0.1",
        log_path: str | Path | None = None,
    ) -> None:
        self.specs = [p if isinstance(p, PortMode) else PortMode.parse(p) for p in ports]
        if not self.specs:
            raise ValueError("at least one port is needed")
        self.host = host
        self.log_path = Path(log_path) if log_path is not None else None
        self._lock = threading.Lock()
        self._records: list[Record] = []
        self._listeners: list[_Listener] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._log_file: IO[str] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.started_at = 0.0

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> FaultySmtp:
        if self._loop is not None:
            raise RuntimeError("already started")
        if self.log_path is not None:
            self._log_file = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115
        loop = self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="faulty-smtp",
                                        daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._open(), loop).result(10)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        self._loop = self._thread = None
        with self._lock:
            log_file, self._log_file = self._log_file, None
        if log_file is not None:
            log_file.close()

    def __enter__(self) -> FaultySmtp:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- what happened -------------------------------------------------------

    @property
    def ports(self) -> list[int]:
        """The bound ports, in the order of the specs."""
        return [listener.port for listener in self._listeners]

    def port(self, mode: str) -> int:
        """The first port with ``mode``."""
        for listener in self._listeners:
            if listener.spec.mode == mode:
                return listener.port
        raise KeyError(mode)

    @property
    def records(self) -> list[Record]:
        """A snapshot of every complete message received, in arrival order."""
        with self._lock:
            return list(self._records)

    def accepted(self, port: int) -> list[float]:
        """``time.time()`` of each TCP connection accepted on ``port``."""
        with self._lock:
            for listener in self._listeners:
                if listener.port == port:
                    return list(listener.accepted)
        raise KeyError(port)

    def connections(self, port: int) -> int:
        return len(self.accepted(port))

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Record]:
        """Wait until at least ``count`` records exist (or ``timeout``); return them."""
        deadline = time.monotonic() + timeout
        while len(got := self.records) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return got

    # -- on the server's loop ------------------------------------------------

    async def _open(self) -> None:
        self.started_at = time.time()
        for spec in self.specs:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if spec.mode == "drop_during_data":
                # A small window: a large message cannot be swallowed whole by the kernel.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SMALL_RECEIVE_BUFFER)
            sock.bind((self.host, spec.port))
            listener = _Listener(spec, sock, int(sock.getsockname()[1]))
            self._listeners.append(listener)
            if spec.mode == "refuse_then_open":
                # Bound but not listening: connections are refused until then.
                self._spawn(self._listen_later(listener, spec.seconds))
            else:
                await self._listen(listener)

    async def _listen(self, listener: _Listener) -> None:
        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve(listener, reader, writer)

        listener.server = await asyncio.start_server(on_client, sock=listener.sock,
                                                     limit=_LINE_LIMIT)

    async def _listen_later(self, listener: _Listener, seconds: float) -> None:
        await asyncio.sleep(seconds)
        await self._listen(listener)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _close(self) -> None:
        for listener in self._listeners:
            if listener.server is not None:
                listener.server.close()
            else:
                listener.sock.close()
        for writer in list(self._writers):
            writer.transport.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(
        self, listener: _Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._writers.add(writer)
        with self._lock:
            listener.accepted.append(time.time())
        try:
            await _Session(self, listener, reader, writer).run()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError):
            pass
        finally:
            self._writers.discard(writer)
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    def _record(self, records: list[Record]) -> None:
        with self._lock:
            if self._log_file is not None:
                for record in records:
                    self._log_file.write(record.to_json() + "\n")
                self._log_file.flush()
            self._records.extend(records)


class _Session:
    """One client connection, driven by its listener's mode."""

    def __init__(self, server: FaultySmtp, listener: _Listener,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.spec = listener.spec
        self.port = listener.port
        self.reader = reader
        self.writer = writer
        self.sender = ""
        self.recipients: list[str] = []
        self.mail_at = 0.0

    async def run(self) -> None:
        mode = self.spec.mode
        if mode == "hang_greeting":
            while await self.reader.read(4096):  # silent until the client leaves
                pass
            return
        if mode == "greet_421":
            await self.reply("421 4.3.2 Service not available, closing channel")
            return
        if not await self.reply(f"220 {_NAME} ESMTP edm-sched faulty server ({mode})"):
            return
        while line := await self.reader.readline():
            command = line.decode("utf-8", "replace").strip()
            verb = command.split(" ", 1)[0].upper()
            if not await self.handle(verb, command):
                return

    async def handle(self, verb: str, command: str) -> bool:
        """Answer one command; False ends the session."""
        if verb in ("EHLO", "HELO"):
            extensions = ["8BITMIME", "SMTPUTF8", "SIZE 104857600", "AUTH PLAIN"]
            if self.spec.mode == "tls_fail":
                extensions.append("STARTTLS")
            if verb == "HELO":
                return await self.reply(f"250 {_NAME}")
            lines = [_NAME, *extensions]
            return await self.reply("\r\n".join(
                f"250{'-' if i < len(lines) - 1 else ' '}{text}" for i, text in enumerate(lines)))
        if verb == "STARTTLS" and self.spec.mode == "tls_fail":
            await self.reply("220 2.0.0 Ready to start TLS")
            await self.reader.read(4096)  # the client's TLS hello
            self.writer.write(b"this is not TLS\r\n")
            await self.writer.drain()
            return False
        if verb == "AUTH":
            return await self.reply("235 2.7.0 Authentication successful")
        if verb == "MAIL" and command.upper().startswith("MAIL FROM:"):
            self.mail_at = time.time()
            self.sender, self.recipients = _address(command), []
            return await self.reply("250 2.1.0 OK")
        if verb == "RCPT" and command.upper().startswith("RCPT TO:"):
            if not self.mail_at:
                return await self.reply("503 5.5.1 MAIL first")
            self.recipients.append(_address(command))
            return await self.reply("250 2.1.5 OK")
        if verb == "DATA":
            if not self.recipients:
                return await self.reply("503 5.5.1 RCPT first")
            return await self.data()
        if verb == "RSET":
            self.sender, self.recipients, self.mail_at = "", [], 0.0
            return await self.reply("250 2.0.0 OK")
        if verb == "NOOP":
            return await self.reply("250 2.0.0 OK")
        if verb == "QUIT":
            await self.reply("221 2.0.0 Bye")
            return False
        return await self.reply("502 5.5.2 Command not implemented")

    async def data(self) -> bool:
        if not await self.reply("354 End data with <CR><LF>.<CR><LF>"):
            return False
        mode = self.spec.mode
        if mode == "drop_during_data":
            await self.reader.read(1024)
            self.writer.transport.abort()  # unread data pending: the client gets a reset
            return False
        lines: list[bytes] = []
        while (line := await self.reader.readline()) != b".\r\n":
            if not line:
                return False  # the client left mid-message
            lines.append(line[1:] if line.startswith(b".") else line)
        dot_at = time.time()
        data = b"".join(lines)
        headers = BytesHeaderParser(policy=compat32).parsebytes(data)
        message_id = headers.get("Message-ID")
        answered = mode != "drop_after_dot"
        if mode in ("slow", "slow_final"):  # the reply to the final dot, late
            answered = await self.pause(self.spec.seconds)
        self.server._record([
            Record(self.port, mode, self.mail_at, dot_at, self.sender, recipient,
                   None if message_id is None else " ".join(str(message_id).split()),
                   len(data), answered)
            for recipient in self.recipients
        ])
        self.sender, self.recipients, self.mail_at = "", [], 0.0
        if not answered:
            return False  # closed without a reply
        return await self.reply(f"250 2.0.0 Ok: queued as {uuid.uuid4().hex[:16].upper()}",
                                delay=0.0)

    async def pause(self, seconds: float) -> bool:
        """Wait ``seconds``; False as soon as the client has gone."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self.reader.at_eof() or self.reader.exception() is not None:
                return False
            await asyncio.sleep(min(left, 0.02))
        return not (self.reader.at_eof() or self.reader.exception() is not None)

    async def reply(self, text: str, *, delay: float | None = None) -> bool:
        """Send a reply (after the ``slow`` delay); False if the client has gone."""
        if delay is None:
            delay = self.spec.seconds if self.spec.mode == "slow" else 0.0
        if delay > 0 and not await self.pause(delay):
            return False
        self.writer.write(text.encode("utf-8") + b"\r\n")
        await self.writer.drain()
        return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edm_sched.testing.faulty_smtp",
        description="Run a misbehaving SMTP server until SIGTERM; print its ports first.",
    )
    parser.add_argument("--port-mode", action="append", required=True, type=PortMode.parse,
                        metavar="[PORT=]MODE[:SECONDS]",
                        help=f"repeatable; modes: {', '.join(MODES)}; port 0 picks one")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--log", type=Path, default=None, help="append records here (JSONL)")
    args = parser.parse_args(argv)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with FaultySmtp(args.port_mode, host=args.host, log_path=args.log) as server:
        ports = [{"port": port, "mode": spec.mode, "seconds": spec.seconds}
                 for port, spec in zip(server.ports, server.specs, strict=True)]
        print(json.dumps({"ports": ports}), flush=True)
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
