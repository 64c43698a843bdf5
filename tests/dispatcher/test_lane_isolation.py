"""I11 inside one dispatcher: one service's heavy messages never delay another's sends.

A message is built (rendered and assembled) by its service's lane, before its
slot, in a worker thread. A renderer that takes a second per message (here: a
host renderer that blocks, as a huge template or a slow lookup would) holds up
its own service only; built on the event loop, it would stall every lane of
the process. Real dispatcher, real database, the shipped null transport, which
records when each send reached it.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time

import pytest

from edm_sched.api import Scheduler
from edm_sched.dispatcher import run_dispatcher
from edm_sched.lanes import Lane, QueuedSend
from edm_sched.rendering import RenderContext, Rendered, RenderError, default_renderer
from edm_sched.transports.null import NullTransport
from tests.support.helpers import dispatcher_thread, wait_for

HEAVY_SECONDS = 1.0




def renderer(ctx: RenderContext) -> Rendered:
    if ctx.template.subject.startswith("heavy"):
        time.sleep(HEAVY_SECONDS)  # blocks whatever thread it runs on
        if ctx.email.startswith("bad"):
            raise RenderError("this recipient cannot be rendered")
    return default_renderer(ctx)


def test_a_slow_renderer_delays_only_its_own_service(dsn: str) -> None:
    transport = NullTransport(record=True)
    with Scheduler(dsn) as s:
        ids = {}
        for name, interval in (("heavy", 0.0), ("light", 0.1)):
            s.upsert_user(name)
            ids[name] = s.create_service({
                "name": name, "from_addresses": [f"{name}@x.example"],
                "interval_seconds": interval, "daily_quota": 1000, "transport": "null"})
            s.grant(ids[name], name)
        heavy = s.create_task({
            "user_id": "heavy", "name": "heavy",
            "templates": [{"subject": "heavy {{ email }}", "body_text": "x"}],
            "recipients": [{"email": f"{p}{i}@r.example"}
                           for i, p in enumerate(["bad", "h", "h", "h", "h", "h"])]})
        light = s.create_task({
            "user_id": "light", "name": "light",
            "templates": [{"subject": "light", "body_text": "x"}],
            "recipients": [{"email": f"l{i}@r.example"} for i in range(20)]})
        stop = threading.Event()
        th = threading.Thread(target=run_dispatcher, args=(dsn, transport),
                              kwargs={"stop_event": stop, "handle_signals": False,
                                      "renderer": renderer})
        th.start()
        try:
            wait_for(timeout=60.0, pred=lambda: s.get_task(light.task_id).status == "completed")
            light_done = time.monotonic()
            wait_for(timeout=60.0, pred=lambda: s.get_task(heavy.task_id).status == "completed")
        finally:
            stop.set()
            th.join(30)
        heavy_status = s.get_task(heavy.task_id)
    assert not th.is_alive()
    light_sends = sorted(t for t, sid, *_ in transport.sent if sid == ids["light"])
    heavy_sends = sorted(t for t, sid, *_ in transport.sent if sid == ids["heavy"])
    assert len(light_sends) == 20 and len(heavy_sends) == 5
    # The light service: 20 sends 0.1 s apart take 1.9 s (a lane that fell behind may
    # catch up by its pace tolerance, 5 ms a gap). Its sends overlap the heavy renders
    # (6 s of them); built on the event loop, each render would stall the light lane
    # for a second.
    span = light_sends[-1] - light_sends[0]
    assert 1.9 - 19 * 0.005 <= span < 3.0, span
    assert max(b - a for a, b in itertools.pairwise(light_sends)) < 0.6
    assert light_sends[-1] < heavy_sends[-1] <= light_done + 10
    # The recipient that cannot be rendered failed alone, nothing sent for it.
    assert (heavy_status.sent_count, heavy_status.failed_count) == (5, 1)


def test_sends_whose_slots_passed_keep_the_interval_on_the_wire() -> None:
    """Slots already past (the loop was busy, a connection was slow to open) start
    now, one interval apart, not back to back to "catch up"."""
    async def main() -> list[float]:
        starts: list[float] = []

        async def send(item: QueuedSend) -> None:
            starts.append(time.monotonic())

        def release(item: QueuedSend, reason: str) -> None:
            raise AssertionError(reason)

        lane = Lane(service_id=1, interval=0.1, connections=1, depth=4)
        past = time.monotonic() - 5.0
        for i in range(4):
            lane.queue.put_nowait(QueuedSend(i, object(), past + 0.1 * i, float("inf")))
        lane.start(send, release)
        while len(starts) < 4:
            await asyncio.sleep(0.01)
        await lane.stop()
        return starts

    starts = asyncio.run(main())
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= 0.099, gaps


def test_a_send_woken_late_still_keeps_the_interval_before_the_next() -> None:
    """The interval counts from when a send really started: a worker woken late by a
    busy event loop pushes the next send back instead of sending it right after."""

    async def main() -> list[float]:
        starts: list[float] = []

        async def send(item: QueuedSend) -> None:
            starts.append(time.monotonic())

        def release(item: QueuedSend, reason: str) -> None:
            raise AssertionError(reason)

        async def hog() -> None:
            await asyncio.sleep(0.05)
            time.sleep(0.3)  # the event loop is busy while the second send is due

        lane = Lane(service_id=1, interval=0.1, connections=1, depth=4)
        now = time.monotonic()
        for i in range(4):
            lane.queue.put_nowait(QueuedSend(i, object(), now + 0.1 * i, float("inf")))
        busy = asyncio.create_task(hog())
        lane.start(send, release)
        while len(starts) < 4:
            await asyncio.sleep(0.01)
        await busy
        await lane.stop()
        return starts

    starts = asyncio.run(main())
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps[0] >= 0.3 and min(gaps) >= 0.099, gaps


def _run_lane(lane: Lane, slots: list[float], ack_delay: float,
              report: bool = True) -> list[tuple[float, float]]:
    """Run ``lane`` over sends at ``slots``; each send's provider answers its start
    ``ack_delay`` s after the send began (reported through the acknowledgement when
    ``report``, else only the end of the send bounds it). Returns (start, ack) pairs."""
    async def main() -> list[tuple[float, float]]:
        done: list[tuple[float, float]] = []

        async def send(item: QueuedSend) -> None:
            began = time.monotonic()
            await asyncio.sleep(ack_delay)
            acked = time.monotonic()
            if report:
                lane.acknowledge(item, acked)
            await asyncio.sleep(0.01)  # the rest of the transaction
            done.append((began, acked))

        def release(item: QueuedSend, reason: str) -> None:
            raise AssertionError(reason)

        for i, slot in enumerate(slots):
            lane.queue.put_nowait(QueuedSend(i, object(), slot, float("inf")))
        lane.start(send, release)
        while len(done) < len(slots):
            await asyncio.sleep(0.005)
        await lane.stop()
        return done

    return asyncio.run(main())


def test_the_interval_counts_from_the_providers_acknowledgement_of_the_start() -> None:
    """Where the provider saw a start is only known to be no later than its answer: the
    next start waits an interval from that answer, so a start that reached the server
    late (its answer came 40 ms after the send began) cannot be followed by one less than
    an interval later as the server sees it."""
    now = time.monotonic()
    done = _run_lane(Lane(service_id=1, interval=0.1, connections=1, depth=8),
                     [now + 0.1 * i for i in range(4)], ack_delay=0.04)
    for (_, prev_ack), (start, _) in itertools.pairwise(done):
        assert start >= prev_ack + 0.099, done


def test_every_rate_limit_paces_starts_counted_at_their_acknowledgement() -> None:
    """A rate of 10 per second with a burst of 3 (GCRA: T = 100 ms, tau = 200 ms): three
    starts at once, then one per T counted from the acknowledgements; a transport that
    reports nothing is paced from the end of each send."""
    for report in (True, False):
        now = time.monotonic()
        lane = Lane(service_id=1, interval=0.0, connections=1, depth=8,
                    pacers=((0.1, 0.2),))
        done = _run_lane(lane, [now] * 6, ack_delay=0.005, report=report)
        starts = [s for s, _ in done]
        assert starts[2] - starts[0] < 0.08, starts  # the burst
        # a provider's bucket fed with the acknowledgement times never refuses a start
        tat = None
        for start, ack in done:
            if tat is not None:
                assert start >= tat - 0.2 - 1e-3, (report, done)
            tat = max(tat if tat is not None else ack, ack) + 0.1
        assert starts[5] - starts[0] >= 0.3 - 1e-3, starts


def test_an_unpaced_service_starts_its_connections_in_parallel() -> None:
    """No interval, no rate limit: nothing to pace, so a start does not wait for the
    previous one's acknowledgement; four connections start four sends at once."""
    now = time.monotonic()
    done = _run_lane(Lane(service_id=1, interval=0.0, connections=4, depth=8),
                     [now] * 4, ack_delay=0.1, report=False)
    starts = sorted(s for s, _ in done)
    assert starts[-1] - starts[0] < 0.05, starts


@pytest.mark.slow
def test_withdrawn_sends_never_start_and_free_their_slots() -> None:
    """Lane.withdraw takes back sends not started yet: the ones queued and the one a
    sender already holds while it waits for its slot. The sends left keep their order,
    and the slot the held one would have used goes to the next send."""
    async def main() -> tuple[list[tuple[int, float]], list[QueuedSend], float]:
        starts: list[tuple[int, float]] = []

        async def send(item: QueuedSend) -> None:
            starts.append((item.claimed, time.monotonic()))

        def release(item: QueuedSend, reason: str) -> None:
            raise AssertionError(reason)

        lane = Lane(service_id=1, interval=0.4, connections=1, depth=8)
        now = time.monotonic()
        for i, at in enumerate((0.0, 0.6, 0.7, 1.2, 1.6)):
            lane.queue.put_nowait(QueuedSend(i, object(), now + at, float("inf")))
        lane.start(send, release)
        while not starts:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.1)  # send 1 is held by the sender, waiting for its slot
        assert [i.claimed for i in lane.waiting()] == [1, 2, 3, 4]
        taken = lane.withdraw(lambda item: item.claimed in (1, 3))
        withdrawn_at = time.monotonic()
        while len(starts) < 3:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.5)
        await lane.stop()
        return starts, taken, withdrawn_at

    starts, taken, withdrawn_at = asyncio.run(main())
    assert sorted(i.claimed for i in taken) == [1, 3] and all(i.withdrawn for i in taken)
    assert [i for i, _ in starts] == [0, 2, 4]
    # send 2 starts at its own slot (0.7 s), not an interval after the withdrawn
    # send 1's (0.6 + 0.4 s)
    assert starts[1][1] - starts[0][1] < 0.9, starts
    assert starts[1][1] > withdrawn_at


def slow_first(ctx: RenderContext) -> Rendered:
    if ctx.email.startswith("slow"):
        time.sleep(HEAVY_SECONDS)
    return default_renderer(ctx)


def test_a_heavy_message_holds_only_itself_within_its_lane(dsn: str) -> None:
    """A claim's messages of one service are built by one worker-thread call, in
    order. Behind a heavy one, the service's other connection does not wait for the
    whole group: its lane builds the next message itself after a moment."""
    transport = NullTransport(record=True)
    with Scheduler(dsn) as s:
        s.upsert_user("u")
        sid = s.create_service({"name": "two", "from_addresses": ["two@x.example"],
                                "interval_seconds": 0, "daily_quota": 1000,
                                "transport": "null", "settings": {"max_connections": 2}})
        s.grant(sid, "u")
        task = s.create_task({
            "user_id": "u", "name": "t",
            "templates": [{"subject": "s {{ email }}", "body_text": "x"}],
            "recipients": [{"email": "slow@r.example"}, {"email": "fast1@r.example"},
                           {"email": "fast2@r.example"}]})
        with dispatcher_thread(dsn, transport, renderer=slow_first) as th:
            wait_for(timeout=30.0, pred=lambda: s.get_task(task.task_id).status == "completed")
    assert not th.is_alive()
    sent = {rcpt: t for t, _sid, rcpt, *_ in transport.sent}
    assert set(sent) == {"slow@r.example", "fast1@r.example", "fast2@r.example"}
    # the fast ones went while the heavy one was still being built
    assert max(sent["fast1@r.example"], sent["fast2@r.example"]) < sent["slow@r.example"] - 0.5

