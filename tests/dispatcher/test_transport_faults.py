"""The SMTP transport against a misbehaving SMTP server (edm_sched.testing.faulty_smtp).

Real server, real SmtpTransport, no mocks: each fault gives the outcome the
scheduler needs, each phase keeps its own timeout, and prepare() connects
ahead of the first send. Durations are asserted only as generous bounds.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from edm_sched.testing.faulty_smtp import FaultySmtp, PortMode, read_log
from edm_sched.transports.base import Message, Outcome, SendResult, ServiceConfig
from edm_sched.transports.null import NullTransport
from edm_sched.transports.smtp import DEFAULT_DATA_TIMEOUT, SmtpTransport, parse_settings

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]

MODES = [
    "healthy", "slow:0.4", "slow_final:1.0", "drop_after_dot", "drop_during_data",
    "hang_greeting", "greet_421", "tls_fail",
]


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def message(n: int, *, size: int = 0) -> Message:
    message_id = f"<edm.7.{n}@sender.example.com>"
    body = b"Hello.\r\n.a line starting with a dot\r\n" + b"x" * size + b"\r\nBye.\r\n"
    data = (f"From: news@sender.example.com\r\nTo: rcpt{n}@example.org\r\n"
            f"Subject: test {n}\r\nMessage-ID: {message_id}\r\n\r\n").encode() + body
    return Message(n, 7, message_id, "news@sender.example.com", f"rcpt{n}@example.org", data)


def service(port: int, service_id: int = 1, **settings: Any) -> ServiceConfig:
    cfg: dict[str, Any] = {"host": "127.0.0.1", "port": port, "timeout": 5.0}
    cfg.update(settings)
    return ServiceConfig(service_id, f"svc-{service_id}", "smtp", cfg)


def transport() -> SmtpTransport:
    return SmtpTransport(hostname="client.example.com")


async def send_once(svc: ServiceConfig, msg: Message) -> tuple[SendResult, float]:
    t = transport()
    started = time.monotonic()
    try:
        return await t.send(svc, msg), time.monotonic() - started
    finally:
        await t.aclose()


@pytest.fixture(scope="module")
def server() -> Iterator[FaultySmtp]:
    with FaultySmtp(MODES) as s:
        yield s


def records_for(server: FaultySmtp, msg: Message) -> list[Any]:
    return [r for r in server.records if r.message_id == msg.message_id]


# -- one outcome per fault -------------------------------------------------------------


def test_healthy_is_sent_and_logged_by_the_server(server: FaultySmtp) -> None:
    msg = message(1)
    before = time.time()
    result, _ = run(send_once(service(server.port("healthy")), msg))
    assert result.outcome is Outcome.SENT and result.provider_id
    [record] = records_for(server, msg)
    assert record.answered and record.mode == "healthy"
    assert record.recipient == msg.recipient and record.sender == msg.sender
    assert before <= record.mail_at <= record.dot_at <= time.time()
    assert record.size == len(msg.data)
    # A message above ONE_WRITE_MAX goes as data, flush, then the dot: same result.
    big = message(41, size=300_000)
    result, _ = run(send_once(service(server.port("healthy")), big))
    assert result.outcome is Outcome.SENT
    [record] = records_for(server, big)
    assert record.answered and record.size == len(big.data)


def test_drop_after_the_final_dot_is_uncertain_and_not_retried(server: FaultySmtp) -> None:
    port = server.port("drop_after_dot")
    connections = server.connections(port)
    msg = message(2)
    result, _ = run(send_once(service(port), msg))
    assert result.outcome is Outcome.UNCERTAIN
    assert result.code is None
    assert result.detail is not None and "after the final dot" in result.detail
    # The server has the message and never answered; the transport did not resend it.
    [record] = records_for(server, msg)
    assert record.answered is False
    assert server.connections(port) == connections + 1


def test_drop_during_data_before_the_final_dot_is_transient(server: FaultySmtp) -> None:
    # Larger than any socket buffer here: the client is still writing when cut off.
    msg = message(3, size=12_000_000)
    result, _ = run(send_once(service(server.port("drop_during_data")), msg))
    assert result.outcome is Outcome.TRANSIENT
    assert result.detail is not None and result.detail.startswith("DATA:")
    assert records_for(server, msg) == []


def test_hang_at_the_greeting_is_a_service_failure_within_greeting_timeout(
    server: FaultySmtp,
) -> None:
    svc = service(server.port("hang_greeting"), greeting_timeout=0.3, command_timeout=30)
    result, elapsed = run(send_once(svc, message(4)))
    assert result.outcome is Outcome.SERVICE
    assert result.detail is not None and result.detail.startswith("greeting:")
    assert 0.3 <= elapsed < 5


def test_slow_final_reply_within_data_timeout_is_sent_beyond_command_timeout(
    server: FaultySmtp,
) -> None:
    msg = message(5)
    svc = service(server.port("slow_final"), command_timeout=0.3, data_timeout=10)
    result, elapsed = run(send_once(svc, msg))
    assert result.outcome is Outcome.SENT
    assert elapsed >= 1.0  # the reply took longer than any command may
    [record] = records_for(server, msg)
    assert record.answered


def test_slow_final_reply_past_data_timeout_is_uncertain(server: FaultySmtp) -> None:
    msg = message(6)
    svc = service(server.port("slow_final"), data_timeout=0.3)
    result, elapsed = run(send_once(svc, msg))
    assert result.outcome is Outcome.UNCERTAIN
    assert result.detail is not None and "no reply within 0.3 s" in result.detail
    assert elapsed < 1.0
    # The server got the message; it saw the client leave before it answered.
    deadline = time.monotonic() + 5
    while not records_for(server, msg) and time.monotonic() < deadline:
        time.sleep(0.02)
    [record] = records_for(server, msg)
    assert record.answered is False


@pytest.mark.slow
def test_each_command_reply_has_command_timeout(server: FaultySmtp) -> None:
    port = server.port("slow")  # every reply 0.4 s late, the greeting included
    ok, _ = run(send_once(service(port, greeting_timeout=2, command_timeout=2), message(7)))
    assert ok.outcome is Outcome.SENT
    # The greeting is awaited long enough, EHLO's reply is not.
    late, elapsed = run(send_once(service(port, greeting_timeout=2, command_timeout=0.1),
                                  message(8)))
    assert late.outcome is Outcome.SERVICE
    assert late.detail is not None and late.detail.startswith("EHLO:")
    assert elapsed < 2
    # `timeout` alone still bounds the greeting (the older single setting).
    early, _ = run(send_once(service(port, timeout=0.1), message(9)))
    assert early.outcome is Outcome.SERVICE
    assert early.detail is not None and early.detail.startswith("greeting:")


def test_421_greeting_and_tls_failure_are_service_failures(server: FaultySmtp) -> None:
    greeted, _ = run(send_once(service(server.port("greet_421")), message(10)))
    assert greeted.outcome is Outcome.SERVICE and greeted.code == 421
    tls, _ = run(send_once(service(server.port("tls_fail"), security="starttls"), message(11)))
    assert tls.outcome is Outcome.SERVICE
    assert tls.detail is not None and tls.detail.startswith("STARTTLS:")


def test_refused_then_open_backs_off_then_sends() -> None:
    with FaultySmtp(["refuse_then_open:1.0"]) as s:
        port = s.port("refuse_then_open")
        refused, _ = run(send_once(service(port), message(12)))
        assert refused.outcome is Outcome.SERVICE
        assert refused.detail is not None and refused.detail.startswith("connect:")
        deadline = time.monotonic() + 10
        while True:
            later, _ = run(send_once(service(port), message(13)))
            if later.outcome is Outcome.SENT or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert later.outcome is Outcome.SENT
        assert len(s.wait_for(1)) == 1


def test_connect_timeout() -> None:
    # A listener whose accept queue is full drops new SYNs: connect() hangs.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        try:
            for _ in range(4):
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
                fillers.append(filler)
            time.sleep(0.1)
            result, elapsed = run(send_once(
                service(port, connect_timeout=0.3, greeting_timeout=1), message(14)))
        finally:
            for filler in fillers:
                filler.close()
    if result.detail is not None and result.detail.startswith("greeting:"):
        pytest.skip("this kernel accepted the connection despite a full backlog")
    assert result.outcome is Outcome.SERVICE
    assert result.detail is not None and result.detail.startswith("connect:")
    assert 0.3 <= elapsed < 5


# -- connections: prepare() and the per-service pool ------------------------------------


def test_prepare_connects_ahead_so_the_first_send_starts_at_once() -> None:
    with FaultySmtp(["healthy"]) as s:
        port = s.port("healthy")
        msg = message(15)

        async def go() -> tuple[SendResult, float]:
            t = transport()
            try:
                await t.prepare(service(port))
                await t.prepare(service(port))  # already prepared: nothing more
                assert s.connections(port) == 1
                await asyncio.sleep(0.1)
                started = time.time()
                return await t.send(service(port), msg), started
            finally:
                await t.aclose()

        result, started = run(go())
        assert result.outcome is Outcome.SENT
        [accepted] = s.accepted(port)
        assert accepted < started  # the send used the prepared connection
        [record] = s.records
        assert record.mail_at >= started


def test_prepare_swallows_failures_and_the_waiting_send_reports_them() -> None:
    with FaultySmtp(["hang_greeting", "greet_421"]) as s:
        hang = service(s.port("hang_greeting"), greeting_timeout=1.0)

        async def go() -> tuple[SendResult, float]:
            t = transport()
            try:
                preparing = asyncio.create_task(t.prepare(hang))
                await asyncio.sleep(0.05)
                started = time.monotonic()
                # Waits for prepare's attempt and reports it, without a second wait.
                result = await t.send(hang, message(16))
                elapsed = time.monotonic() - started
                await preparing  # did not raise
                await t.prepare(service(s.port("greet_421"), 2))  # nor here
                await t.prepare(service(0, 3, host=""))  # nor with invalid settings
                return result, elapsed
            finally:
                await t.aclose()

        result, elapsed = run(go())
        assert result.outcome is Outcome.SERVICE
        assert result.detail is not None and result.detail.startswith("prepare: greeting:")
        assert elapsed < 1.8  # one greeting timeout, not two
        assert s.connections(s.port("hang_greeting")) == 1


@pytest.mark.slow
def test_max_connections_sends_in_parallel_one_send_per_connection() -> None:
    with FaultySmtp(["slow_final:0.5"]) as s:
        port = s.port("slow_final")

        async def go(cap: int, first: int) -> list[SendResult]:
            t = transport()
            try:
                svc = service(port, max_connections=cap)
                return await asyncio.gather(*(t.send(svc, message(first + i))
                                              for i in range(3)))
            finally:
                await t.aclose()

        assert [r.outcome for r in run(go(3, 100))] == [Outcome.SENT] * 3
        assert s.connections(port) == 3
        assert [r.outcome for r in run(go(1, 200))] == [Outcome.SENT] * 3
        assert s.connections(port) == 4
        ids = {message(200 + i).message_id for i in range(3)}
        serial = sorted(r.dot_at for r in s.records if r.message_id in ids)
        assert len(serial) == 3
        # One connection, one send at a time: each message waited for the previous reply.
        assert all(b - a >= 0.45 for a, b in itertools.pairwise(serial))


# -- settings ------------------------------------------------------------------------


def test_phase_timeout_settings() -> None:
    s = parse_settings({"host": "mx", "timeout": 7})
    assert (s.connect, s.greeting, s.command) == (7, 7, 7)
    assert s.data_timeout == DEFAULT_DATA_TIMEOUT == 600
    assert s.max_connections == 1
    s = parse_settings({"host": "mx", "connect_timeout": 1, "greeting_timeout": 2.5,
                        "command_timeout": "3", "data_timeout": 900, "max_connections": "4"})
    assert (s.connect, s.greeting, s.command, s.timeout) == (1, 2.5, 3, 30)
    assert (s.data_timeout, s.max_connections) == (900, 4)
    for bad in ({"connect_timeout": 0}, {"greeting_timeout": -1}, {"command_timeout": "x"},
                {"data_timeout": True}, {"data_timeout": float("inf")},
                {"max_connections": 0}, {"max_connections": 1.5},
                {"max_connections": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            parse_settings({"host": "mx", **bad})


def test_port_mode_parsing() -> None:
    assert PortMode.parse("2525=slow:2.5") == PortMode("slow", 2.5, 2525)
    assert PortMode.parse("drop_after_dot") == PortMode("drop_after_dot", 0.0, 0)
    assert PortMode.parse("slow").seconds == 1.0
    with pytest.raises(ValueError, match="unknown mode"):
        PortMode.parse("sluggish")


def test_null_transport_prepare_is_a_no_op() -> None:
    t = NullTransport()
    run(t.prepare(service(1)))
    assert t.sent == []


# -- as a separate process ---------------------------------------------------------------


def test_faulty_server_as_a_separate_process(tmp_path: Path) -> None:
    log_path = tmp_path / "received.jsonl"
    with subprocess.Popen(
        [sys.executable, "-m", "edm_sched.testing.faulty_smtp", "--port-mode", "0=healthy",
         "--port-mode", "drop_after_dot", "--log", str(log_path)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            ports = json.loads(proc.stdout.readline())["ports"]
            assert [p["mode"] for p in ports] == ["healthy", "drop_after_dot"]
            sent, _ = run(send_once(service(ports[0]["port"]), message(30)))
            dropped, _ = run(send_once(service(ports[1]["port"]), message(31)))
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    assert (sent.outcome, dropped.outcome) == (Outcome.SENT, Outcome.UNCERTAIN)
    rows = read_log(log_path)
    assert [(r.mode, r.message_id, r.answered) for r in rows] == [
        ("healthy", message(30).message_id, True),
        ("drop_after_dot", message(31).message_id, False),
    ]
