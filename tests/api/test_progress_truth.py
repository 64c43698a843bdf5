"""Task progress tells the truth (issue 16): a task whose recipients failed is never
shown as 100 % sent, and a cancelled task reports its cancelled recipients."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

from edm_sched.api import Scheduler
from tests.support.helpers import at, claim, complete, counters_match, make_service, make_task


def progress(conn: psycopg.Connection[Any], task_id: int) -> dict[str, Any]:
    row = conn.cursor(row_factory=dict_row).execute(
        "SELECT status, total, sent, failed, cancelled, progress_pct, sent_pct, outcome"
        " FROM edm.task_progress WHERE task_id = %s", (task_id,)).fetchone()
    assert row is not None
    return row


def drain(conn: psycopg.Connection[Any], second: float, outcome: str = "sent",
          code: int | None = None, limit: int | None = None, batch: int = 1) -> int:
    """Claim and complete, ``batch`` subtasks at a time, until nothing is left (or ``limit``)."""
    n = 0
    while (limit is None or n < limit) and (rows := claim(conn, at(second), batch=batch)):
        complete(conn, at(second), [r["subtask_id"] for r in rows], outcome, code=code)
        n += len(rows)
    return n


def test_failed_recipients_are_never_100_percent_sent(dsn: str,
                                                      conn: psycopg.Connection[Any]) -> None:
    with Scheduler(dsn) as s:
        s.upsert_user("u")
        make_service(s, "svc", interval=0, users=["u"])
        all_failed = make_task(s, "u", 3, name="a")
        drain(conn, 1, "permanent", 554)
        p = progress(conn, all_failed)
        assert (p["status"], p["progress_pct"], p["sent_pct"]) == ("completed", 100, 0)
        assert p["outcome"] == "none sent: 3 failed, 0 cancelled"

        # A claim takes one recipient per ready service: with ten services the other
        # 999 go ten at a time (one at a time took seconds).
        for i in range(2, 11):
            make_service(s, f"svc{i}", interval=0, users=["u"])
        mostly = make_task(s, "u", 1000, name="b")
        drain(conn, 3, "permanent", 550, limit=1)
        drain(conn, 5, batch=10)
        p = progress(conn, mostly)
        assert p["status"] == "completed" and p["sent"] == 999
        assert float(p["sent_pct"]) == 99.9  # rounded down: never 100 while one failed
        assert p["outcome"] == "partly sent: 999 sent, 1 failed, 0 cancelled"

        clean = make_task(s, "u", 2, name="c")
        drain(conn, 7)
        assert progress(conn, clean)["outcome"] == "all sent"
        assert progress(conn, clean)["sent_pct"] == 100


def test_a_cancelled_task_reports_its_cancelled_recipients(dsn: str,
                                                           conn: psycopg.Connection[Any]) -> None:
    with Scheduler(dsn) as s:
        s.upsert_user("u")
        make_service(s, "svc", interval=0, users=["u"])
        task = make_task(s, "u", 5)
        drain(conn, 1, limit=1)
        (second,) = [r["subtask_id"] for r in claim(conn, at(2), batch=1)]
        assert s.cancel_task(task) == 3
        complete(conn, at(3), [second], "transient", code=451)  # a retry after cancel
        p = progress(conn, task)
        assert (p["status"], p["sent"], p["cancelled"]) == ("cancelled", 1, 4)
        assert p["sent_pct"] == 20
        assert p["outcome"] == "cancelled: 1 sent, 0 failed, 4 cancelled"
        st = s.get_task(task)
        assert (st.sent_count, st.cancelled_count) == (1, 4)
        assert counters_match(conn) == []
