"""Sweeps, config, alerts, monitoring views, the status CLI and Prometheus."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from edm_sched import errors, monitoring
from edm_sched.api import Scheduler
from edm_sched.dispatcher import run_dispatcher
from edm_sched.sweeps import SWEEP_LOCK_KEY, SweepLockHeld, sweep
from edm_sched.transports.null import NullTransport
from tests.support.helpers import T0, at, claim, complete, make_service, make_task


@pytest.fixture
def sched(dsn: str) -> Iterator[Scheduler]:
    with Scheduler(dsn) as s:
        yield s


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edm_sched.cli", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def reason(conn: psycopg.Connection[Any], task: int, when: Any) -> tuple[str, Any]:
    row = conn.execute("SELECT reason, until FROM edm.task_wait_reason(%s, %s)",
                       (task, when)).fetchone()
    assert row is not None
    return row[0], row[1]


def test_config_refuses_out_of_range_and_wrong_type(dsn: str) -> None:
    with pytest.raises(errors.ConfigRejected, match=r"between 10 and 1000"):
        monitoring.config_set(dsn, "queue.central_batch_size", 5000)
    with pytest.raises(errors.ConfigRejected, match="an integer"):
        monitoring.config_set(dsn, "queue.central_batch_size", "lots")
    with pytest.raises(errors.NotFound):
        monitoring.config_set(dsn, "queue.no_such_key", 1)
    assert monitoring.config_set(dsn, "queue.central_batch_size", "120") == 120
    assert monitoring.config_get(dsn, "queue.central_batch_size").value == 120


def test_config_cli_exit_codes_and_notify(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN edm_config")
        ok = cli("config", "set", "monitoring.stuck_task_threshold", "900", "--dsn", dsn)
        assert ok.returncode == 0, ok.stderr
        notes = list(listener.notifies(timeout=2, stop_after=1))
    assert [n.payload for n in notes] == ["monitoring.stuck_task_threshold"]
    bad = cli("config", "set", "monitoring.stuck_task_threshold", "5", "--dsn", dsn)
    assert bad.returncode == 1
    assert "CONFIG_REJECTED" in bad.stderr and "between 300 and 1800" in bad.stderr
    got = cli("config", "get", "monitoring.stuck_task_threshold", "--dsn", dsn, "--json")
    assert json.loads(got.stdout.splitlines()[-1])["value"] == 900


def live_dispatcher(conn: psycopg.Connection[Any]) -> None:
    """A dispatcher heartbeat, so that wait reasons look past "no dispatcher running"."""
    conn.execute("INSERT INTO edm.dispatchers (dispatcher_id) VALUES ('d1')")


def test_wait_reasons_in_every_situation(sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    live_dispatcher(conn)
    sched.upsert_user("a")
    task = make_task(sched, "a", 3, scheduled_at=at(100))
    assert reason(conn, task, at(0)) == ("scheduled later", at(100))
    assert reason(conn, task, at(100))[0] == "no granted service"
    svc = make_service(sched, "svc", interval=60, quota=2, users=["a"])
    sched.disable_service(svc)
    assert reason(conn, task, at(100))[0] == "all granted services disabled"
    sched.enable_service(svc)
    assert reason(conn, task, at(100))[0].startswith("in rotation")
    claim(conn, at(100))
    assert reason(conn, task, at(101)) == (
        "all granted services throttled: first to free is svc, held by its interval limit",
        at(160))
    sched.pause_task(task)
    assert reason(conn, task, at(101))[0] == "paused"
    sched.resume_task(task)
    claim(conn, at(160))
    why, until = reason(conn, task, at(161))
    assert why == "service quotas exhausted" and until is not None and until > at(161)
    sched.update_service(svc, {"daily_quota": 100})
    ids = [r["subtask_id"] for r in claim(conn, at(220))]
    complete(conn, at(221), ids, "service", code=421)
    assert reason(conn, task, at(222))[0] == "granted services unhealthy (backing off)"
    sched.upsert_user("b", quota_limit=0)
    draft = conn.execute("INSERT INTO edm.tasks (user_id, name) VALUES ('b', 'd') "
                         "RETURNING task_id").fetchone()
    assert draft is not None
    assert reason(conn, draft[0], at(0))[0] == "user quota exhausted"


def test_retry_backoff_reason(sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    live_dispatcher(conn)
    sched.upsert_user("a")
    make_service(sched, "svc", interval=0, users=["a"])
    task = make_task(sched, "a", 1)
    ids = [r["subtask_id"] for r in claim(conn, at(0))]
    complete(conn, at(1), ids, "transient", code=451)
    assert reason(conn, task, at(2)) == ("retries waiting for their back-off", at(61))


def test_sweeps_raise_alerts_once_and_resolve(sched: Scheduler,
                                              conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a")
    task = make_task(sched, "a", 5)  # no grant: it will wait
    report = conn.execute("SELECT edm.run_sweeps(%s)", (at(301),)).fetchone()
    assert report is not None and report[0]["alerts_raised"] == 1
    conn.execute("SELECT edm.run_sweeps(%s)", (at(302),))  # same alert stays open, once
    conn.execute("SELECT edm.run_sweeps(%s)", (at(1801),))  # emergency now
    severities = [r[0] for r in conn.execute(
        "SELECT severity FROM edm.alerts WHERE task_id = %s ORDER BY alert_id", (task,))]
    assert severities == ["warning", "emergency"]
    handed = conn.execute("SELECT count(*) FROM edm.take_alerts()").fetchone()
    assert handed == (2,)
    assert conn.execute("SELECT count(*) FROM edm.take_alerts()").fetchone() == (0,)
    make_service(sched, "svc", interval=0, quota=5, users=["a"])
    for i in range(5):
        claim(conn, at(1802 + i))
    conn.execute("SELECT edm.run_sweeps(%s)", (at(1812),))
    open_kinds = {r[0] for r in conn.execute(
        "SELECT kind FROM edm.alerts WHERE resolved_at IS NULL")}
    assert open_kinds == {"quota"}  # the wait alerts resolved once a send was claimed


def test_stuck_task_flagged(sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a")
    make_service(sched, "svc", interval=10_000, users=["a"])
    task = make_task(sched, "a", 3)
    claim(conn, at(0))
    conn.execute("SELECT edm.run_sweeps(%s)", (at(599),))
    assert sched.get_task(task).status == "sending"
    conn.execute("SELECT edm.run_sweeps(%s)", (at(601),))
    stuck = conn.execute("SELECT stuck_since FROM edm.tasks WHERE task_id = %s",
                         (task,)).fetchone()
    assert stuck == (at(601),)
    assert conn.execute("SELECT count(*) FROM edm.alerts WHERE kind = 'stuck'").fetchone() == (1,)


def test_quota_day_rollover_partitions_and_retention(sched: Scheduler,
                                                     conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a")
    svc = make_service(sched, "svc", interval=0, quota=1, users=["a"], tz="America/New_York")
    make_task(sched, "a", 3)
    ids = [r["subtask_id"] for r in claim(conn, at(0))]
    complete(conn, at(1), ids)
    assert conn.execute("SELECT edm.roll_quota_days(%s)", (at(3600),)).fetchone() == (0,)
    # T0 is 07:00 in New York; the next quota day starts 17 hours later
    assert conn.execute("SELECT edm.roll_quota_days(%s)", (at(17 * 3600),)).fetchone() == (1,)
    assert conn.execute("SELECT sent_today FROM edm.services WHERE service_id = %s",
                        (svc,)).fetchone() == (0,)
    made = conn.execute("SELECT edm.ensure_partitions(%s)", (T0,)).fetchone()
    assert made == (3,)
    assert conn.execute("SELECT edm.ensure_partitions(%s)", (T0,)).fetchone() == (0,)
    parts = conn.execute("SELECT count(*) FROM pg_inherits WHERE inhparent = "
                         "'edm.send_events'::regclass").fetchone()
    assert parts == (4,)  # default + 3 days
    removed = conn.execute("SELECT edm.apply_retention(%s)", (at(40 * 86400),)).fetchone()
    assert removed is not None and removed[0] == 4  # 3 partitions + 1 default row
    assert conn.execute("SELECT count(*) FROM edm.send_events").fetchone() == (0,)


def test_metrics_rollup_is_incremental(sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("a")
    make_service(sched, "svc", interval=0, users=["a"])
    make_task(sched, "a", 4)
    for i in range(2):
        ids = [r["subtask_id"] for r in claim(conn, at(i))]
        complete(conn, at(i), ids)
    conn.execute("SELECT edm.roll_up_metrics(%s)", (at(60),))
    ids = [r["subtask_id"] for r in claim(conn, at(61))]
    complete(conn, at(61), ids)
    conn.execute("SELECT edm.roll_up_metrics(%s)", (at(120),))
    conn.execute("SELECT edm.roll_up_metrics(%s)", (at(121),))
    assert conn.execute("SELECT sum(sent) FROM edm.metrics_hourly").fetchone() == (3,)


def test_manual_sweep_refused_while_a_leader_sweeps(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as leader:
        leader.execute("SELECT pg_advisory_lock(%s)", (SWEEP_LOCK_KEY,))
        with pytest.raises(SweepLockHeld):
            sweep(dsn)
        res = cli("sweep", "--dsn", dsn)
        assert res.returncode == 1 and "LOCK_HELD" in res.stderr
    report = sweep(dsn)
    assert "leases_expired" in report


def test_status_cli_json(sched: Scheduler, dsn: str) -> None:
    sched.upsert_user("a")
    make_service(sched, "svc", users=["a"])
    make_task(sched, "a", 2)
    res = cli("status", "--dsn", dsn, "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout.splitlines()[-1])
    assert data["health"]["services_total"] == 1
    assert data["tasks"][0]["total"] == 2
    assert cli("top", "--dsn", dsn, "--iterations", "1").returncode == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_prometheus_metrics_endpoint(sched: Scheduler, dsn: str) -> None:
    sched.upsert_user("a")
    make_service(sched, "svc", interval=0, users=["a"])
    task = make_task(sched, "a", 5)
    port = _free_port()
    stop = threading.Event()
    th = threading.Thread(target=run_dispatcher, args=(dsn, NullTransport()),
                          kwargs={"stop_event": stop, "handle_signals": False,
                                  "metrics_port": port})
    th.start()
    try:
        deadline = time.monotonic() + 20
        while sched.get_task(task).status != "completed" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sched.get_task(task).status == "completed"
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    finally:
        stop.set()
        th.join(30)
    text = body.decode()
    assert 'edm_sends_total{outcome="sent"} 5.0' in text
    assert "edm_claim_latency_seconds_bucket" in text
    assert "edm_queue_depth" in text


def test_new_tasks_wake_idle_dispatchers(sched: Scheduler, dsn: str) -> None:
    sched.upsert_user("a")
    make_service(sched, "svc", users=["a"])
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN edm_wakeup")
        task = make_task(sched, "a", 2, scheduled_at=at(10**7))  # far in the future
        notes = [n.payload for n in listener.notifies(timeout=2, stop_after=1)]
    assert notes == [f"task:{task}"]
