"""conn=: the API runs inside the host's transaction and never commits it.

A campaign created together with the host's own rows commits or rolls back
with them (the transactional-outbox habit); an error in the call rolls back
only what the call did (a savepoint), and a committed task is dispatched.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from edm_sched import AsyncScheduler, InvalidRecipients, Scheduler, run_dispatcher
from edm_sched.transports.null import NullTransport
from tests.support.helpers import TEMPLATE, counters_match


def _list_task(name: str, n: int, user: str = "u") -> dict[str, Any]:
    return {"user_id": user, "name": name, "templates": [TEMPLATE],
            "recipients": [{"email": f"{name}-{i}@r.example"} for i in range(n)]}


@pytest.fixture
def sched(dsn: str, conn: psycopg.Connection[Any]) -> Iterator[Scheduler]:
    conn.execute("CREATE TABLE public.orders (id int PRIMARY KEY, task_id bigint)")
    with Scheduler(dsn) as s:
        s.upsert_user("u")
        sid = s.create_service({"name": "s", "from_addresses": ["s@x.example"],
                                "interval_seconds": 0, "daily_quota": 1000,
                                "transport": "null"})
        s.grant(sid, "u")
        yield s


def _count(conn: psycopg.Connection[Any], sql: Any) -> int:
    row = conn.execute(sql).fetchone()
    assert row is not None
    return int(row[0])


def test_rolled_back_host_transaction_leaves_nothing(
        sched: Scheduler, dsn: str, conn: psycopg.Connection[Any]) -> None:
    sched.upsert_contacts("u", [{"email": f"c{i}@r.example", "tags": ["vip"]} for i in range(7)])
    used_before = sched.get_user("u").quota_used
    with psycopg.connect(dsn) as host:  # not autocommit: Django, SQLAlchemy, plain psycopg
        host.execute("INSERT INTO public.orders (id) VALUES (1)")
        t1 = sched.create_task(_list_task("a", 5), conn=host)
        t2 = sched.create_task({"user_id": "u", "name": "rule", "templates": [TEMPLATE],
                                "rule": {"include_any": ["vip"]}}, conn=host)
        sched.upsert_user("v", conn=host)
        assert (t1.recipients, t2.recipients) == (5, 7)
        # Invisible to others before the host commits.
        assert _count(conn, "SELECT count(*) FROM edm.tasks") == 0
        host.rollback()
    assert _count(conn, "SELECT count(*) FROM edm.tasks") == 0
    assert _count(conn, "SELECT count(*) FROM edm.subtasks") == 0
    assert _count(conn, "SELECT count(*) FROM public.orders") == 0
    assert _count(conn, "SELECT count(*) FROM edm.users WHERE user_id = 'v'") == 0
    assert sched.get_user("u").quota_used == used_before


def test_committed_host_transaction_is_dispatched(
        sched: Scheduler, dsn: str, conn: psycopg.Connection[Any]) -> None:
    with psycopg.connect(dsn) as host, host.transaction():
        created = sched.create_task(_list_task("b", 6), conn=host)
        host.execute("INSERT INTO public.orders (id, task_id) VALUES (2, %s)",
                     (created.task_id,))
    assert conn.execute("SELECT task_id FROM public.orders").fetchone() == (created.task_id,)
    transport = NullTransport(record=True)
    stop = threading.Event()
    th = threading.Thread(target=run_dispatcher, args=(dsn, transport),
                          kwargs={"stop_event": stop, "handle_signals": False})
    th.start()
    try:
        deadline = time.monotonic() + 30
        while sched.get_task(created.task_id).status != "completed":
            assert time.monotonic() < deadline, "the committed task was not dispatched"
            time.sleep(0.05)
    finally:
        stop.set()
        th.join(30)
    assert sorted(m[2] for m in transport.sent) == sorted(f"b-{i}@r.example" for i in range(6))
    assert counters_match(conn) == []


def test_an_error_rolls_back_only_the_call(sched: Scheduler, dsn: str,
                                           conn: psycopg.Connection[Any]) -> None:
    with psycopg.connect(dsn) as host:
        host.execute("INSERT INTO public.orders (id) VALUES (3)")
        with pytest.raises(InvalidRecipients):
            sched.create_task({**_list_task("c", 2),
                               "recipients": [{"email": "ok@r.example"}, {"email": "nope"}]},
                              conn=host)
        # The host's transaction is still usable, and the staged list is gone:
        # the next task in the same transaction sees only its own recipients.
        again = sched.create_task(_list_task("d", 3), conn=host)
        assert again.recipients == 3
        host.commit()
    assert _count(conn, "SELECT count(*) FROM public.orders") == 1
    assert _count(conn, "SELECT count(*) FROM edm.tasks") == 1
    assert _count(conn, "SELECT count(*) FROM edm.subtasks") == 3


def test_autocommit_connection_outside_a_block_runs_its_own_transaction(
        sched: Scheduler, dsn: str, conn: psycopg.Connection[Any]) -> None:
    with psycopg.connect(dsn, autocommit=True) as host:
        sched.create_task(_list_task("e", 2), conn=host)
        with host.transaction() as tx:
            sched.create_task(_list_task("f", 2), conn=host)
            raise psycopg.Rollback(tx)
    names = [r[0] for r in conn.execute("SELECT name FROM edm.tasks ORDER BY task_id")]
    assert names == ["e"]


def test_async_conn_joins_the_host_transaction(sched: Scheduler, dsn: str,
                                               conn: psycopg.Connection[Any]) -> None:
    async def main() -> None:
        async with AsyncScheduler(dsn) as s, await psycopg.AsyncConnection.connect(dsn) as host:
            await host.execute("INSERT INTO public.orders (id) VALUES (4)")
            await s.create_task(_list_task("g", 4), conn=host)
            await s.jobs.create_job({"user_id": "t", "name": "j", "cron": "0 3 * * *",
                                     "target": {"kind": "function", "function": "f"}},
                                    conn=host)
            await host.rollback()
            await s.create_task(_list_task("h", 1), conn=host)
            await host.commit()

    asyncio.run(main())
    assert [r[0] for r in conn.execute("SELECT name FROM edm.tasks")] == ["h"]
    assert _count(conn, "SELECT count(*) FROM edm.jobs") == 0
    assert _count(conn, "SELECT count(*) FROM public.orders") == 0


def test_jobs_and_monitoring_take_conn_too(sched: Scheduler, dsn: str,
                                           conn: psycopg.Connection[Any]) -> None:
    with psycopg.connect(dsn) as host:
        job = sched.jobs.create_job({"user_id": "t", "name": "j", "cron": "0 3 * * *",
                                     "target": {"kind": "function", "function": "f"}},
                                    conn=host)
        assert sched.jobs.get_job(job.job_id, conn=host).name == "j"
        sched.monitoring.config_set("sweep.interval", 42, conn=host)
        assert sched.monitoring.config_get("sweep.interval", conn=host).value == 42
        host.rollback()
    assert _count(conn, "SELECT count(*) FROM edm.jobs") == 0
    assert sched.monitoring.config_get("sweep.interval").value != 42


def test_first_statement_of_the_host_transaction_is_ours(
        sched: Scheduler, dsn: str, conn: psycopg.Connection[Any]) -> None:
    """An idle non-autocommit connection (Django's atomic() before any query): the call
    opens the host's transaction without committing it."""
    with psycopg.connect(dsn) as host:
        assert host.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        sched.create_task(_list_task("i", 2), conn=host)
        assert host.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        host.rollback()
        sched.create_task(_list_task("j", 1), conn=host)
        host.commit()
    assert [r[0] for r in conn.execute("SELECT name FROM edm.tasks")] == ["j"]
