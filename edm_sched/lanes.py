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
the slot and never once the lease has ended or will end within
``LEASE_SAFETY`` seconds: such a send is handed back unsent (``released``: no
attempt, no quota unit spent).

Pacing on the wire is causal. A provider's limiter counts when *it* saw each
transaction start, and that is unknowable from the sender's clock alone: a
start may reach the server late (a busy network, a busy server, a process
that got a CPU late). What the sender does know is an upper bound: the
provider had seen the start by the time its answer to it arrived (SMTP: the
reply to MAIL FROM; the transport reports it through ``Message.on_start``, or
else the end of the send bounds it). So a lane starts a transaction only once
the previous one's start is acknowledged, and then no earlier than one
interval after that acknowledgement, and no earlier than every rate limit of
the service allows when the previous starts are counted at their
acknowledgements (a token bucket per limit, GCRA, as the claim computes it on
slots). Counting a start later than the provider saw it can only make the
lane wait longer than needed, never less: whatever the jitter, consecutive
starts *as the provider sees them* are at least an interval apart and
conform to every rate limit. The price is one round trip per gap where a
limit has no burst to absorb it (an interval, or a rate with burst 1), plus
the time from the lane's start to the transport's first write. A lane may
spend a *tolerance* (``tolerance``, the service setting ``pace_tolerance_ms``,
default 5 ms) on that price: starts are then never closer than the interval
minus the tolerance as the provider sees them (and conform to each rate
limit within it), still whatever the jitter. The slots of the claim keep the
long-run pace exact; the tolerance only lets a lane that fell behind catch up.
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
    withdrawn: bool = False  # taken back before it started (Lane.withdraw)
    context: Any = None  # what the prepare step needs (the dispatcher's business)


@dataclass(eq=False)
class Lane:
    """The send queue and sender(s) of one service in one dispatcher."""

    service_id: int
    interval: float  # seconds between send starts (the service's interval_ms)
    connections: int
    depth: int  # most sends queued or running at once
    # the service's rate limits as (emission interval T, tolerance tau) in seconds:
    # a start at t conforms when t >= tat - tau (GCRA); T = window / max_count,
    # tau = (burst - 1) * T
    pacers: tuple[tuple[float, float], ...] = ()
    tolerance: float = 0.0  # seconds a start may come early against the pacing (see above)
    queue: asyncio.Queue[QueuedSend] = field(default_factory=asyncio.Queue)
    running: set[QueuedSend] = field(default_factory=set)
    next_start: float = 0.0
    last_slot: float = 0.0  # the latest slot handed to this lane (monotonic)
    last_used: float = field(default_factory=time.monotonic)
    workers: list[asyncio.Task[None]] = field(default_factory=list)
    # the send whose transaction start the provider has not acknowledged yet
    _unacked: QueuedSend | None = None
    _acked: asyncio.Event = field(default_factory=asyncio.Event)
    _start_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _tats: dict[tuple[float, float], float] = field(default_factory=dict)
    # how long after its slot the provider had seen the last acknowledged start;
    # the dispatcher reports a late one to the database and sets this back to 0
    late_by: float = 0.0

    def __post_init__(self) -> None:
        self._acked.set()

    @property
    def paced(self) -> bool:
        """Whether the service has an interval or a rate limit to keep on the wire."""
        return self.interval > 0 or bool(self.pacers)

    def acknowledge(self, item: QueuedSend, at: float) -> None:
        """The provider had seen ``item``'s transaction start by monotonic instant ``at``
        (its answer to it arrived, or the send ended): the next start is paced from
        there. Later calls for the same send are ignored."""
        if self._unacked is not item:
            return
        self._unacked = None
        self.late_by = max(self.late_by, at - item.slot)
        self.next_start = max(self.next_start, at + max(self.interval - self.tolerance, 0.0))
        _count_start(self.pacers, self._tats, at)
        self._acked.set()

    def _rates_allow(self) -> float:
        """The earliest instant every rate limit admits one more start."""
        return _rates_admit(self.pacers, self._tats) - self.tolerance

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
        """(seconds the last queued send will start after its slot, monotonic instant a
        send queued after it could start), from the lane's own pacing: a lane whose
        starts were late (a slow server, a busy machine) passes the delay on to every
        slot queued behind it, since the provider counts the late starts where they
        happened."""
        nxt = self.next_start + self.tolerance
        tats = dict(self._tats)
        late = 0.0
        for item in self.queue._queue:  # type: ignore[attr-defined]
            start = max(item.slot, nxt, _rates_admit(self.pacers, tats))
            late = start - item.slot
            nxt = start + self.interval
            _count_start(self.pacers, tats, start)
        return late, max(nxt, _rates_admit(self.pacers, tats))

    def held(self) -> list[QueuedSend]:
        """Every send this lane holds a lease for (queued or running)."""
        return [*self.running, *self.queue._queue]  # type: ignore[attr-defined]

    def waiting(self) -> list[QueuedSend]:
        """The sends not started yet: queued, or taken by a sender that waits for
        their slot."""
        return [*(i for i in self.running if not i.started),
                *self.queue._queue]  # type: ignore[attr-defined]

    def withdraw(self, which: Callable[[QueuedSend], bool] | None = None
                 ) -> list[QueuedSend]:
        """Take the sends not started yet out of the lane: every one, or those ``which``
        picks (the others keep their order). A sender waiting for a withdrawn send's
        slot drops it; the caller hands each one back."""
        out = [i for i in self.waiting() if which is None or which(i)]
        for item in out:
            item.withdrawn = True
        keep = [i for i in self.queue._queue if not i.withdrawn]  # type: ignore[attr-defined]
        while not self.queue.empty():
            self.queue.get_nowait()
        for item in keep:
            self.queue.put_nowait(item)
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
                async with self._start_lock:
                    # The previous start first has to be acknowledged: its
                    # acknowledgement bounds when the provider saw it. (Nothing to
                    # pace, nothing to wait for: connections start in parallel.)
                    if self.paced:
                        await self._acked.wait()
                    # Never before the slot, never within an interval of that
                    # acknowledgement, never before the rate limits allow (a slot
                    # already past starts now, not "back then").
                    now = time.monotonic()
                    start = max(item.slot, self.next_start, self._rates_allow(), now)
                    if item.withdrawn:
                        continue
                    if start + LEASE_SAFETY > item.lease_deadline:
                        release(item, "lease would end before the send could start")
                        continue
                    before = self.next_start
                    self.next_start = start + self.interval - self.tolerance  # until acked
                    if start > now:
                        await asyncio.sleep(start - now)
                    if item.withdrawn:  # handed back while it waited: its slot is free again
                        self.next_start = before
                        continue
                    if time.monotonic() + LEASE_SAFETY > item.lease_deadline:
                        # a renewal failed meanwhile: the lease may be gone
                        release(item, "lease ended while the send waited for its slot")
                        continue
                    item.started = True
                    if self.paced:
                        self._unacked = item
                        self._acked.clear()
                try:
                    await send(item)
                finally:
                    # a transport that does not report the acknowledgement: the
                    # end of the send bounds it
                    self.acknowledge(item, time.monotonic())
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


def _rates_admit(pacers: tuple[tuple[float, float], ...],
                 tats: dict[tuple[float, float], float]) -> float:
    """The earliest instant every rate limit admits one more start (GCRA: tat - tau)."""
    return max((tats[p] - p[1] for p in pacers if p in tats), default=0.0)


def _count_start(pacers: tuple[tuple[float, float], ...],
                 tats: dict[tuple[float, float], float], at: float) -> None:
    """Count a start at ``at`` against every rate limit (GCRA: tat = max(tat, at) + T)."""
    for p in pacers:
        tats[p] = max(tats.get(p, at), at) + p[0]


def _crashed(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("lane sender %s crashed", task.get_name(), exc_info=task.exception())


__all__ = ["LEASE_SAFETY", "Lane", "QueuedSend"]
