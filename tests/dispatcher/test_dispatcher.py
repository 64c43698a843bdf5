"""run_dispatcher() end to end in-process: claims, renders, sends, completes, stops."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest

from edm_sched import dispatcher
from edm_sched.api import Scheduler
from edm_sched.dispatcher import run_dispatcher
from edm_sched.transports.null import NullTransport
from tests.support.helpers import counters_match, dispatcher_thread, make_service, wait_for


def test_dispatcher_sends_everything_and_stops(dsn: str, conn: psycopg.Connection[Any]) -> None:
    transport = NullTransport(record=True)
    with Scheduler(dsn) as s:
        for u in ("a", "b"):
            s.upsert_user(u)
        sids = [s.create_service({"name": f"s{i}", "from_addresses": [f"s{i}@x.example"],
                                  "interval_seconds": 0.02, "daily_quota": 1000,
                                  "transport": "null"}) for i in range(2)]
        for sid in sids:
            s.grant(sid, "a")
            s.grant(sid, "b")
        s.upsert_contacts("a", [{"email": f"c{i}@r.example", "attributes": {"first_name": f"N{i}"},
                                 "tags": ["vip"]} for i in range(10)])
        t1 = s.create_task({"user_id": "a", "name": "rule", "rule": {"include_any": ["vip"]},
                            "templates": [{"subject": "Hi {{ first_name }}", "body_text": "x"}]})
        t2 = s.create_task({"user_id": "b", "name": "list",
                            "recipients": [{"email": f"l{i}@r.example", "vars": {"first_name": "L"}}
                                           for i in range(10)],
                            "templates": [{"subject": "Hi {{ first_name }}", "body_text": "x"}]})
        stop = threading.Event()
        result: dict[str, Any] = {}
        th = threading.Thread(target=lambda: result.update(stats=run_dispatcher(
            dsn, transport, stop_event=stop, handle_signals=False)))
        th.start()
        try:
            wait_for(lambda: s.get_task(t1.task_id).status == "completed"
                      and s.get_task(t2.task_id).status == "completed")
        finally:
            stop.set()
            th.join(30)
    assert not th.is_alive()
    assert result["stats"].sent == 20
    assert len({m[3] for m in transport.sent}) == 20  # distinct Message-IDs
    assert counters_match(conn) == []
    # I2 from the database: per service, send starts at least the interval apart
    gaps = conn.execute("""
        SELECT min(gap) FROM (
          SELECT started_at - lag(started_at) OVER (PARTITION BY service_id ORDER BY started_at) gap
          FROM edm.send_events WHERE kind = 'sent') x""").fetchone()
    assert gaps is not None and gaps[0].total_seconds() >= 0.02


def test_render_error_fails_only_that_recipient(dsn: str) -> None:
    transport = NullTransport(record=True)
    with Scheduler(dsn) as s:
        s.upsert_user("a")
        make_service(s, "s", interval=0, users=["a"])
        t = s.create_task({"user_id": "a", "name": "t",
                           "templates": [{"subject": "Hi {{ first_name }}", "body_text": "x"}],
                           "recipients": [{"email": "ok@r.example", "vars": {"first_name": "A"}},
                                          {"email": "missing@r.example"},
                                          {"email": "inject@r.example",
                                           "vars": {"first_name": "x\r\nBcc: evil@e.example"}}]})
        with dispatcher_thread(dsn, transport):
            wait_for(lambda: s.get_task(t.task_id).status == "completed")
        st = s.get_task(t.task_id)
    assert (st.sent_count, st.failed_count) == (1, 2)
    assert [m[2] for m in transport.sent] == ["ok@r.example"]


def test_more_tasks_than_the_template_cache_holds(dsn: str, conn: psycopg.Connection[Any],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A fair claim cycles through every task; with more tasks than the template cache
    holds, every recipient is still rendered with its own task's template. (The cache
    used to be cleared right after a claim's templates were read, and that claim's
    messages failed as render errors: 350 of 75,350 in an S1 world.)"""
    monkeypatch.setattr(dispatcher, "TEMPLATE_CACHE_TASKS", 2)
    transport = NullTransport(record=True)
    with Scheduler(dsn) as s:
        s.upsert_user("a")
        make_service(s, "s", interval=0, users=["a"])
        tasks = [s.create_task({"user_id": "a", "name": f"t{i}",
                                "templates": [{"subject": f"Task {i}", "body_text": "x"}],
                                "recipients": [{"email": f"r{j}@r{i}.example"}
                                               for j in range(4)]})
                 for i in range(6)]
        with dispatcher_thread(dsn, transport, batch_size=5):
            wait_for(lambda: all(s.get_task(t.task_id).status == "completed" for t in tasks))
        counts = [(s.get_task(t.task_id).sent_count, s.get_task(t.task_id).failed_count)
                  for t in tasks]
    assert counts == [(4, 0)] * 6
    assert counters_match(conn) == []


def _send_a_backlog(dsn: str, recipients: int, transport: NullTransport,
                    **dispatcher_args: Any) -> None:
    """One user's task of ``recipients`` on six services without an interval, sent to the
    end by one dispatcher in this process."""
    with Scheduler(dsn) as s:
        s.upsert_user("u")
        for i in range(6):
            make_service(s, f"n{i}", interval=0, users=["u"])
        t = s.create_task({"user_id": "u", "name": "t",
                           "templates": [{"subject": "Hi", "body_text": "x"}],
                           "recipients": [{"email": f"r{i}@r.example"}
                                          for i in range(recipients)]})
        with dispatcher_thread(dsn, transport, **dispatcher_args):
            wait_for(lambda: s.get_task(t.task_id).status == "completed", timeout=60)


def test_a_dispatcher_with_a_backlog_never_sleeps_it_away(dsn: str,
                                                          conn: psycopg.Connection[Any]) -> None:
    """Sends that finish while the claim loop is busy with the database wake it. When a
    full dispatcher released its idle holds (a query) and every send finished meanwhile,
    the loop cleared the wake-up they had set and slept ``MAX_IDLE`` (5 s) with work
    waiting: a 300-recipient task on six unpaced services went out in bursts of 20, one
    every 5 s, and a ``kill -9`` test's survivor took up to 30 s instead of 5 to finish."""
    _send_a_backlog(dsn, 300, NullTransport(), concurrency=10)
    # Judged on the database's clock: the longest pause between two sends' starts.
    row = conn.execute("""
        SELECT extract(epoch FROM max(gap)) FROM (
          SELECT started_at - lag(started_at) OVER (ORDER BY started_at) gap
          FROM edm.send_events WHERE kind = 'sent') x""").fetchone()
    assert row is not None
    assert float(row[0]) < dispatcher.MAX_IDLE / 2, f"the dispatcher slept {row[0]} s"


def test_a_small_dispatcher_spreads_its_room_over_the_services(
        dsn: str, conn: psycopg.Connection[Any]) -> None:
    """At the default concurrency (10: room for 20 sends, running or queued) a claim gives
    an unpaced service at most an eighth of the room, never fewer than 4, so five services
    send at once. (Lanes of 16 took the first claim as 16 + 4: two of six single-connection
    services sent and the other four stood idle with work waiting.)"""
    _send_a_backlog(dsn, 100, NullTransport(delay=0.01))
    assert dispatcher.slots_per_service(20, 10) == 4
    # The first claim's subtasks: one transaction, so one leased_at (kept once sent).
    first = conn.execute("""
        SELECT count(*), count(DISTINCT service_id) FROM edm.subtasks
        WHERE leased_at = (SELECT min(leased_at) FROM edm.subtasks)""").fetchone()
    assert first == (20, 5)
