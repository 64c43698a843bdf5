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

from edm_sched.api import Scheduler
from edm_sched.dispatcher import run_dispatcher
from edm_sched.lanes import Lane, QueuedSend
from edm_sched.rendering import RenderContext, Rendered, RenderError, default_renderer
from edm_sched.transports.null import NullTransport
from tests.support.helpers import wait_for

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
    # The light service: 20 sends 0.1 s apart take 1.9 s. Its sends overlap the
    # heavy renders (6 s of them); built on the event loop, each render would
    # stall the light lane for a second.
    span = light_sends[-1] - light_sends[0]
    assert 1.9 <= span < 3.0, span
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
