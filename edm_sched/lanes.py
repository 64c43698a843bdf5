"""Per-service send lanes: slot-timed sends, isolated from one another.

A dispatcher keeps one :class:`Lane` per sending service it holds claimed
work for. A lane has its own queue and its own sender coroutine(s) (one per
allowed connection, ``max_connections`` in the service settings, default 1),
so a slow, hung or failing provider holds only its own lane: it can never
take the send capacity of another service (I11). What a lane may hold is
capped (``depth``): the dispatcher claims for a service only while its lane
has room, so claims follow what the connection can actually send.

Each queued send carries its *slot* (the instant the claim allowed it to
start, in this process's monotonic clock) and its lease deadline. A sender
first *prepares* the send (the dispatcher builds the message there, in a
worker thread: a heavy message holds up its own lane, never the event loop
that every lane shares), then starts the SMTP transaction no earlier than
the slot and no earlier than one service interval after the previous start
from this lane (pacing on the wire), and never once the lease has ended or
will end within ``LEASE_SAFETY`` seconds: such a send is handed back unsent
(``released``: no attempt, no quota unit spent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("edm_sched.lanes")

LEASE_SAFETY = 1.0
"""Seconds of lease that must remain when a send starts."""


@dataclass(eq=False)  # identity: kept in a set while running
class QueuedSend:
    """One claimed subtask waiting in its service's lane."""

    claimed: Any  # dispatcher.Claimed
    message: Any  # transports.base.Message, or None until the lane's prepare step built it
    slot: float  # monotonic instant the send may start
    lease_deadline: float  # monotonic instant the lease ends (moved by renewals)
    started: bool = False
    context: Any = None  # what the prepare step needs (the dispatcher's business)


@dataclass(eq=False)
class Lane:
    """The send queue and sender(s) of one service in one dispatcher."""

    service_id: int
    interval: float  # seconds between send starts (the service's interval_ms)
    connections: int
    depth: int  # most sends queued or running at once
    queue: asyncio.Queue[QueuedSend] = field(default_factory=asyncio.Queue)
    running: set[QueuedSend] = field(default_factory=set)
    next_start: float = 0.0
    last_slot: float = 0.0  # the latest slot handed to this lane (monotonic)
    last_used: float = field(default_factory=time.monotonic)
    workers: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def load(self) -> int:
        return self.queue.qsize() + len(self.running)

    @property
    def room(self) -> int:
        return max(self.depth - self.load, 0)

    def put(self, item: QueuedSend) -> None:
        self.last_slot = max(self.last_slot, item.slot)
        self.queue.put_nowait(item)

    def lateness(self) -> tuple[float, float]:
        """(seconds this lane runs behind its slots, monotonic instant its next send could
        start): each queued send starts at least an interval after the one before, so a
        lane whose last start was late passes the delay on to every slot queued behind it."""
        due = self.last_slot + self.interval
        free = max(due, self.next_start + self.interval * self.queue.qsize())
        return free - due, free

    def held(self) -> list[QueuedSend]:
        """Every send this lane holds a lease for (queued or running)."""
        return [*self.running, *self.queue._queue]  # type: ignore[attr-defined]

    def drain_queued(self) -> list[QueuedSend]:
        """Take every queued (not started) send out of the lane."""
        out: list[QueuedSend] = []
        while not self.queue.empty():
            out.append(self.queue.get_nowait())
        return out

    def start(self, send: Callable[[QueuedSend], Awaitable[None]],
              release: Callable[[QueuedSend, str], None],
              prepare: Callable[[QueuedSend], Awaitable[bool]] | None = None) -> None:
        """Start the sender(s). ``prepare(item)`` runs first for each send, before
        its slot; False means the item was finished there and is not sent."""
        for _ in range(max(self.connections, 1)):
            task = asyncio.create_task(self._work(send, release, prepare),
                                       name=f"lane-{self.service_id}")
            task.add_done_callback(_crashed)
            self.workers.append(task)

    async def _work(self, send: Callable[[QueuedSend], Awaitable[None]],
                    release: Callable[[QueuedSend, str], None],
                    prepare: Callable[[QueuedSend], Awaitable[bool]] | None) -> None:
        while True:
            item = await self.queue.get()
            self.running.add(item)
            try:
                if prepare is not None and not await prepare(item):
                    continue
                # Never before the slot, never within an interval of the previous
                # start on the wire (a slot already past starts now, not "back then").
                now = time.monotonic()
                start = max(item.slot, self.next_start, now)
                if start + LEASE_SAFETY > item.lease_deadline:
                    release(item, "lease would end before the send could start")
                    continue
                self.next_start = start + self.interval
                if start > now:
                    await asyncio.sleep(start - now)
                if time.monotonic() + LEASE_SAFETY > item.lease_deadline:
                    # a renewal failed meanwhile: the lease may be gone
                    release(item, "lease ended while the send waited for its slot")
                    continue
                item.started = True
                # Pace from the actual start: a start the event loop made late
                # pushes the next one back, so no two starts on the wire come
                # closer than the interval.
                self.next_start = max(self.next_start, time.monotonic() + self.interval)
                await send(item)
            finally:
                self.running.discard(item)
                self.last_used = time.monotonic()

    async def stop(self) -> None:
        for w in self.workers:
            w.cancel()
        for w in self.workers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await w
        self.workers.clear()


def _crashed(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("lane sender %s crashed", task.get_name(), exc_info=task.exception())


__all__ = ["LEASE_SAFETY", "Lane", "QueuedSend"]
