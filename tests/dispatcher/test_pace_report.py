"""A lane whose last start the provider saw late tells the database, busy or not.

The lane paces its own next start from the provider's acknowledgement
(edm_sched/lanes.py), but once the service's hold ends another dispatcher may
claim the next slot, and it knows only what the database knows: a start seen
360 ms late followed by another dispatcher's start on time is a gap the
provider counts 360 ms short (seen once in the limits scenario). So the
dispatcher reports such a lane's next possible start (edm.report_pace) before
its next claim and before it releases idle holds, even when the lane has
nothing queued.
"""

from __future__ import annotations

import asyncio
import datetime as dt

import psycopg

from edm_sched.api import Scheduler
from edm_sched.dispatcher import Dispatcher
from edm_sched.lanes import Lane, QueuedSend
from edm_sched.transports.null import NullTransport
from tests.support.helpers import make_service, make_task


def test_a_late_acknowledgement_is_recorded_by_the_lane() -> None:
    lane = Lane(service_id=1, interval=1.0, connections=1, depth=4)
    item = QueuedSend(claimed=None, message=None, slot=100.0, lease_deadline=200.0)
    lane._unacked = item  # as the sender does when the transaction starts
    lane.acknowledge(item, 100.36)
    assert abs(lane.late_by - 0.36) < 1e-9
    lane.acknowledge(item, 105.0)  # a later call for the same send is ignored
    assert abs(lane.late_by - 0.36) < 1e-9


def test_an_idle_lane_that_started_late_moves_the_services_next_slot(dsn: str) -> None:
    with Scheduler(dsn) as s:
        s.upsert_user("u")
        sid = make_service(s, "paced", interval=1.0, users=["u"])
        make_task(s, "u", 3)

    async def scenario() -> tuple[int, float]:
        d = Dispatcher(dsn, NullTransport(), dispatcher_id="d-pace", run_sweeps=False)
        await d._load_config(await d._conn("_claim_conn"))  # as run() does first
        [row] = await d._claim(1)  # the service is now held by d-pace
        lane = Lane(service_id=sid, interval=1.0, connections=1, depth=4, tolerance=0.005)
        d._lanes[sid] = lane
        item = QueuedSend(claimed=row, message=None, slot=row.slot,
                          lease_deadline=row.lease_deadline)
        lane._unacked = item
        lane.acknowledge(item, row.slot + 0.36)  # seen 360 ms late; nothing queued after it
        await d._report_pace([])  # no busy lane: reported all the same
        late_by = lane.late_by
        for conn in (d._claim_conn, d._complete_conn):
            if conn is not None:
                await conn.close()
        return row.subtask_id, late_by

    subtask_id, late_by = asyncio.run(scenario())
    assert late_by == 0.0  # reported once
    with psycopg.connect(dsn, autocommit=True) as conn:
        found = conn.execute(
            "SELECT st.leased_at, s.last_sent_at FROM edm.subtasks st, edm.services s"
            " WHERE st.subtask_id = %s AND s.service_id = %s", (subtask_id, sid)).fetchone()
    assert found is not None
    slot, last_sent_at = found
    # the next slot (last_sent_at + interval) now counts from the late start, not the slot
    assert last_sent_at >= slot + dt.timedelta(seconds=0.3)
