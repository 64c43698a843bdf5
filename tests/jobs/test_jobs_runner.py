"""The job runner against a real database: misfires after an outage (controlled clock), DST,
retries, timeouts that kill, the kinds, max_concurrent, lost runs, NOTIFY wake-ups."""

from __future__ import annotations

import datetime as dt
import http.server
import itertools
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from edm_sched.jobs import JobContext, JobRunner, JobScheduler, PermanentJobError

T0 = dt.datetime(2026, 1, 5, 10, 1, tzinfo=dt.UTC)


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=dt.UTC)


class Clock:
    def __init__(self, t: dt.datetime = T0) -> None:
        self.t = t

    def __call__(self) -> dt.datetime:
        return self.t

    def advance(self, **delta: float) -> None:
        self.t += dt.timedelta(**delta)


class Recorder:
    """A registry function that records what it ran."""

    def __init__(self) -> None:
        self.calls: list[JobContext] = []

    def __call__(self, ctx: JobContext) -> dict[str, Any]:
        self.calls.append(ctx)
        return {"n": len(self.calls)}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sched(dsn: str, clock: Clock) -> JobScheduler:
    return JobScheduler(dsn, now=clock)


@pytest.fixture
def runner_factory(dsn: str, clock: Clock) -> Iterator[Any]:
    made: list[JobRunner] = []

    def make(registry: dict[str, Any], **kw: Any) -> JobRunner:
        r = JobRunner(dsn, registry, now=clock, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def fn_job(name: str = "j", cron: str = "*/10 * * * *", function: str = "rec",
           **extra: Any) -> dict[str, Any]:
    return {"name": name, "cron": cron, "target": {"kind": "function", "function": function},
            **extra}


def executions(conn: psycopg.Connection[Any], job_id: int) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT trigger, status, scheduled_for, error_code, retry_count FROM edm.job_executions"
        " WHERE job_id = %s ORDER BY execution_id", (job_id,)).fetchall()


def drain(runner: JobRunner, steps: int = 20) -> None:
    for _ in range(steps):
        report = runner.step()
        if not report.fired and not report.claimed:
            return


# -- misfire policies after an outage ----------------------------------------------


OUTAGE_END = utc(2026, 1, 5, 11, 5, 30)  # 10:10 ... 11:00 (6 occurrences) were missed
MISSED = [utc(2026, 1, 5, 10, m) for m in (10, 20, 30, 40, 50)] + [utc(2026, 1, 5, 11, 0)]


@pytest.mark.parametrize("policy", ["skip", "run_once", "run_all"])
def test_misfire_policy_after_an_outage(policy: str, sched: JobScheduler, clock: Clock,
                                        runner_factory: Any,
                                        conn: psycopg.Connection[Any]) -> None:
    rec = Recorder()
    job = sched.create_job(fn_job(misfire_policy=policy, misfire_grace_seconds=60))
    assert job.next_run_at == MISSED[0]
    clock.t = OUTAGE_END  # the runners were down for an hour
    drain(runner_factory({"rec": rec}))
    ran = [c.scheduled_for for c in rec.calls]
    rows = executions(conn, job.job_id)
    skipped = [r for r in rows if r[1] == "skipped"]
    if policy == "skip":
        assert ran == []
        assert [(r[2], r[3]) for r in skipped] == [(MISSED[0], "MISFIRE")]
    elif policy == "run_once":
        assert ran == [MISSED[-1]]
        assert [(r[2], r[3]) for r in skipped] == [(MISSED[0], "MISFIRE")]
    else:
        assert ran == MISSED  # each missed time, in order, one at a time (max_concurrent 1)
        assert skipped == []
    after = sched.get_job(job.job_id)
    assert after.next_run_at == utc(2026, 1, 5, 11, 10)
    assert after.misfire_count == {"skip": 6, "run_once": 5, "run_all": 0}[policy]
    # Back to normal: the next occurrence runs on time, once.
    clock.t = utc(2026, 1, 5, 11, 10, 0, 200000)
    drain(runner_factory({"rec": rec}))
    assert rec.calls[-1].scheduled_for == utc(2026, 1, 5, 11, 10)


def test_misfire_grace_period(sched: JobScheduler, clock: Clock, runner_factory: Any) -> None:
    rec = Recorder()
    sched.create_job(fn_job(misfire_policy="skip", misfire_grace_seconds=120))
    clock.t = utc(2026, 1, 5, 11, 1, 30)  # 11:00 is 90 s late: within grace, runs
    drain(runner_factory({"rec": rec}))
    assert [c.scheduled_for for c in rec.calls] == [utc(2026, 1, 5, 11, 0)]


def test_run_all_is_capped_by_config(sched: JobScheduler, clock: Clock, runner_factory: Any,
                                     conn: psycopg.Connection[Any]) -> None:
    conn.execute("UPDATE edm.config SET value = '2' WHERE key = 'jobs.max_catchup_runs'")
    rec = Recorder()
    job = sched.create_job(fn_job(misfire_policy="run_all"))
    clock.t = OUTAGE_END
    drain(runner_factory({"rec": rec}))
    assert [c.scheduled_for for c in rec.calls] == MISSED[-2:]
    assert sched.get_job(job.job_id).misfire_count == 4


# -- DST through the database --------------------------------------------------------


@pytest.mark.parametrize(("tz", "start", "expected"), [
    # 02:30 daily on spring-forward day runs at 03:00 local, then 02:30 again.
    ("Europe/Paris", utc(2024, 3, 30, 12), [utc(2024, 3, 31, 1, 0), utc(2024, 4, 1, 0, 30)]),
    ("America/New_York", utc(2024, 3, 9, 12), [utc(2024, 3, 10, 7, 0), utc(2024, 3, 11, 6, 30)]),
    # Fall-back day: once, at the first 02:30 (Paris), or the only one (New York).
    ("Europe/Paris", utc(2024, 10, 26, 12), [utc(2024, 10, 27, 0, 30), utc(2024, 10, 28, 1, 30)]),
    ("America/New_York", utc(2024, 11, 2, 12), [utc(2024, 11, 3, 7, 30),
                                                utc(2024, 11, 4, 7, 30)]),
])
def test_dst_days_fire_at_the_documented_instants(tz: str, start: dt.datetime,
                                                  expected: list[dt.datetime], dsn: str,
                                                  runner_factory: Any, clock: Clock) -> None:
    clock.t = start
    sched = JobScheduler(dsn, now=clock)
    rec = Recorder()
    job = sched.create_job(fn_job(cron="30 2 * * *", timezone=tz))
    runner = runner_factory({"rec": rec})
    for when in expected:
        assert sched.get_job(job.job_id).next_run_at == when
        clock.t = when + dt.timedelta(seconds=1)
        drain(runner)
    assert [c.scheduled_for for c in rec.calls] == expected


# -- retries --------------------------------------------------------------------------


def test_retry_policy_backoff_cap_and_kinds(sched: JobScheduler, clock: Clock,
                                            runner_factory: Any,
                                            conn: psycopg.Connection[Any]) -> None:
    attempts: list[int] = []

    def flaky(ctx: JobContext) -> None:
        attempts.append(ctx.retry_count)
        raise ValueError("boom")

    job = sched.create_job(fn_job(function="flaky", retry={
        "max_retries": 3, "delay_seconds": 10, "backoff": 2, "max_delay_seconds": 30,
        "retry_on": ["ValueError"]}))
    runner = runner_factory({"flaky": flaky})
    clock.t = utc(2026, 1, 5, 10, 10, 0, 100000)
    runner.step()
    waits = []
    for _ in range(3):
        row = conn.execute("SELECT run_after FROM edm.job_executions WHERE status = 'pending'"
                           " AND job_id = %s", (job.job_id,)).fetchone()
        assert row is not None
        waits.append((row[0] - clock.t).total_seconds())
        runner.step()  # not yet due: nothing runs
        clock.t = row[0]
        runner.step()
    assert waits == [10, 20, 30]  # 10 * 2^n, capped at 30
    assert attempts == [0, 1, 2, 3]
    rows = executions(conn, job.job_id)
    assert [(r[0], r[1], r[4]) for r in rows] == [
        ("scheduled", "failed", 0), ("retry", "failed", 1), ("retry", "failed", 2),
        ("retry", "failed", 3)]
    ex = sched.list_executions(job_id=job.job_id, limit=1)[0]
    assert ex.error_type == "ValueError" and "boom" in (ex.error_stack or "")


def test_errors_outside_retry_on_and_permanent_errors_are_not_retried(
        sched: JobScheduler, clock: Clock, runner_factory: Any,
        conn: psycopg.Connection[Any]) -> None:
    def key_error(ctx: JobContext) -> None:
        raise KeyError("x")

    def permanent(ctx: JobContext) -> None:
        raise PermanentJobError("give up")

    a = sched.create_job(fn_job("a", function="key_error",
                                retry={"max_retries": 3, "retry_on": ["ValueError"]}))
    b = sched.create_job(fn_job("b", function="permanent", retry={"max_retries": 3}))
    c = sched.create_job(fn_job("c", function="missing", retry={"max_retries": 3}))
    clock.t = utc(2026, 1, 5, 10, 10, 1)
    drain(runner_factory({"key_error": key_error, "permanent": permanent}))
    for job, kind in ((a, "exception"), (b, "permanent"), (c, "config")):
        rows = conn.execute("SELECT status, error_kind FROM edm.job_executions WHERE job_id = %s",
                            (job.job_id,)).fetchall()
        assert rows == [("failed", kind)]


# -- timeouts -------------------------------------------------------------------------


@pytest.mark.slow
def test_timed_out_shell_command_is_killed_and_retried(
        sched: JobScheduler, clock: Clock, runner_factory: Any, conn: psycopg.Connection[Any],
        tmp_path: Path) -> None:
    conn.execute("UPDATE edm.config SET value = 'true' WHERE key = 'jobs.shell_enabled'")
    pids = tmp_path / "pids"
    job = sched.create_job({
        "name": "slow", "cron": "0 * * * *", "timeout_seconds": 1,
        "target": {"kind": "shell", "use_shell": True,
                   "command": f"echo $$ >> {pids}; exec sleep 30"},
        "retry": {"max_retries": 1, "delay_seconds": 5, "retry_on": ["timeout"]},
    })
    runner = runner_factory({}, allow_shell=True, kill_grace=0.5)
    clock.t = utc(2026, 1, 5, 11, 0, 0, 500000)
    started = time.monotonic()
    report = runner.step(timeout=20)
    assert time.monotonic() - started < 8  # killed at 1 s, not after sleep 30
    assert list(report.finished.values()) == ["timed_out"]
    clock.advance(seconds=5)
    assert list(runner.step(timeout=20).finished.values()) == ["timed_out"]
    clock.advance(seconds=60)
    assert runner.step().claimed == []  # one retry only
    rows = executions(conn, job.job_id)
    assert [(r[0], r[1], r[4]) for r in rows] == [("scheduled", "timed_out", 0),
                                                  ("retry", "timed_out", 1)]
    killed = [int(p) for p in pids.read_text().split()]
    assert len(killed) == 2
    for pid in killed:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    ex = sched.list_executions(job_id=job.job_id, limit=1)[0]
    assert ex.error_kind == "timeout" and ex.duration_ms is not None


@pytest.mark.slow
def test_timed_out_function_is_told_to_stop_and_retried(
        sched: JobScheduler, clock: Clock, runner_factory: Any,
        conn: psycopg.Connection[Any]) -> None:
    stopped: list[bool] = []

    def stubborn(ctx: JobContext) -> str:
        while not ctx.cancelled:
            time.sleep(0.02)
        stopped.append(True)
        return "late result, ignored"

    job = sched.create_job(fn_job(function="stubborn", timeout_seconds=1,
                                  retry={"max_retries": 1, "delay_seconds": 0}))
    runner = runner_factory({"stubborn": stubborn})
    clock.t = utc(2026, 1, 5, 10, 10, 1)
    assert list(runner.step().finished.values()) == ["timed_out"]
    assert list(runner.step().finished.values()) == ["timed_out"]
    time.sleep(0.2)
    assert stopped == [True, True]
    rows = executions(conn, job.job_id)
    assert [(r[0], r[1]) for r in rows] == [("scheduled", "timed_out"), ("retry", "timed_out")]


# -- kinds ----------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    hits: list[tuple[str, str, bytes]] = []  # noqa: RUF012

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).hits.append((self.path, self.headers.get("X-Token", ""), body))
        status = {"/ok": 200, "/busy": 503, "/gone": 404}.get(self.path, 500)
        self.send_response(status)
        self.end_headers()
        self.wfile.write(b'{"done": true}')

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def http_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    _Handler.hits = []
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_jobs(sched: JobScheduler, clock: Clock, runner_factory: Any, http_url: str,
                   conn: psycopg.Connection[Any]) -> None:
    # The outbound guard refuses loopback unless the host opens it.
    conn.execute("SELECT edm.config_set('jobs.http_allow', to_jsonb(%s::text))",
                 ['{"all": ["127.0.0.1/32"]}'])
    def http_job(name: str, path: str) -> int:
        return sched.create_job({
            "name": name, "cron": "*/10 * * * *",
            "target": {"kind": "http", "url": http_url + path, "method": "POST",
                       "headers": {"X-Token": "t"}, "body": {"job": name}},
            "retry": {"max_retries": 1, "delay_seconds": 0},
        }).job_id

    ok, busy, gone = http_job("ok", "/ok"), http_job("busy", "/busy"), http_job("gone", "/gone")
    clock.t = utc(2026, 1, 5, 10, 10, 1)
    drain(runner_factory({}))
    assert [(r[0], r[1]) for r in executions(conn, ok)] == [("scheduled", "succeeded")]
    assert [(r[0], r[1]) for r in executions(conn, busy)] == [("scheduled", "failed"),
                                                              ("retry", "failed")]
    assert [(r[0], r[1]) for r in executions(conn, gone)] == [("scheduled", "failed")]
    result = sched.list_executions(job_id=ok)[0].result
    assert result["status"] == 200 and json.loads(result["body"]) == {"done": True}
    kinds = {e.error_kind for e in sched.list_executions(job_id=busy)}
    assert kinds == {"http_status"}
    assert sched.list_executions(job_id=gone)[0].error_kind == "unexpected_status"
    assert ("/ok", "t", b'{"job": "ok"}') in _Handler.hits


def test_launch_campaign_calls_the_host_launcher(sched: JobScheduler, clock: Clock,
                                                 runner_factory: Any) -> None:
    launched: list[dict[str, Any]] = []

    def launcher(definition: dict[str, Any], ctx: JobContext) -> dict[str, int]:
        launched.append(definition)
        return {"task_id": 42}

    definition = {"name": "weekly digest", "templates": [{"subject": "Hi", "body_text": "x"}]}
    job = sched.create_job({"name": "digest", "cron": "*/10 * * * *", "user_id": "acme",
                            "target": {"kind": "launch_campaign", "definition": definition}})
    clock.t = utc(2026, 1, 5, 10, 10, 1)
    drain(runner_factory({"edm.launch_campaign": launcher}))
    assert launched == [{**definition, "user_id": "acme"}]  # forced to the job's tenant
    ex = sched.list_executions(job_id=job.job_id)[0]
    assert (ex.status, ex.result) == ("succeeded", {"task_id": 42})


def test_function_sees_args_and_reports_progress(sched: JobScheduler, clock: Clock,
                                                 runner_factory: Any) -> None:
    seen: list[Any] = []

    def work(ctx: JobContext) -> int:
        seen.append(ctx.args)
        assert ctx.progress(50, "half way")
        return 7

    job = sched.create_job({"name": "w", "cron": "*/10 * * * *",
                            "target": {"kind": "function", "function": "work",
                                       "args": {"batch": 3}}})
    clock.t = utc(2026, 1, 5, 10, 10, 1)
    drain(runner_factory({"work": work}))
    ex = sched.list_executions(job_id=job.job_id)[0]
    assert seen == [{"batch": 3}]
    assert (ex.status, ex.result, ex.progress, ex.progress_message) == (
        "succeeded", 7, 100, "half way")


# -- concurrency and recovery ----------------------------------------------------------


def test_max_concurrent_skips_an_overlapping_occurrence(sched: JobScheduler, clock: Clock,
                                                        runner_factory: Any,
                                                        conn: psycopg.Connection[Any]) -> None:
    job = sched.create_job(fn_job(max_concurrent=1, timeout_seconds=3600))
    manual = sched.trigger_job(job.job_id)
    conn.execute("SELECT * FROM edm.job_claim('other-runner', 1, %s)", (T0,))  # still running
    clock.t = utc(2026, 1, 5, 10, 10, 1)
    runner_factory({"rec": Recorder()}).step()
    rows = executions(conn, job.job_id)
    assert rows[1][:4] == ("scheduled", "skipped", utc(2026, 1, 5, 10, 10), "JOB_ALREADY_RUNNING")
    assert sched.get_execution(manual.execution_id).status == "running"


def test_claims_never_exceed_max_concurrent(sched: JobScheduler, clock: Clock,
                                            conn: psycopg.Connection[Any], dsn: str) -> None:
    job = sched.create_job(fn_job(max_concurrent=2, misfire_policy="run_all"))
    clock.t = OUTAGE_END
    with psycopg.connect(dsn, autocommit=True) as c:
        JobRunner(dsn, {}, now=clock)._fire(clock.t)  # queue 6 catch-up runs, claim none
        claimed = []
        for worker in ("w1", "w2", "w3"):
            claimed += c.execute("SELECT execution_id FROM edm.job_claim(%s, 10, %s)",
                                 (worker, clock.t)).fetchall()
    assert len(claimed) == 2
    assert sched.get_job(job.job_id).running_count == 2


def test_lost_run_is_recovered_and_retried(sched: JobScheduler, clock: Clock,
                                           runner_factory: Any,
                                           conn: psycopg.Connection[Any]) -> None:
    rec = Recorder()
    job = sched.create_job(fn_job(timeout_seconds=60, retry={"max_retries": 1,
                                                             "delay_seconds": 0}))
    sched.trigger_job(job.job_id)
    conn.execute("SELECT * FROM edm.job_claim('crashed-runner', 1, %s)", (T0,))
    clock.t = T0 + dt.timedelta(seconds=60 + 29)
    assert runner_factory({"rec": rec}).step().recovered == 0  # lease = timeout + 30 s margin
    clock.t = T0 + dt.timedelta(seconds=60 + 31)
    report = runner_factory({"rec": rec}).step()
    assert report.recovered == 1 and len(rec.calls) == 1 and rec.calls[0].trigger == "retry"
    rows = executions(conn, job.job_id)
    assert [(r[0], r[1]) for r in rows] == [("manual", "timed_out"), ("retry", "succeeded")]
    assert sched.get_job(job.job_id).running_count == 0


def test_paused_job_does_not_fire_and_holds_retries(sched: JobScheduler, clock: Clock,
                                                    runner_factory: Any) -> None:
    rec = Recorder()
    job = sched.create_job(fn_job())
    sched.pause_job(job.job_id)
    clock.t = OUTAGE_END
    drain(runner_factory({"rec": rec}))
    assert rec.calls == []
    sched.resume_job(job.job_id)
    clock.t = utc(2026, 1, 5, 11, 10, 1)
    drain(runner_factory({"rec": rec}))
    assert [c.scheduled_for for c in rec.calls] == [utc(2026, 1, 5, 11, 10)]


def test_end_at_and_max_executions_deactivate(sched: JobScheduler, clock: Clock,
                                              runner_factory: Any) -> None:
    rec = Recorder()
    capped = sched.create_job(fn_job("capped", cron="* * * * *", max_executions=2))
    ending = sched.create_job(fn_job("ending", cron="* * * * *",
                                     end_at=utc(2026, 1, 5, 10, 2, 30)))
    runner = runner_factory({"rec": rec})
    for minute in (2, 3, 4):
        clock.t = utc(2026, 1, 5, 10, minute, 0, 500000)
        drain(runner)
    for job, reason, runs in ((capped, "max_executions reached", 2), (ending, "end_at reached", 1)):
        after = sched.get_job(job.job_id)
        assert (after.status, after.inactive_reason, after.run_count) == ("inactive", reason, runs)


def test_schedule_edited_outside_the_api_deactivates_the_job(
        sched: JobScheduler, clock: Clock, runner_factory: Any,
        conn: psycopg.Connection[Any]) -> None:
    job = sched.create_job(fn_job())
    conn.execute("UPDATE edm.jobs SET cron_expr = '99 * * * *' WHERE job_id = %s", (job.job_id,))
    clock.t = utc(2026, 1, 5, 10, 10, 1)
    runner_factory({}).step()
    after = sched.get_job(job.job_id)
    assert after.status == "inactive" and "invalid schedule" in (after.inactive_reason or "")


# -- the loop: real time, NOTIFY, no polling --------------------------------------------


@pytest.mark.slow
def test_runner_sleeps_until_due_wakes_on_notify_and_fires_seconds_schedules(dsn: str) -> None:
    rec = Recorder()
    runner = JobRunner(dsn, {"rec": rec}, max_sleep=300.0)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        time.sleep(0.5)  # the runner is asleep: no jobs, nothing due
        passes = runner.stats.wakeups
        time.sleep(1.5)
        assert runner.stats.wakeups == passes, "an idle runner woke up without a reason"
        sched = JobScheduler(dsn)
        job = sched.create_job(fn_job(cron="* * * * * *"))  # every second; NOTIFY wakes it
        deadline = time.monotonic() + 15
        while len(rec.calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        runner.stop()
        thread.join(15)
        runner.close()
    assert not thread.is_alive()
    assert runner.stats.notifications >= 1
    times = [c.scheduled_for for c in rec.calls if c.scheduled_for is not None]
    assert len(times) >= 3
    assert all(b - a == dt.timedelta(seconds=1) for a, b in itertools.pairwise(times))
    delays = sorted((e.started_at - e.scheduled_for).total_seconds()
                    for e in sched.list_executions(job_id=job.job_id)
                    if e.started_at is not None and e.scheduled_for is not None)
    assert delays[len(delays) // 2] < 0.5, f"firing delays {delays}"


def test_cancel_kills_a_running_shell_command(dsn: str, conn: psycopg.Connection[Any],
                                              tmp_path: Path) -> None:
    conn.execute("UPDATE edm.config SET value = 'true' WHERE key = 'jobs.shell_enabled'")
    sched = JobScheduler(dsn)
    pidfile = tmp_path / "pid"
    job = sched.create_job({"name": "long", "cron": "0 0 1 1 *", "timeout_seconds": 600,
                            "target": {"kind": "shell", "use_shell": True,
                                       "command": f"echo $$ > {pidfile}; exec sleep 60"}})
    runner = JobRunner(dsn, {}, allow_shell=True)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        ex = sched.trigger_job(job.job_id)
        deadline = time.monotonic() + 10
        while not (pidfile.exists() and pidfile.read_text().strip()) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = int(pidfile.read_text())
        assert sched.get_execution(ex.execution_id).status == "running"
        cancelled = sched.cancel_execution(ex.execution_id)
        assert cancelled.status == "cancelled"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the cancelled command is still running")
    finally:
        runner.stop()
        thread.join(15)
        runner.close()
    assert not thread.is_alive()
    assert sched.get_job(job.job_id).running_count == 0
