"""One rule in one place: every path that drains a task completes it (issue 18, point 3).

"A sending task with nothing pending or leased is completed" lives in
``edm.task_drained`` and the trigger ``tasks_when_drained``. Each test below
drains a task by another path and checks, without running the sweep, that the
task is completed at once, with the status machine's ``prev_status`` and both
timestamps; the last test checks that no other function writes the rule again.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from edm_sched.api import Scheduler
from tests.support.helpers import (
    TEMPLATE,
    at,
    claim,
    complete,
    counters_match,
    make_service,
    make_task,
)

DONE = ("completed", "sending", True, True)


@pytest.fixture
def sched(dsn: str) -> Iterator[Scheduler]:
    with Scheduler(dsn) as s:
        s.upsert_user("alice")
        make_service(s, "svc", interval=0, users=["alice"])
        yield s


def state(conn: psycopg.Connection[Any], task: int) -> tuple[Any, ...]:
    row = conn.execute("SELECT status, prev_status, started_at IS NOT NULL, finished_at IS NOT NULL"
                       " FROM edm.tasks WHERE task_id = %s", (task,)).fetchone()
    assert row is not None
    return tuple(row)


def nothing_left_drained(conn: psycopg.Connection[Any]) -> bool:
    n = conn.execute(
        "SELECT count(*) FROM edm.tasks t"
        " WHERE edm.task_drained(t.status, t.pending_count, t.leased_count)").fetchone()
    return n is not None and n[0] == 0 and counters_match(conn) == []


def set_max_attempts(conn: psycopg.Connection[Any], n: int) -> None:
    conn.execute("SELECT edm.config_set('queue.max_attempts', %s::jsonb)", (str(n),))


@pytest.mark.parametrize(("outcome", "code"), [("sent", None), ("permanent", 550),
                                                ("transient", 451)])
def test_completing_the_last_subtask(sched: Scheduler, conn: psycopg.Connection[Any],
                                     outcome: str, code: int | None) -> None:
    set_max_attempts(conn, 1)  # a transient failure on the only attempt is final
    task = make_task(sched, "alice", 1)
    [row] = claim(conn, at(0))
    assert complete(conn, at(1), [row["subtask_id"]], outcome, code=code)[0][1] is True
    assert state(conn, task) == DONE
    assert nothing_left_drained(conn)


def test_lease_expiring_on_the_last_attempt(sched: Scheduler,
                                            conn: psycopg.Connection[Any]) -> None:
    set_max_attempts(conn, 1)
    task = make_task(sched, "alice", 1)
    claim(conn, at(0), lease=30)
    assert conn.execute("SELECT edm.expire_leases(%s)", (at(60),)).fetchone() == (1,)
    assert state(conn, task) == DONE
    assert nothing_left_drained(conn)


def test_cancelling_the_last_pending_address(sched: Scheduler,
                                             conn: psycopg.Connection[Any]) -> None:
    task = make_task(sched, "alice", 2)
    [row] = claim(conn, at(0), batch=1)
    complete(conn, at(1), [row["subtask_id"]])
    other = conn.execute("SELECT email FROM edm.subtasks WHERE task_id = %s AND status = 'pending'",
                         (task,)).fetchone()
    assert other is not None
    assert conn.execute("SELECT edm.cancel_pending_to(%s, 'alice', 'unsubscribed', %s)",
                        (other[0], at(2))).fetchone() == (1,)
    assert state(conn, task) == DONE
    assert nothing_left_drained(conn)


def test_resuming_a_task_that_drained_while_paused(sched: Scheduler,
                                                   conn: psycopg.Connection[Any]) -> None:
    task = make_task(sched, "alice", 1)
    [row] = claim(conn, at(0))
    sched.pause_task(task)
    complete(conn, at(1), [row["subtask_id"]])  # a leased subtask completes normally
    assert state(conn, task)[0] == "paused"
    assert conn.execute("SELECT edm.resume_task(%s, NULL, %s)", (task, at(2))).fetchone() == (
        "completed",)
    assert state(conn, task) == DONE
    assert nothing_left_drained(conn)


def test_a_list_with_every_address_suppressed(sched: Scheduler,
                                              conn: psycopg.Connection[Any]) -> None:
    sched.suppress("gone@rcpt.example", user_id="alice")
    created = sched.create_task({"user_id": "alice", "name": "t", "templates": [TEMPLATE],
                                 "recipients": [{"email": "gone@rcpt.example"}]})
    assert created.recipients == 0
    assert state(conn, created.task_id) == DONE
    assert nothing_left_drained(conn)


def test_a_tag_rule_matching_nobody(sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    created = sched.create_task({"user_id": "alice", "name": "t", "templates": [TEMPLATE],
                                 "rule": {"include_any": ["nobody-has-this"]}})
    assert state(conn, created.task_id) == DONE
    assert nothing_left_drained(conn)


def test_a_scheduled_task_drained_before_it_starts(sched: Scheduler,
                                                   conn: psycopg.Connection[Any]) -> None:
    task = make_task(sched, "alice", 1, scheduled_at=at(100))
    email = conn.execute("SELECT email FROM edm.subtasks WHERE task_id = %s", (task,)).fetchone()
    assert email is not None
    conn.execute("SELECT edm.cancel_pending_to(%s, 'alice', 'suppressed', %s)", (email[0], at(1)))
    assert state(conn, task)[0] == "scheduled"
    assert claim(conn, at(200)) == []  # the claim starts due tasks: this one is done at once
    assert state(conn, task) == DONE
    assert nothing_left_drained(conn)


def test_the_sweep_completes_what_an_older_version_left_sending(
        sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    task = make_task(sched, "alice", 1)
    claim(conn, at(0), lease=30)
    conn.execute("ALTER TABLE edm.tasks DISABLE TRIGGER tasks_when_drained")
    try:  # as a database upgraded with a drained task still sending
        set_max_attempts(conn, 1)
        conn.execute("SELECT edm.expire_leases(%s)", (at(60),))
        assert state(conn, task)[0] == "sending"
    finally:
        conn.execute("ALTER TABLE edm.tasks ENABLE TRIGGER tasks_when_drained")
    assert conn.execute("SELECT edm.finish_tasks(%s)", (at(90),)).fetchone() == (1,)
    assert state(conn, task) == DONE
    assert conn.execute("SELECT finished_at FROM edm.tasks WHERE task_id = %s",
                        (task,)).fetchone() == (at(90),)
    assert conn.execute("SELECT edm.finish_tasks(%s)", (at(91),)).fetchone() == (0,)


# SET ... status = 'completed', SET ... status = CASE ... 'completed', status := 'completed'
_WRITES_COMPLETED = re.compile(
    r"\bSET\b[^;]*?\bstatus\s*=\s*(?:CASE\b[^;]*?)?'completed'|\bstatus\s*:=\s*'completed'",
    re.IGNORECASE | re.DOTALL)

# The rule's place: no function writes it but the trigger.
ALLOWED = {"tasks_complete_drained"}


def test_no_other_function_writes_the_rule(conn: psycopg.Connection[Any]) -> None:
    writers = {name for name, src in conn.execute(
        "SELECT p.proname::text, p.prosrc FROM pg_proc p"
        " WHERE p.pronamespace = 'edm'::regnamespace").fetchall()
        if _WRITES_COMPLETED.search(src)}
    assert "tasks_complete_drained" in writers  # the scan finds what it looks for
    assert writers <= ALLOWED, f"completion written outside its trigger: {writers - ALLOWED}"
