"""The dispatcher: ``run_dispatcher()`` claims, sends and completes.

One asyncio loop per process:

* **claim** — ``edm.claim_v2`` hands out subtasks of ready services, each with
  its *slot* (the instant its send may start); every rule (readiness, limits,
  fairness, leases, holds) is in that SQL function. The dispatcher claims
  only for services whose lane has room, and only as much as its capacity
  allows (``concurrency``).
* **send** — outside any transaction, in one :class:`~edm_sched.lanes.Lane`
  per service (its own queue and connection), so a slow or hung provider
  never delays another service (I11). A lane builds each message (rendering
  included) in a worker thread before its slot, so a heavy message or a slow
  renderer holds up its own lane only, not the event loop; it starts each SMTP
  transaction at its slot (or at once if the slot has passed), paced from
  the provider's acknowledgement of the previous start so that no interval or
  rate limit is broken as the provider sees it, through the transport
  registered for the service's ``transport`` name, with a deterministic
  Message-ID; the transport connects ahead of the first slot.
* **renew** — while sends wait on a slow provider, their leases (and the
  holds of their services) are renewed in batches (``edm.renew_leases``);
  nothing is ever sent on a lease that ended.
* **complete** — outcomes are batched into ``edm.complete`` calls; the lease
  fences late or foreign completions.
* **sleep** — never a fixed poll: with every send slot taken, until a send
  ends; otherwise until ``edm.next_wakeup()`` (a service with work becomes
  ready, a scheduled task starts, a lease expires) or a NOTIFY on
  ``edm_wakeup`` (new or resumed tasks, services changed). A wake-up that
  comes while the loop is busy with the database ends its next sleep at once.
* **sweeps** — one elected dispatcher (session advisory lock) runs
  :mod:`edm_sched.sweeps` every ``sweep.interval`` seconds.

SIGTERM / SIGINT stop claiming, let in-flight sends finish (within the lease),
and flush completions. Every claimed subtask is handed to its transport at
once, so nothing claimed is left unsent; a send still running when the lease
runs out is cancelled and left to lease expiry, recorded as an uncertain
outcome (the ``released`` outcome of ``edm.complete`` is for hosts whose own
loops hold claimed work back). A lost database connection is
re-established with back-off; outcomes wait in memory meanwhile.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg
from psycopg.rows import dict_row

from edm_sched import db, errors, sweeps
from edm_sched.lanes import Lane, QueuedSend
from edm_sched.logfmt import log_event
from edm_sched.metrics import DispatcherMetrics
from edm_sched.rendering import (
    RenderContext,
    Renderer,
    RenderError,
    TemplateRow,
    build_message,
    default_renderer,
)
from edm_sched.reply_rules import reply_detail
from edm_sched.sqlfiles import query
from edm_sched.template_cache import TemplateCache, TemplatesOfTask
from edm_sched.transports.base import (
    CredentialResolver,
    Message,
    Outcome,
    SendResult,
    ServiceConfig,
    Transport,
)

log = logging.getLogger("edm_sched.dispatcher")

MAX_IDLE = 5.0  # upper bound on one sleep; NOTIFY and next_wakeup normally end it sooner
COMPLETE_BATCH = 500
SERVICE_CACHE_SECONDS = 30.0
LANE_DEPTH = 4  # sends a paced service's lane may hold (queued or running) unless its settings say
# A service without an interval may take this many slots per connection in one claim (one
# statement fills them over users in the fair order, 0014), and its lane may hold that many:
# enough to spread a claim's cost over few services, few enough that a slow provider's
# queue stays well inside the lease.
BATCH_LANE_DEPTH = 16
# ...but no lane may take more than 1/LANE_SHARE of the dispatcher's room (2 x concurrency):
# a lane sends on its connections only, so room gathered in one or two deep lanes leaves the
# other services idle and most of ``concurrency`` unused (at the default concurrency of 10,
# lanes of 16 kept 2 of 6 single-connection services sending).
LANE_SHARE = 8
LANE_IDLE_SECONDS = 60.0  # a lane unused this long is closed
PACE_TOLERANCE_MS = 5  # default of a service's pace_tolerance_ms setting (edm_sched.lanes)
PACE_REPORT_AFTER = 0.005  # seconds behind its slots before a lane reports its pace
# A lane waits this long for the claim's build of its messages (one worker-thread call per
# service and claim) before building a message itself: behind a heavy message, the next
# ones are not held up by the whole group.
GROUP_BUILD_WAIT = 0.05
# Bounds of the template cache (edm_sched.template_cache): a fair claim cycles through
# every task with work, so it holds many tasks; large bodies are bounded by the bytes.
TEMPLATE_CACHE_TASKS = 100_000
TEMPLATE_CACHE_BYTES = 64 * 1024 * 1024


def _may_be_ruled(result: SendResult) -> bool:
    """A provider's answer (a reply code or a transport error code), which a reply rule
    may turn from a service failure into a site suspension: see ``_complete``."""
    return result.code is not None or result.error_code is not None


def _reply(result: SendResult) -> str | None:
    """The detail edm.complete records and reply rules match: a transport's error code
    (``"[http:429] ..."``) in front of its text, at most 2000 characters."""
    detail = reply_detail(result.detail, result.error_code)
    return None if detail is None else detail[:2000]


# edm.complete's reason when a reply rule applied: "reply rule <name>: <action>", then
# the site a suspend_site suspended, or why it suspended none (rule names have no spaces)
_RULED = re.compile(r"^reply rule \S+: (?P<action>[a-z_]+)"
                    r"(?: (?P<site>[a-z0-9][a-z0-9_.-]*)| \(.*\))?$")


def _ruled(reason: str | None) -> tuple[str, str | None] | None:
    """(action, site) of the reply rule an ``edm.complete`` reason says it applied, or
    None when no rule applied."""
    m = _RULED.match(reason or "")
    return (m["action"], m["site"]) if m else None


def _suspended_site(reason: str | None) -> str | None:
    """The site an ``edm.complete`` reason says a reply rule has just suspended, or None."""
    ruled = _ruled(reason)
    return ruled[1] if ruled is not None and ruled[0] == "suspend_site" else None


def _builder_thread(dispatcher_id: str) -> concurrent.futures.ThreadPoolExecutor:
    """The dispatcher's message builder: one thread, started on its first build."""
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"edm-build-{dispatcher_id}")


def batch_lane_depth(concurrency: int | None = None) -> int:
    """Most sends an unpaced lane of one connection may hold: BATCH_LANE_DEPTH, or a
    1/LANE_SHARE share of a dispatcher's room when that is smaller (never below LANE_DEPTH)."""
    if concurrency is None:
        return BATCH_LANE_DEPTH
    return max(LANE_DEPTH, min(BATCH_LANE_DEPTH, 2 * concurrency // LANE_SHARE))


def slots_per_service(n: int, concurrency: int | None = None) -> int:
    """Most slots one claim of ``n`` subtasks may give a single service (edm.claim_v2's
    ``p_per_service``) for a dispatcher of ``concurrency`` sends: a paced service only gets
    those within the lookahead anyway."""
    return max(LANE_DEPTH, min(n, batch_lane_depth(concurrency)))


@dataclass
class DispatcherStats:
    dispatcher_id: str
    claimed: int = 0
    sent: int = 0
    failed: int = 0
    retried: int = 0
    service_failures: int = 0
    rejected: int = 0
    claim_calls: int = 0
    reconnects: int = 0
    claim_seconds: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Claimed:
    subtask_id: int
    task_id: int
    user_id: str
    service_id: int
    email: str
    contact_id: int | None
    template_idx: int
    vars: dict[str, Any] | None
    attempt: int
    slot: float = 0.0  # monotonic instant the send may start
    lease_deadline: float = float("inf")  # monotonic instant the lease ends


class ClockMap:
    """Maps database timestamps (slots, lease ends) onto this process's monotonic clock.

    Each claim or renewal reply carries the database's clock as its rows left
    the server (``db_clock``); the reply is read here later, so ``m - db_clock``
    (``m``: the monotonic clock after the read) is an upper bound on the offset
    between the two clocks, too large by that reply's delay. The smallest recent
    bound is the tightest: a mapped slot still errs late, never early, but by
    the fastest recent reply rather than by the reply at hand (on a busy
    machine the delay of one reply varies by tens of milliseconds: mapped with
    it, slots of one service claimed in different calls came out up to that
    much apart from their spacing on the database's clock).

    Recent: the last ``keep`` samples of the last ``max_age`` seconds, so the
    estimate follows drift between the clocks; a sample more than ``reset``
    seconds above the minimum (the database clock was stepped back) restarts
    the estimate from it. The window is long on purpose: when the estimate
    improves, a saturated service's lane keeps pacing from its earlier starts
    (one interval apart), so an estimate that rose with a burst of slow
    replies and fell back would leave that lane late by the difference.
    """

    def __init__(self, keep: int = 512, max_age: float = 60.0, reset: float = 0.5) -> None:
        self.keep, self.max_age, self.reset = keep, max_age, reset
        self._samples: list[tuple[float, float]] = []  # (monotonic, offset bound)
        self.offset = 0.0

    def observe(self, monotonic: float, db_clock: dt.datetime) -> float:
        """Add one bound (``monotonic`` read after the reply stamped ``db_clock``)."""
        bound = monotonic - db_clock.timestamp()
        if self._samples and bound > self.offset + self.reset:
            self._samples.clear()
        self._samples.append((monotonic, bound))
        cutoff = monotonic - self.max_age
        self._samples = [x for x in self._samples[-self.keep:] if x[0] >= cutoff]
        self.offset = min(b for _, b in self._samples)
        return self.offset

    def monotonic(self, ts: dt.datetime) -> float:
        """The monotonic instant of database time ``ts``."""
        return ts.timestamp() + self.offset


def default_dispatcher_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def default_transports(resolver: CredentialResolver | None) -> dict[str, Transport]:
    from edm_sched.transports.null import NullTransport
    from edm_sched.transports.smtp import SmtpTransport

    return {"smtp": SmtpTransport(resolver), "null": NullTransport()}


class Dispatcher:
    def __init__(
        self,
        dsn: str,
        transports: Mapping[str, Transport] | Transport,
        *,
        renderer: Renderer = default_renderer,
        dispatcher_id: str | None = None,
        concurrency: int | None = None,
        batch_size: int | None = None,
        lease_seconds: int | None = None,
        run_sweeps: bool = True,
        on_alert: Callable[[dict[str, Any]], None] | None = None,
        observer: Callable[[str, dict[str, Any]], None] | None = None,
        metrics: DispatcherMetrics | None = None,
    ) -> None:
        if concurrency is not None and not 1 <= concurrency <= 100_000:
            raise errors.InvalidInput(f"concurrency must be 1..100000, got {concurrency}")
        if batch_size is not None and not 1 <= batch_size <= 1000:
            raise errors.InvalidInput(f"batch_size must be 1..1000, got {batch_size}")
        if lease_seconds is not None and not 1 <= lease_seconds <= 86400:
            raise errors.InvalidInput(f"lease_seconds must be 1..86400, got {lease_seconds}")
        self.dsn = db.check_dsn(dsn)
        # One transport for every service, or one per service ``transport`` name.
        self.transports: dict[str, Transport] | Transport = (
            dict(transports) if isinstance(transports, Mapping) else transports)
        self.renderer = renderer
        self.id = dispatcher_id or default_dispatcher_id()
        self._concurrency_arg = concurrency
        self._batch_arg = batch_size
        self.lease_seconds = lease_seconds
        self.run_sweeps = run_sweeps
        self.on_alert = on_alert
        self.metrics = metrics
        self.observer = observer or (metrics.observe if metrics else None)
        self.config: dict[str, Any] = {}
        self.stats = DispatcherStats(self.id)
        self._lanes: dict[int, Lane] = {}
        self._busy: set[int] = set()  # services whose lanes may hold sends (_busy_lanes)
        # per service, the last claim's build of its messages (_start_sends), run by one
        # builder thread: the claims' builds share the GIL with the event loop, and
        # several threads building at once only fight over it
        self._building: dict[int, asyncio.Future[None]] = {}
        self._builder = _builder_thread(self.id)
        self._released: set[int] = set()  # services whose idle holds were released
        self._results: asyncio.Queue[tuple[Claimed, SendResult]] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._stop = asyncio.Event()
        self._templates = TemplateCache(TEMPLATE_CACHE_BYTES, TEMPLATE_CACHE_TASKS)
        self._services: dict[int, tuple[float, ServiceConfig]] = {}
        self._intervals: dict[int, float] = {}  # service_id -> interval in seconds
        # service_id -> its rate limits as (emission interval, tolerance) in seconds
        self._pacers: dict[int, tuple[tuple[float, float], ...]] = {}
        self._clock = ClockMap()
        self._claim_conn: psycopg.AsyncConnection[Any] | None = None
        self._complete_conn: psycopg.AsyncConnection[Any] | None = None

    # ----------------------------------------------------------------- config

    @property
    def concurrency(self) -> int:
        return self._concurrency_arg or int(db.setting(self.config, "queue.concurrent_workers"))

    @property
    def batch_size(self) -> int:
        return self._batch_arg or int(db.setting(self.config, "queue.central_batch_size"))

    async def _load_config(self, conn: psycopg.AsyncConnection[Any]) -> None:
        cur = await conn.execute(query("config_all"))
        self.config = {k: v for k, v in await cur.fetchall()}

    # ------------------------------------------------------------ connections

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        try:
            return await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        except psycopg.OperationalError as exc:
            raise errors.DatabaseUnavailable(f"cannot connect to {db.redact(self.dsn)}: "
                                             f"{str(exc).strip().splitlines()[0]}") from None

    async def _conn(self, which: str) -> psycopg.AsyncConnection[Any]:
        conn: psycopg.AsyncConnection[Any] | None = getattr(self, which)
        if conn is None or conn.closed or conn.broken:
            delay = 0.2
            while True:
                try:
                    conn = await self._connect()
                    break
                except errors.DatabaseUnavailable as exc:
                    if self._stop.is_set() and which == "_claim_conn":
                        raise
                    log_event(log, logging.WARNING, "db_unavailable", error=exc, retry_in=delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
            self.stats.reconnects += 1
            setattr(self, which, conn)
        return conn

    # ------------------------------------------------------------------- main

    async def run(self) -> DispatcherStats:
        conn = await self._conn("_claim_conn")
        self.stats.reconnects = 0
        await self._load_config(conn)
        await conn.execute(query("dispatcher_register"),
                           (self.id, socket.gethostname(), os.getpid()))
        # Startup recovery: leases left by crashed dispatchers become claimable
        # now rather than at the next leader's sweep.
        await sweeps.expire_leases_async(conn)
        # Seed the clock map before the first claim, so that the first slots are
        # mapped about as tightly as later ones (see ClockMap).
        for _ in range(5):
            cur = await conn.execute(query("db_clock"))
            row = await cur.fetchone()
            if row is not None:
                self._clock.observe(time.monotonic(), row[0])
        log_event(log, logging.INFO, "dispatcher_started", dispatcher=self.id,
                  concurrency=self.concurrency, batch=self.batch_size)
        background = [
            asyncio.create_task(self._listen(), name="listen"),
            asyncio.create_task(self._completer(), name="completer"),
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
            asyncio.create_task(self._renewer(), name="renewer"),
        ]
        if self.run_sweeps:
            background.append(asyncio.create_task(self._sweeper(), name="sweeper"))
        for task in background:
            task.add_done_callback(self._background_done)
        try:
            await self._loop()
        finally:
            await self._drain()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            with contextlib.suppress(psycopg.Error, errors.EdmSchedError):
                c = await self._conn("_claim_conn")
                await c.execute(query("release_holds"), (self.id,))
                await c.execute(query("dispatcher_stopped"), (self.id,))
            self._builder.shutdown(wait=False, cancel_futures=True)
            self._builder = _builder_thread(self.id)  # for a later run() (starts no thread)
            for name in ("_claim_conn", "_complete_conn"):
                c2: psycopg.AsyncConnection[Any] | None = getattr(self, name)
                if c2 is not None:
                    await c2.close()
            all_transports = (self.transports.values() if isinstance(self.transports, dict)
                              else [self.transports])
            for t in all_transports:
                with contextlib.suppress(Exception):
                    await t.aclose()
            log_event(log, logging.INFO, "dispatcher_stopped", dispatcher=self.id,
                      claimed=self.stats.claimed, sent=self.stats.sent)
        return self.stats

    def _background_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed; stopping", task.get_name(),
                      exc_info=task.exception())
            self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._slot_freed.set()

    def _busy_lanes(self) -> list[tuple[int, Lane]]:
        """The lanes holding sends (queued, or taken by a sender), forgetting those that
        ran empty: the claim loop looks at these at every turn, not at every lane this
        dispatcher ever opened (a thousand in S1)."""
        busy = []
        for sid in list(self._busy):
            lane = self._lanes.get(sid)
            if lane is None or lane.load == 0:
                self._busy.discard(sid)
            else:
                busy.append((sid, lane))
        return busy

    async def _loop(self) -> None:
        idle_backoff = 0.01
        while not self._stop.is_set():
            # The wake-ups are cleared before the state they signal is read, never after
            # an await: a send that ends or a NOTIFY that arrives while this turn waits on
            # the database leaves its event set, and the turn's sleep ends at once.
            # (Cleared after releasing the idle holds, a wake-up set by the last sends
            # ending meanwhile was lost, and a full dispatcher slept MAX_IDLE with a
            # backlog waiting.)
            self._slot_freed.clear()
            self._wake.clear()
            # Capacity: at most ``concurrency`` sends running, and as many again
            # queued for their slots; a full lane's service is not claimed for.
            busy = self._busy_lanes()
            free = 2 * self.concurrency - sum(lane.load for _, lane in busy)
            if free <= 0:
                await self._release_idle_holds()
                await self._wait(self._slot_freed, MAX_IDLE)
                continue
            want = min(free, self.batch_size)
            full = [sid for sid, lane in busy if lane.room == 0]
            try:
                await self._report_pace(busy)
                rows = await self._claim(want, full)
            except psycopg.OperationalError as exc:
                log_event(log, logging.WARNING, "claim_failed", error=str(exc).strip()[:200])
                await asyncio.sleep(0.5)
                continue
            if rows:
                idle_backoff = 0.01
                try:
                    await self._start_sends(rows)
                except psycopg.OperationalError as exc:
                    # Lost the database between the claim and the sends' lookups: nothing
                    # was sent; the leases expire and are recorded (I1, I7). Keep going.
                    log_event(log, logging.WARNING, "start_failed", n=len(rows),
                              error=str(exc).strip()[:200])
                    await asyncio.sleep(0.5)
                    continue
                if len(rows) == want:
                    continue  # there may be more ready services right now
            delay = await self._next_wakeup()
            if delay is None or delay > MAX_IDLE:
                delay = MAX_IDLE
            if delay <= 0:
                # Work exists but none was claimable this instant (rows locked
                # by a completion, retries in back-off): back off briefly.
                delay = 0.0 if rows else idle_backoff
                idle_backoff = min(idle_backoff * 2, 0.5)
            else:
                idle_backoff = 0.01
            if delay > 0:
                await self._wait(self._wake, delay)

    async def _wait(self, event: asyncio.Event, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    async def _release_idle_holds(self) -> None:
        """No room to claim: services whose lanes ran empty are released at once rather than
        held idle until their holds end (another dispatcher may send for them now)."""
        idle = sorted(sid for sid, lane in self._lanes.items()
                      if lane.load == 0 and sid not in self._released)
        if not idle:
            return
        try:
            await self._report_pace([])  # a late last start first, while still held
            conn = await self._conn("_claim_conn")
            await conn.execute(query("release_idle_holds"), (self.id, idle))
        except psycopg.OperationalError:
            return  # the holds end by themselves
        self._released.update(idle)

    async def _report_pace(self, busy: list[tuple[int, Lane]]) -> None:
        """Lanes of paced services running late tell the database when their next send can
        really start, so the slots claimed next follow the wire (edm.report_pace) instead
        of piling the delay up behind the ones already queued. A lane whose last start the
        provider saw late reports too, busy or not: once its hold ends, another dispatcher
        may claim the next slot, and only the database can tell it (a late start followed
        by another dispatcher's start on time is a gap the provider counts short)."""
        lanes = dict(busy)
        lanes.update((sid, lane) for sid, lane in self._lanes.items()
                     if lane.late_by > PACE_REPORT_AFTER)
        late = [(sid, lane, free) for sid, lane in sorted(lanes.items()) if lane.paced
                for behind, free in [lane.lateness()]
                if behind > PACE_REPORT_AFTER or lane.late_by > PACE_REPORT_AFTER]
        if not late:
            return
        conn = await self._conn("_claim_conn")
        await conn.execute(query("report_pace"), (
            self.id, [sid for sid, _, _ in late],
            [dt.datetime.fromtimestamp(free - self._clock.offset, dt.UTC)
             for _, _, free in late]))
        for _, lane, _ in late:
            lane.late_by = 0.0

    async def _claim(self, n: int, full: list[int] | None = None) -> list[Claimed]:
        conn = await self._conn("_claim_conn")
        t0 = time.perf_counter()
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(query("claim_v2"), (self.id, n, self.lease_seconds, None,
                                              slots_per_service(n, self.concurrency), None,
                                              full or []))
        rows = await cur.fetchall()
        m1 = time.monotonic()
        elapsed = time.perf_counter() - t0
        self.stats.claim_calls += 1
        if len(self.stats.claim_seconds) < 100_000:
            self.stats.claim_seconds.append(elapsed)
        if self.observer:
            self.observer("claim", {"n": len(rows), "seconds": elapsed})
        self.stats.claimed += len(rows)
        # Slots and lease ends are database times; map them onto this process's
        # monotonic clock through the server's clock as the rows left it (m1 is
        # later than that by the transfer: a slot errs late, never early), with
        # the tightest recent estimate of the offset (ClockMap).
        if rows:
            self._clock.observe(m1, rows[-1]["db_clock"])
        return [Claimed(subtask_id=r["subtask_id"], task_id=r["task_id"], user_id=r["user_id"],
                        service_id=r["service_id"], email=r["email"], contact_id=r["contact_id"],
                        template_idx=r["template_idx"], vars=r["vars"], attempt=r["attempt"],
                        slot=self._clock.monotonic(r["send_at"]),
                        lease_deadline=self._clock.monotonic(r["lease_expires_at"]))
                for r in rows]

    async def _next_wakeup(self) -> float | None:
        try:
            conn = await self._conn("_claim_conn")
            cur = await conn.execute(query("next_wakeup_v2"), (self.id, None, None, None))
            row = await cur.fetchone()
        except psycopg.OperationalError:
            return 0.5
        return None if row is None or row[0] is None else float(row[0])

    # ------------------------------------------------------------------ sends

    async def _start_sends(self, rows: list[Claimed]) -> None:
        conn = await self._conn("_claim_conn")
        services = await self._service_configs(conn, {r.service_id for r in rows})
        templates = await self._load_templates(conn, {r.task_id for r in rows})
        contacts = await self._contact_attributes(conn, {r.contact_id for r in rows
                                                         if r.contact_id is not None})
        groups: dict[int, list[QueuedSend]] = {}
        for row in rows:
            service = services[row.service_id]
            template = templates.get(row.task_id, {}).get(row.template_idx)
            variables = {**contacts.get(row.contact_id or 0, {}), **(row.vars or {})}
            groups.setdefault(service.service_id, []).append(
                QueuedSend(row, None, row.slot, row.lease_deadline,
                           context=(service, template, variables, None)))
        for sid, items in groups.items():
            service = items[0].context[0]
            lane = self._lane(service)
            # The messages are built off the event loop, before their slots: a
            # heavy one never stalls other lanes. One call of the builder thread
            # builds a service's messages of this claim, in order (a hand-off per
            # message cost a third of the dispatcher's CPU per send; a thread per
            # service's build, another tenth in GIL hand-offs); while one is
            # queued or running for the lane, its lane builds each message itself
            # (_prepare, after GROUP_BUILD_WAIT), so a lane of heavy messages
            # holds up the others' builds by that wait at most.
            pending = self._building.get(sid)
            if pending is None or pending.done():
                built = asyncio.get_running_loop().run_in_executor(
                    self._builder, self._build_all, items)
                self._building[sid] = built
                for item in items:
                    item.context = (*item.context[:3], built)
            self._released.discard(sid)
            self._busy.add(sid)
            for item in items:
                lane.put(item)

    def _build_all(self, items: list[QueuedSend]) -> None:
        """Build the messages of ``items`` in order (runs in a worker thread). One that
        cannot be built is left unbuilt: its lane builds it again and reports why."""
        for item in items:
            if item.message is not None or item.withdrawn:
                continue
            service, template, variables, _ = item.context
            with contextlib.suppress(Exception):
                item.message = self._build(item.claimed, service, template, variables)

    def _build(self, row: Claimed, service: ServiceConfig, template: TemplateRow | None,
               variables: dict[str, Any]) -> Message:
        """Render and assemble one message (runs in a worker thread)."""
        if template is None:
            raise KeyError(f"task {row.task_id} has no template {row.template_idx}")
        ctx = RenderContext(row.subtask_id, row.task_id, row.user_id, row.email, variables,
                            template)
        return build_message(service, ctx, self.renderer(ctx))

    async def _prepare(self, item: QueuedSend) -> bool:
        """Build the message of a queued send; False (and a render_error outcome) if it
        cannot be built. Runs in the lane, before the slot, off the event loop."""
        if item.message is not None:
            return True
        row: Claimed = item.claimed
        service, template, variables, built = item.context
        if built is not None:
            # the claim's build of its lane's messages (_start_sends); behind a heavy
            # one, this message is built here after a moment rather than waiting for
            # the whole group
            if not built.done():
                await asyncio.wait((built,), timeout=GROUP_BUILD_WAIT)
            if item.message is not None:
                return True
        try:
            item.message = await asyncio.to_thread(self._build, row, service, template,
                                                   variables)
            return True
        except (RenderError, KeyError) as exc:
            outcome = SendResult(Outcome.RENDER_ERROR, detail=f"rendering failed: {exc}")
        except Exception as exc:  # a host renderer's bug fails that recipient only
            outcome = SendResult(Outcome.RENDER_ERROR,
                                 detail=f"renderer raised {type(exc).__name__}: {exc}")
        if item.withdrawn:  # handed back meanwhile (Lane.withdraw): already reported
            return False
        # Built before the slot: nothing was sent, and edm.complete gives back the
        # attempt and the quota unit (render_error).
        if self.observer:
            self.observer("sent", {"outcome": Outcome.RENDER_ERROR.value, "seconds": 0.0})
        self._results.put_nowait((row, outcome))
        self._slot_freed.set()
        return False

    def _transport(self, service: ServiceConfig) -> Transport | None:
        return (self.transports.get(service.transport)
                if isinstance(self.transports, dict) else self.transports)

    def _lane(self, service: ServiceConfig) -> Lane:
        """The service's lane, created (and its connection opened ahead) on first use."""
        lane = self._lanes.get(service.service_id)
        if lane is None:
            connections = service.settings.get("max_connections", 1)
            interval = self._intervals.get(service.service_id, 0.0)
            connections_n = connections if isinstance(connections, int) and connections > 0 else 1
            tolerance = service.settings.get("pace_tolerance_ms", PACE_TOLERANCE_MS)
            tolerance_ms = (tolerance if isinstance(tolerance, int | float)
                            and 0 <= tolerance <= 1000 else PACE_TOLERANCE_MS)
            lane = Lane(service.service_id, interval, connections_n,
                        LANE_DEPTH if interval > 0
                        else batch_lane_depth(self.concurrency) * connections_n,
                        self._pacers.get(service.service_id, ()), tolerance_ms / 1000)

            async def send(item: QueuedSend) -> None:
                # the transport tells a paced lane when the provider saw the start (an
                # unpaced lane waits for no acknowledgement: Lane.acknowledge ignores it)
                message = (replace(item.message,
                                   on_start=lambda at, item=item: lane.acknowledge(item, at))
                           if lane.paced else item.message)
                await self._send(item.claimed, self._services[service.service_id][1], message)

            lane.start(send, self._release, self._prepare)
            self._lanes[service.service_id] = lane
            transport = self._transport(service)
            prepare = getattr(transport, "prepare", None)
            if prepare is not None:  # connect ahead of the first slot
                task = asyncio.create_task(prepare(service))
                task.add_done_callback(lambda t: t.cancelled() or t.exception())
        lane.interval = self._intervals.get(service.service_id, lane.interval)
        lane.last_used = time.monotonic()
        return lane

    def _release(self, item: QueuedSend, reason: str) -> None:
        """Hand a claimed subtask back unsent: no attempt, no quota unit (``released``)."""
        log_event(log, logging.INFO, "send_released", subtask=item.claimed.subtask_id,
                  reason=reason)
        self._results.put_nowait((item.claimed, SendResult(Outcome.RELEASED, detail=reason)))
        self._slot_freed.set()

    async def _send(self, row: Claimed, service: ServiceConfig, message: Message) -> None:
        transport = self._transport(service)
        started = time.perf_counter()
        if transport is None:
            result = SendResult(Outcome.SERVICE,
                                detail=f"no transport registered for {service.transport!r}")
        else:
            try:
                result = await transport.send(service, message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a transport must not raise; if it does, retry later
                result = SendResult(Outcome.TRANSIENT,
                                    detail=f"transport raised {type(exc).__name__}: {exc}"[:500])
        if result.response_ms is None:
            result = dataclasses.replace(
                result, response_ms=int((time.perf_counter() - started) * 1000))
        if self.observer:
            self.observer("sent", {"outcome": result.outcome.value,
                                   "seconds": time.perf_counter() - started,
                                   "lateness": time.monotonic() - row.slot
                                   - (time.perf_counter() - started)})
        self._results.put_nowait((row, result))
        if result.outcome == Outcome.SERVICE and not _may_be_ruled(result):
            # The service backs off (in SQL): its queued sends' slots are void.
            self._drain_lane(service.service_id)
        self._slot_freed.set()

    def _drain_lane(self, service_id: int) -> None:
        lane = self._lanes.get(service_id)
        for item in lane.withdraw() if lane else []:
            self._release(item, "service is backing off")

    async def _service_configs(self, conn: psycopg.AsyncConnection[Any],
                               ids: set[int]) -> dict[int, ServiceConfig]:
        now = time.monotonic()
        missing = [i for i in ids if i not in self._services
                   or now - self._services[i][0] > SERVICE_CACHE_SECONDS]
        if missing:
            cur = await conn.execute(query("dispatch_services"), (missing,))
            for (sid, name, transport, settings, cref, froms, interval_ms,
                 pacers) in await cur.fetchall():
                self._services[sid] = (now, ServiceConfig(sid, name, transport, settings or {},
                                                          cref, tuple(froms)))
                self._intervals[sid] = interval_ms / 1000
                self._pacers[sid] = tuple((t / 1000, tau / 1000) for t, tau in pacers or ())
                if sid in self._lanes:
                    self._lanes[sid].interval = interval_ms / 1000
                    self._lanes[sid].pacers = self._pacers[sid]
        return {i: self._services[i][1] for i in ids}

    async def _load_templates(self, conn: psycopg.AsyncConnection[Any],
                              task_ids: set[int]) -> dict[int, TemplatesOfTask]:
        """The templates of ``task_ids``, from the cache or else read; the cache is then
        trimmed to its bounds, never dropping these (see :mod:`edm_sched.template_cache`)."""
        found, missing = self._templates.lookup(task_ids)
        if not missing:
            return found
        cur = await conn.execute(query("dispatch_templates"), (missing,))
        for (task_id, idx, subject, text, html, from_name, reply_to, headers,
             list_unsubscribe) in await cur.fetchall():
            found[task_id] = self._templates.add(task_id, idx, TemplateRow(
                subject, text, html, from_name, reply_to, tuple((headers or {}).items()),
                list_unsubscribe))
        self._templates.trim(keep=task_ids)
        return found

    async def _contact_attributes(self, conn: psycopg.AsyncConnection[Any],
                                  ids: set[int]) -> dict[int, dict[str, Any]]:
        if not ids:
            return {}
        cur = await conn.execute(query("dispatch_contacts"), (list(ids),))
        return {cid: attrs for cid, attrs in await cur.fetchall()}

    # ------------------------------------------------------------- completion

    async def _completer(self) -> None:
        while True:
            first = await self._results.get()
            batch = [first]
            while len(batch) < COMPLETE_BATCH and not self._results.empty():
                batch.append(self._results.get_nowait())
            await self._complete(batch)

    async def _complete(self, batch: list[tuple[Claimed, SendResult]]) -> None:
        params = (
            self.id,
            [c.subtask_id for c, _ in batch],
            [r.outcome.value if isinstance(r.outcome, Outcome) else str(r.outcome)
             for _, r in batch],
            [r.code for _, r in batch],
            [_reply(r) for _, r in batch],
            [r.response_ms for _, r in batch],
            [r.provider_id for _, r in batch],
            None,
        )
        delay = 0.2
        while True:
            try:
                conn = await self._conn("_complete_conn")
                cur = await conn.execute(query("complete"), params)
                rows = await cur.fetchall()
                break
            except psycopg.OperationalError as exc:
                log_event(log, logging.WARNING, "complete_failed", n=len(batch),
                          error=str(exc).strip()[:200], retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        for subtask_id, accepted, status, reason in rows:
            if not accepted:
                self.stats.rejected += 1
                log_event(log, logging.WARNING, "completion_rejected", subtask=subtask_id,
                          reason=reason)
            elif status == "sent":
                self.stats.sent += 1
            elif status == "failed":
                self.stats.failed += 1
        # A provider's answer may be a throttle a reply rule turns into a (service, site)
        # suspension (edm.reply_rules): the lane is drained only if the service backs off.
        reasons = {row[0]: row[3] for row in rows if row[1]}
        for c, r in batch:
            if r.outcome == Outcome.SERVICE and _may_be_ruled(r):
                ruled = _ruled(reasons.get(c.subtask_id))
                if ruled is None or ruled[0] == "suspend_service":
                    self._drain_lane(c.service_id)
        for service_id, site in {(c.service_id, site) for c, _ in batch
                                 if (site := _suspended_site(reasons.get(c.subtask_id)))}:
            await self._release_site(service_id, site)
        for _, r in batch:
            if r.outcome == Outcome.SERVICE:
                self.stats.service_failures += 1
            elif r.outcome == Outcome.TRANSIENT:
                self.stats.retried += 1

    async def _release_site(self, service_id: int, site: str) -> None:
        """A reply rule has just suspended (service, site): the sends queued in the
        service's lane for that site would only meet the same refusal, so they are
        handed back (the claim skips the pair until the suspension ends). Best effort:
        if the database cannot say which sends those are, they go out as before."""
        lane = self._lanes.get(service_id)
        queued = lane.waiting() if lane else []
        if lane is None or not queued:
            return
        try:
            conn = await self._conn("_complete_conn")
            cur = await conn.execute(query("sites_of"), ([i.claimed.email for i in queued],))
            row = await cur.fetchone()
        except psycopg.Error as exc:
            log_event(log, logging.WARNING, "site_release_failed", service=service_id,
                      site=site, error=str(exc).strip()[:200])
            return
        sites: list[str | None] = row[0] if row else [None] * len(queued)
        at_site = {item for item, s in zip(queued, sites, strict=True) if s == site}
        for item in lane.withdraw(lambda item: item in at_site):
            self._release(item, f"site {site} is suspended for this service")

    async def _drain(self) -> None:
        """Shutdown: hand back queued sends, let running ones finish (within the lease),
        then flush outcomes."""
        grace = float(self.lease_seconds
                      or db.setting(self.config, "queue.service_reservation_timeout"))
        for lane in self._lanes.values():
            for item in lane.withdraw():
                self._release(item, "dispatcher stopping")
        running = sum(len(lane.running) for lane in self._lanes.values())
        if running:
            log_event(log, logging.INFO, "draining", in_flight=running)
            deadline = time.monotonic() + max(grace - 1, 0.1)
            while time.monotonic() < deadline and any(
                    lane.running for lane in self._lanes.values()):
                await asyncio.sleep(0.05)
        # A send still running now has an unknown outcome: its lease expires (recorded).
        for lane in self._lanes.values():
            await lane.stop()
        batch: list[tuple[Claimed, SendResult]] = []
        while not self._results.empty():
            batch.append(self._results.get_nowait())
        for i in range(0, len(batch), COMPLETE_BATCH):
            await self._complete(batch[i:i + COMPLETE_BATCH])

    # ------------------------------------------------------------- background

    async def _listen(self) -> None:
        while True:
            try:
                conn = await self._connect()
                async with conn:
                    await conn.execute(query("listen"))
                    async for note in conn.notifies():
                        if note.channel == "edm_config":
                            await self._load_config(conn)
                            log_event(log, logging.INFO, "config_reloaded", key=note.payload)
                        elif note.payload.startswith("service:"):
                            self._services.pop(int(note.payload.split(":")[1]), None)
                        self._wake.set()
            except (psycopg.OperationalError, errors.DatabaseUnavailable):
                await asyncio.sleep(1.0)
                self._wake.set()  # we may have missed notifications

    async def _renewer(self) -> None:
        """Keep the leases of queued and running sends alive, and close idle lanes."""
        while True:
            lease = float(self.lease_seconds
                          or db.setting(self.config, "queue.service_reservation_timeout"))
            hold = float(db.setting(self.config, "queue.service_hold_seconds"))
            # Often enough that neither a lease nor a hold runs out between renewals.
            await asyncio.sleep(max(min(lease / 3, hold / 2), 0.25))
            now = time.monotonic()
            for sid, lane in list(self._lanes.items()):
                if lane.load == 0 and now - lane.last_used > LANE_IDLE_SECONDS:
                    del self._lanes[sid]
                    self._building.pop(sid, None)
                    await lane.stop()
            items = {i.claimed.subtask_id: i for lane in self._lanes.values()
                     for i in lane.held()}
            if not items:
                continue
            try:
                conn = await self._conn("_complete_conn")
                cur = await conn.execute(query("renew_leases"),
                                         (self.id, list(items), self.lease_seconds, None))
                renewed = await cur.fetchall()
                m1 = time.monotonic()
                if renewed:
                    self._clock.observe(m1, renewed[-1][2])
                for subtask_id, expires, _ in renewed:
                    items[subtask_id].lease_deadline = self._clock.monotonic(expires)
            except psycopg.OperationalError as exc:
                # Not renewed: sends whose lease runs low are handed back by their lane.
                log_event(log, logging.WARNING, "renew_failed", error=str(exc).strip()[:200])

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(10)
            with contextlib.suppress(psycopg.Error, errors.EdmSchedError):
                conn = await self._conn("_complete_conn")
                await conn.execute(query("dispatcher_heartbeat"), (self.id,))

    async def _sweeper(self) -> None:
        # One connection kept for the election: a follower retries the lock on it
        # each tick; the leader holds the lock as long as the connection lives.
        sweep_conn: psycopg.AsyncConnection[Any] | None = None
        leader: psycopg.AsyncConnection[Any] | None = None
        last_wait_check = time.time()
        try:
            while True:
                interval = float(db.setting(self.config, "sweep.interval"))
                try:
                    if self.metrics is not None:
                        conn = await self._conn("_complete_conn")
                        hcur = conn.cursor(row_factory=dict_row)
                        await hcur.execute(query("system_health"))
                        health = await hcur.fetchone()
                        if health:
                            self.metrics.set_health(health)
                    if sweep_conn is None or sweep_conn.closed or sweep_conn.broken:
                        sweep_conn, leader = await self._connect(), None
                    if leader is None:
                        cur = await sweep_conn.execute(query("sweep_try_lead"),
                                                       (sweeps.SWEEP_LOCK_KEY,))
                        row = await cur.fetchone()
                        leader = sweep_conn if row and row[0] else None
                    if leader is not None:
                        if self.metrics is not None:  # the leader alone, so waits count once
                            now = time.time()
                            wcur = await leader.execute(query("first_waits_since"), (
                                dt.datetime.fromtimestamp(last_wait_check, dt.UTC),
                                dt.datetime.fromtimestamp(now, dt.UTC)))
                            for (wait,) in await wcur.fetchall():
                                self.metrics.observe("first_send", {"seconds": wait})
                            last_wait_check = now
                        report = await sweeps.run_async(leader)
                        for error in report.get("errors") or []:
                            log_event(log, logging.ERROR, "sweep_step_failed", error=error)
                        if report.get("leases_expired"):
                            self._wake.set()
                        for alert in report.get("alerts", []):
                            log_event(log, logging.WARNING, "alert", **{
                                k: alert[k] for k in ("kind", "severity", "message")})
                            if self.on_alert:
                                try:
                                    self.on_alert(alert)
                                except Exception:
                                    log.exception("alert callback failed")
                except (psycopg.OperationalError, errors.DatabaseUnavailable) as exc:
                    log_event(log, logging.WARNING, "sweep_failed", error=str(exc)[:200])
                    sweep_conn = leader = None
                except psycopg.Error as exc:  # e.g. a privilege missing: report, keep sending
                    log_event(log, logging.ERROR, "sweep_failed", error=str(exc)[:200])
                await asyncio.sleep(interval)
        finally:
            if sweep_conn is not None:
                await sweep_conn.close()


def run_dispatcher(
    dsn: str | None = None,
    transport: Transport | Mapping[str, Transport] | None = None,
    *,
    concurrency: int | None = None,
    batch_size: int | None = None,
    lease_seconds: int | None = None,
    resolver: CredentialResolver | None = None,
    renderer: Renderer = default_renderer,
    dispatcher_id: str | None = None,
    run_sweeps: bool = True,
    on_alert: Callable[[dict[str, Any]], None] | None = None,
    stop_event: threading.Event | None = None,
    handle_signals: bool = True,
    extra_tasks: list[Callable[[asyncio.Event], Coroutine[Any, Any, None]]] | None = None,
    metrics_port: int | None = None,
) -> DispatcherStats:
    """Run a dispatcher until SIGTERM/SIGINT (or ``stop_event``); returns its statistics.

    ``transport`` is one transport for every service, or a mapping from a
    service's ``transport`` name ("smtp", "null", or your own) to a transport.
    By default: SMTP (credentials from ``resolver``) and the null transport.
    With ``metrics_port``, Prometheus metrics are served on ``/metrics`` there.
    """
    resolved = db.resolve_dsn(dsn)
    if not resolved:
        raise errors.ConfigurationError("no DSN given and EDM_SCHED_DSN is not set")
    metrics: DispatcherMetrics | None = None
    if metrics_port is not None:
        metrics = DispatcherMetrics()
        metrics.serve(metrics_port)
    dispatcher = Dispatcher(resolved, transport or default_transports(resolver),
                            renderer=renderer, dispatcher_id=dispatcher_id,
                            concurrency=concurrency, batch_size=batch_size,
                            lease_seconds=lease_seconds, run_sweeps=run_sweeps, on_alert=on_alert,
                            metrics=metrics)

    async def main() -> DispatcherStats:
        loop = asyncio.get_running_loop()
        if handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, dispatcher.stop)
        watchers: list[asyncio.Task[None]] = []
        if stop_event is not None:
            async def watch() -> None:
                while not stop_event.is_set():
                    await asyncio.sleep(0.05)
                dispatcher.stop()
            watchers.append(asyncio.create_task(watch()))
        for extra in extra_tasks or []:
            watchers.append(asyncio.create_task(extra(dispatcher._stop)))
        try:
            return await dispatcher.run()
        finally:
            for w in watchers:
                w.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)

    return asyncio.run(main())


__all__ = ["ClockMap", "Dispatcher", "DispatcherStats", "run_dispatcher"]
