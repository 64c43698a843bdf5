"""A transport that sends nothing: for benchmarks, the demo and tests.

``NullTransport`` answers ``SENT`` for every message, optionally after a
simulated provider latency (``delay``) and optionally recording each accepted
message. ``fail`` lets a caller script provider answers: it is called with
each message and may return the :class:`SendResult` to report instead of
``SENT`` (``None`` means "accept this one").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from edm_sched.transports.base import Message, Outcome, SendResult, ServiceConfig

FailRule = Callable[[Message], SendResult | None]
"""Returns the result to report for a message, or None to report SENT."""

NullSend = tuple[float, int, str, str]
"""One recorded send: (time.monotonic(), service_id, recipient, message_id)."""


class NullTransport:
    """Accepts every message (unless ``fail`` says otherwise) without any network I/O.

    ``delay`` seconds are awaited before each answer, so a dispatcher sees a
    provider latency without a provider; the start of each transaction is
    acknowledged at once (``Message.on_start``), before that delay. With
    ``record=True`` every ``SENT`` message is appended to :attr:`sent` as
    ``(time.monotonic(), service_id, recipient, message_id)``; nothing is kept
    otherwise, so a long benchmark does not grow memory.
    """

    def __init__(
        self,
        delay: float = 0.0,
        fail: FailRule | None = None,
        *,
        record: bool = False,
    ) -> None:
        if delay < 0:
            raise ValueError("delay must be >= 0")
        self.delay = delay
        self.fail = fail
        self.record = record
        self.sent: list[NullSend] = []

    async def send(self, service: ServiceConfig, message: Message) -> SendResult:
        started = time.perf_counter()
        # No network: the simulated provider sees the transaction start at once, and
        # ``delay`` is its work on the message (a paced lane times the next start from
        # here, as it does from an SMTP server's reply to MAIL FROM).
        if message.on_start is not None:
            message.on_start(time.monotonic())
        if self.delay > 0:
            await asyncio.sleep(self.delay)
        if self.fail is not None:
            verdict = self.fail(message)
            if verdict is not None:
                return verdict
        if self.record:
            self.sent.append(
                (time.monotonic(), service.service_id, message.recipient, message.message_id)
            )
        return SendResult(
            Outcome.SENT, response_ms=round((time.perf_counter() - started) * 1000)
        )

    async def prepare(self, service: ServiceConfig) -> None:
        """Nothing to open ahead of time."""

    async def aclose(self) -> None:
        """Nothing to close."""
