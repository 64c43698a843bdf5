"""Scheduler and AsyncScheduler: the same operations, sync and async, every method run both ways.

Both facades run the operations of ``edm_sched.ops`` (one implementation of
argument checking, SQL and result mapping); these tests call every public
method of ``Scheduler``, ``scheduler.jobs`` and ``scheduler.monitoring``
through each facade and check the results agree with the database.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from edm_sched import AsyncScheduler, Scheduler, errors
from edm_sched.api import AsyncMonitoring, Monitoring
from edm_sched.jobs.api import AsyncJobs, Jobs
from edm_sched.jobs.errors import JobNotFound
from tests.support.helpers import TEMPLATE

FACADES = [(Scheduler, AsyncScheduler), (Jobs, AsyncJobs), (Monitoring, AsyncMonitoring)]
CALLED: dict[str, set[str]] = {"sync": set(), "async": set()}


def public_methods(cls: type) -> dict[str, Any]:
    return {n: f for n, f in inspect.getmembers(cls, inspect.isfunction)
            if not n.startswith("_")}


@pytest.mark.parametrize(("sync_cls", "async_cls"), FACADES)
def test_async_facade_mirrors_the_sync_one(sync_cls: type, async_cls: type) -> None:
    """Same method names, same parameters (conn= takes the async connection type)."""
    sync_methods, async_methods = public_methods(sync_cls), public_methods(async_cls)
    sync_methods.pop("close", None)
    async_methods.pop("close", None)
    async_methods.pop("open", None)
    assert set(sync_methods) == set(async_methods)
    for name, fn in sync_methods.items():
        afn = async_methods[name]
        if name == "validate_cron":
            continue  # no I/O: the same static function on both
        assert inspect.iscoroutinefunction(afn), name
        sp, ap = inspect.signature(fn).parameters, inspect.signature(afn).parameters
        assert list(sp) == list(ap), name
        assert "conn" in sp, f"{sync_cls.__name__}.{name} has no conn="
        for p in sp:
            assert sp[p].default == ap[p].default and sp[p].kind == ap[p].kind, (name, p)


class Both:
    """Calls a facade's methods the same way whether they are sync or async."""

    def __init__(self, target: Any, loop: asyncio.AbstractEventLoop | None, mode: str,
                 prefix: str = "") -> None:
        self._target, self._loop, self._mode, self._prefix = target, loop, mode, prefix

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if name in ("jobs", "monitoring"):
            return Both(attr, self._loop, self._mode, f"{name}.")
        CALLED[self._mode].add(self._prefix + name)

        def call(*args: Any, **kwargs: Any) -> Any:
            result = attr(*args, **kwargs)
            if self._loop is not None and inspect.isawaitable(result):
                return self._loop.run_until_complete(result)
            return result
        return call


RAN: set[tuple[str, str]] = set()
COVERING = {"test_users_services_contacts", "test_tasks", "test_jobs_and_monitoring",
            "test_sites_and_warmup", "test_traffic_shaping", "test_reply_rules_and_suspensions"}


@pytest.fixture(params=["sync", "async"])
def api(request: pytest.FixtureRequest, dsn: str) -> Iterator[Both]:
    RAN.add((request.node.originalname, request.param))
    if request.param == "sync":
        with Scheduler(dsn) as s:
            yield Both(s, None, "sync")
        return
    loop = asyncio.new_event_loop()
    a = AsyncScheduler(dsn)
    loop.run_until_complete(a.open())
    try:
        yield Both(a, loop, "async")
    finally:
        loop.run_until_complete(a.close())
        loop.close()


def test_users_services_contacts(api: Both, conn: psycopg.Connection[Any]) -> None:
    api.upsert_user("u1", display_name="One")
    api.set_user_quota("u1", 500)
    info = api.get_user("u1")
    assert (info.display_name, info.quota_limit) == ("One", 500)
    sid = api.create_service({"name": "s1", "from_addresses": ["s1@x.example"],
                              "interval_seconds": 1, "daily_quota": 10, "transport": "null"})
    api.update_service(sid, {"daily_quota": 20})
    api.disable_service(sid)
    assert api.get_service(sid).enabled is False
    api.enable_service(sid)
    svc = api.get_service(sid)
    assert (svc.enabled, svc.daily_quota) == (True, 20)
    assert api.set_service_limits(sid, [{"name": "per_minute", "kind": "rate", "max_count": 30,
                                          "window_seconds": 60}]) == 1
    limits = {lim.limit_name: lim for lim in api.service_limits(sid)}
    assert set(limits) == {"interval", "daily_quota", "per_minute"}
    assert (limits["per_minute"].window_ms, limits["per_minute"].headroom) == (60_000, 30)
    with pytest.raises(errors.InvalidInput):
        api.set_service_limits(sid, [{"name": "x", "kind": "rolling", "max_count": 1}])
    assert len(api.service_limits(sid)) == 3  # nothing changed by the refused call
    api.grant(sid, "u1", priority=3)
    assert conn.execute("SELECT priority FROM edm.grants WHERE service_id = %s",
                        (sid,)).fetchone() == (3,)
    assert api.revoke(sid, "u1") is True
    assert api.revoke(sid, "u1") is False
    imported = api.upsert_contacts("u1", ({"email": f"c{i}@r.example", "tags": ["vip"]}
                                          for i in range(5)))
    assert (imported.inserted, imported.updated) == (5, 0)
    assert api.upsert_contacts("u1", [{"email": "c0@r.example"}]).updated == 1
    assert api.tag_contacts("u1", ["c1@r.example", "c2@r.example"], add=["new"]) == 2
    assert api.delete_tag("u1", "new") == 2
    api.suppress("c4@r.example", reason="complaint", user_id="u1")
    assert api.unsuppress("c4@r.example", user_id="u1") is True
    with pytest.raises(errors.AlreadyExists):
        api.create_service({"name": "s1", "from_addresses": ["s1@x.example"],
                            "interval_seconds": 1, "daily_quota": 10, "transport": "null"})
    with pytest.raises(errors.NotFound):
        api.get_user("nobody")


def test_tasks(api: Both, conn: psycopg.Connection[Any]) -> None:
    api.upsert_user("u")
    sid = api.create_service({"name": "s", "from_addresses": ["s@x.example"],
                              "interval_seconds": 1, "daily_quota": 10, "transport": "null"})
    api.grant(sid, "u")
    listed = api.create_task({"user_id": "u", "name": "list", "templates": [TEMPLATE],
                              "recipients": [{"email": f"l{i}@r.example"} for i in range(3)]})
    assert listed.recipients == 3
    api.upsert_contacts("u", [{"email": f"c{i}@r.example", "tags": ["vip"]} for i in range(4)])
    ruled = api.create_task({"user_id": "u", "name": "rule", "templates": [TEMPLATE],
                             "rule": {"include_any": ["vip"]}})
    assert ruled.recipients == 4
    assert api.expand(ruled.task_id) == 0  # already complete: resuming adds nothing
    assert api.pause_task(listed.task_id) == "paused"
    assert api.resume_task(listed.task_id, user_id="u") in ("sending", "scheduled")
    assert api.cancel_task(ruled.task_id) == 4
    assert api.get_task(listed.task_id).total_count == 3
    with pytest.warns(DeprecationWarning, match="get_task"):  # the older verbs, for a release
        assert api.task(listed.task_id).total_count == 3
    with pytest.warns(DeprecationWarning, match="pause_task"):
        assert api.pause(listed.task_id) == "paused"
    with pytest.warns(DeprecationWarning, match="resume_task"):
        assert api.resume(listed.task_id) in ("sending", "scheduled")
    with pytest.warns(DeprecationWarning, match="cancel_task"):
        assert api.cancel(listed.task_id) == 3
    assert [t.task_id for t in api.tasks("u")] == [ruled.task_id, listed.task_id]
    with pytest.raises(errors.InvalidInput, match=r"recipients\.1\.email"):
        api.create_task({"user_id": "u", "name": "bad", "templates": [TEMPLATE],
                         "recipients": [{"email": "a@r.example"}, {"email": 5}]})


def test_long_lists_are_validated_in_chunks_with_positions(api: Both) -> None:
    recipients: list[dict[str, Any]] = [{"email": f"r{i}@r.example"} for i in range(2500)]
    recipients[1700] = {"email": "x@r.example", "unknown": 1}
    with pytest.raises(errors.InvalidInput, match=r"recipients\.1700\.unknown"):
        api.create_task({"user_id": "u", "name": "big", "templates": [TEMPLATE],
                         "recipients": recipients})


def test_jobs_and_monitoring(api: Both, conn: psycopg.Connection[Any]) -> None:
    spec = {"user_id": "t1", "name": "nightly", "cron": "0 3 * * *",
            "target": {"kind": "function", "function": "noop"}}
    preview = api.jobs.validate_cron("0 3 * * *", "UTC", count=2)
    assert len(preview.next_runs) == 2
    job = api.jobs.create_job(spec)
    assert job.next_run_at is not None
    more = api.jobs.create_jobs([{**spec, "name": "a"}, {**spec, "name": "b"}])
    assert [j.name for j in more] == ["a", "b"]
    assert api.jobs.update_job(job.job_id, {"cron": "0 4 * * *"}).cron == "0 4 * * *"
    assert api.jobs.get_job(job.job_id, user_id="t1").name == "nightly"
    assert len(api.jobs.list_jobs(user_id="t1")) == 3
    assert api.jobs.pause_job(job.job_id).status == "paused"
    assert api.jobs.resume_job(job.job_id).status == "active"
    execution = api.jobs.trigger_job(job.job_id)
    assert api.jobs.get_execution(execution.execution_id).trigger == "manual"
    assert [e.execution_id for e in api.jobs.list_executions(job_id=job.job_id)] == [
        execution.execution_id]
    assert api.jobs.cancel_execution(execution.execution_id).status == "cancelled"
    assert api.jobs.stop_job(more[0].job_id).status == "inactive"
    assert api.jobs.stats(user_id="t1").jobs_by_status["active"] == 2
    assert api.jobs.purge_executions() == 0
    api.jobs.delete_job(more[1].job_id)
    with pytest.raises(JobNotFound):
        api.jobs.get_job(more[1].job_id)

    status = api.monitoring.status(limit=10)
    assert status.health.services_total == 0
    entries = api.monitoring.config_list()
    key = entries[0].key
    assert api.monitoring.config_get(key).key == key
    assert api.monitoring.config_set("sweep.interval", "30") == 30
    assert conn.execute("SELECT value FROM edm.config WHERE key = 'sweep.interval'"
                        ).fetchone() == (30,)


def test_deliverability(api: Both, conn: psycopg.Connection[Any]) -> None:
    from edm_sched.feedback import FeedbackEvent
    from edm_sched.unsubscribe import UnsubscribeConfig, make_token

    api.upsert_user("u1")
    sid = api.create_service({"name": "s1", "from_addresses": ["s1@x.example"],
                              "interval_seconds": 0, "daily_quota": 10, "transport": "null"})
    api.grant(sid, "u1")
    api.create_task({"user_id": "u1", "name": "t", "templates": [TEMPLATE],
                     "recipients": [{"email": "a@r.example"}, {"email": "b@r.example"}]})
    recorded = api.record_feedback(FeedbackEvent("hard_bounce", None, recipient="a@r.example"))
    assert recorded.suppressed
    config = UnsubscribeConfig(key=b"k" * 32, url="https://news.example/u")
    result = api.unsubscribe(config, make_token(config, "u1", "b@r.example"))
    assert (result.user_id, result.email) == ("u1", "b@r.example")
    assert isinstance(api.reputation(), list)
    assert api.resume_service_reputation(sid) is False  # not paused by the breaker
    assert api.resume_user_reputation("u1") == 0


def test_sites_and_warmup(api: Both, conn: psycopg.Connection[Any]) -> None:
    assert api.set_site_domains("orange", ["orange.fr"], "Orange") == 1
    assert "orange" in {s.site for s in api.sites()}
    assert [d.domain for d in api.site_domains("orange")] == ["orange.fr"]
    sid = api.create_service({"name": "s1", "from_addresses": ["s1@x.example"],
                              "interval_seconds": 0, "daily_quota": 10, "transport": "null"})
    api.suspend_site(sid, "orange", dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5), "test")
    assert conn.execute("SELECT edm.suspended_sites(%s)", (sid,)).fetchone() == (["orange"],)
    assert api.warmup(sid) is None
    w = api.set_service_warmup(sid, [2, 4])
    assert w is not None and (w.day, w.days, w.ceiling_today) == (1, 2, 2)
    with pytest.raises(errors.ConfigurationError):
        api.resolve_sites(["x.example"])  # no site_resolver given


def test_traffic_shaping(api: Both) -> None:
    api.upsert_user("u1")
    sid = api.create_service({"name": "s1", "from_addresses": ["s1@x.example"],
                              "interval_seconds": 0, "daily_quota": 10, "transport": "null"})
    api.grant(sid, "u1")
    per_min = [{"name": "per_min", "kind": "rate", "max_count": 10, "window_seconds": 60}]
    assert api.set_global_limits(per_min) == 1
    assert api.set_site_limits("google", per_min) == 1
    assert api.set_site_limits("google", per_min, service_id=sid) == 1
    assert api.set_user_limits("u1", per_min) == 1
    sent = api.send_message("u1", "a@gmail.com", {"subject": "Code", "body_text": "1234"})
    assert sent.recipients == 1
    assert api.set_task_limits(sent.task_id, per_min) == 1
    assert api.set_task_transactional(sent.task_id, False) is False
    rows = api.shaping_limits()
    assert sorted(r.scope for r in rows) == ["global", "service_site", "site", "task", "user"]


def test_reply_rules_and_suspensions(api: Both, conn: psycopg.Connection[Any]) -> None:
    shipped = api.reply_rules()
    assert any(r.name == "gmail-4.7.28-rate" and r.source == "shipped" for r in shipped)
    rid = api.set_reply_rule({"name": "slow-down", "action": "suspend_site", "smtp_code": 421,
                              "pattern": "slow down", "priority": 1, "duration_seconds": 60,
                              "escalation_factor": 2, "max_duration_seconds": 600})
    assert api.reply_rules()[0].rule_id == rid
    api.disable_reply_rule("slow-down")
    assert not next(r for r in api.reply_rules() if r.name == "slow-down").enabled
    api.enable_reply_rule("slow-down")
    with pytest.raises(errors.InvalidInput):
        api.set_reply_rule({"name": "bad", "action": "retry", "smtp_code": 421})  # no duration
    with pytest.raises(errors.InvalidInput):  # Python accepts it; PostgreSQL's regex does not
        api.set_reply_rule({"name": "bad", "action": "bounce", "pattern": "(unclosed"})
    api.upsert_user("u1")
    sid = api.create_service({"name": "s1", "from_addresses": ["s1@x.example"],
                              "interval_seconds": 0, "daily_quota": 10, "transport": "null"})
    api.grant(sid, "u1")
    api.create_task({"user_id": "u1", "name": "t", "templates": [TEMPLATE],
                     "recipients": [{"email": "a@gmail.com"}]})
    (st,) = conn.execute("SELECT subtask_id FROM edm.claim('d1', 1)").fetchone() or (None,)
    conn.execute("SELECT edm.complete('d1', %s, '{service}', '{421}', '{RCPT TO: 421 slow down}')",
                 ([st],))
    (sus,) = api.suspensions(sid, in_force=True)
    assert (sus.site, sus.level, sus.rule_name, sus.last_code) == ("google", 1, "slow-down", 421)
    (action,) = api.shaping_actions(sid)
    assert (action.subtask_id, action.action, action.reply) == (
        st, "suspend_site", "RCPT TO: 421 slow down")
    assert api.lift_suspension(sid, "google") is True
    assert api.suspensions(sid) == []
    api.delete_reply_rule("slow-down")
    with pytest.raises(errors.NotFound):
        api.delete_reply_rule("slow-down")


def test_every_method_ran_both_ways() -> None:
    """Runs last in this file: every public method was called sync and async above."""
    expected = {n for n in public_methods(Scheduler) if n != "close"}
    expected |= {f"jobs.{n}" for n in public_methods(Jobs)}
    expected |= {f"monitoring.{n}" for n in public_methods(Monitoring)}
    if not {(t, m) for t in COVERING for m in ("sync", "async")} <= RAN:
        pytest.skip("checks what the tests above called: run it with them")
    assert expected - CALLED["sync"] == set()
    assert expected - CALLED["async"] == set()


# ---------------------------------------------------------------------------
# The event loop keeps turning
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_long_async_create_task_does_not_block_the_event_loop(dsn: str) -> None:
    n = 20_000
    spec = {"user_id": "u", "name": "big", "templates": [TEMPLATE],
            "recipients": [{"email": f"r{i}@r.example", "vars": {"first_name": "A"}}
                           for i in range(n)]}

    async def main() -> tuple[float, list[float], int]:
        async with AsyncScheduler(dsn) as s:
            await s.upsert_user("u")
            ticks: list[float] = []
            done = asyncio.Event()

            async def ticker() -> None:
                while not done.is_set():
                    ticks.append(time.perf_counter())
                    await asyncio.sleep(0.005)

            tick_task = asyncio.create_task(ticker())
            await asyncio.sleep(0.02)
            start = time.perf_counter()
            created = await s.create_task(spec)
            elapsed = time.perf_counter() - start
            done.set()
            await tick_task
            during = [t for t in ticks if t >= start]
            gaps = [b - a for a, b in itertools.pairwise(ticks) if b >= start]
            return elapsed, gaps, len(during) and created.recipients

    elapsed, gaps, recipients = asyncio.run(main())
    assert recipients == n
    worst = max(gaps)
    print(f"async create_task of {n}: {elapsed:.2f} s, {len(gaps)} ticks, worst gap "
          f"{worst * 1000:.0f} ms")
    # The call takes a while (COPY, one set-based statement); the loop kept ticking
    # all along: many ticks, and no stall anywhere near the call's length.
    assert len(gaps) >= 10
    assert worst < max(0.25, elapsed / 3)


# ---------------------------------------------------------------------------
# Errors at the door
# ---------------------------------------------------------------------------


def test_no_internal_class_names_in_messages(dsn: str) -> None:
    with Scheduler(dsn) as s:
        with pytest.raises(errors.InvalidInput) as info:
            s.upsert_user("")
        with pytest.raises(errors.InvalidInput) as info2:
            s.grant(1, "u", priority=10_000)
    for exc in (info.value, info2.value):
        assert "Args" not in str(exc) and "_" not in str(exc).split(":")[0], str(exc)
    assert str(info.value).startswith("invalid user arguments: user_id")


def test_unique_violation_is_already_exists(dsn: str) -> None:
    svc = {"name": "dup", "from_addresses": ["d@x.example"], "interval_seconds": 1,
           "daily_quota": 1, "transport": "null"}
    with Scheduler(dsn) as s:
        s.create_service(svc)
        with pytest.raises(errors.AlreadyExists) as info:
            s.create_service(svc)
    assert isinstance(info.value, errors.InvalidInput) and isinstance(info.value, ValueError)
    assert info.value.code == "ALREADY_EXISTS"
    assert isinstance(info.value.__cause__, psycopg.errors.UniqueViolation)
    assert "already exists" in str(info.value)


def _silent_server() -> tuple[Any, int]:
    """A TCP port that accepts connections and never answers (a hung server)."""
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    return srv, srv.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("make", [
    lambda dsn: Scheduler(dsn, connect_timeout=2),
    lambda dsn: asyncio.run(AsyncScheduler(dsn, connect_timeout=2).open()),
], ids=["sync", "async"])
def test_unreachable_database_fails_within_the_connect_timeout(make: Callable[[str], Any]) -> None:
    from edm_sched.api import DEFAULT_CONNECT_TIMEOUT

    assert DEFAULT_CONNECT_TIMEOUT <= 5
    srv, port = _silent_server()
    dsn = f"postgresql://app:hunter2@127.0.0.1:{port}/edm"
    try:
        start = time.monotonic()
        with pytest.raises(errors.DatabaseUnavailable) as info:
            make(dsn)
        elapsed = time.monotonic() - start
    finally:
        srv.close()
    message = str(info.value)
    assert elapsed < 4.5, elapsed
    assert f"127.0.0.1:{port}" in message and "hunter2" not in message
    # A refused port fails at once, with the same kind of message.
    start = time.monotonic()
    with pytest.raises(errors.DatabaseUnavailable, match=r"127\.0\.0\.1:1\b"):
        make("postgresql://app:hunter2@127.0.0.1:1/edm")
    assert time.monotonic() - start < 2.5


def test_conn_of_the_wrong_kind_is_refused(dsn: str) -> None:
    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(dsn) as aconn:
            with Scheduler(dsn) as s, pytest.raises(errors.ConfigurationError, match="Async"):
                s.get_user("u", conn=aconn)  # type: ignore[arg-type]

    asyncio.run(main())


def test_deprecated_entry_points_still_work(dsn: str) -> None:
    from edm_sched import monitoring
    from edm_sched.jobs import JobScheduler

    assert monitoring.status(dsn).health.services_total == 0
    assert monitoring.config_get(dsn, "sweep.interval").key == "sweep.interval"
    assert monitoring.config_set(dsn, "sweep.interval", 20) == 20
    assert any(e.key == "sweep.interval" for e in monitoring.config_list(dsn))
    js = JobScheduler(dsn, now=lambda: dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    job = js.create_job({"user_id": "t", "name": "j", "cron": "0 3 * * *",
                         "target": {"kind": "function", "function": "noop"}})
    assert job.next_run_at == dt.datetime(2026, 1, 1, 3, tzinfo=dt.UTC)


# ---------------------------------------------------------------------------
# One entry point, cheap to import
# ---------------------------------------------------------------------------


def test_one_entry_point_and_a_cheap_import() -> None:
    import subprocess
    import sys

    code = ("import sys, edm_sched; heavy = [m for m in ('psycopg', 'psycopg_pool', 'pydantic',"
            " 'jinja2', 'aiosmtplib') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]", f"import edm_sched loaded {out}"
    import edm_sched

    for name in edm_sched.__all__:
        assert getattr(edm_sched, name) is not None, name
    from edm_sched import AsyncScheduler as A
    from edm_sched import Scheduler as S
    from edm_sched import run_dispatcher

    assert (S.__name__, A.__name__, run_dispatcher.__name__) == (
        "Scheduler", "AsyncScheduler", "run_dispatcher")
    with pytest.raises(AttributeError):
        _ = edm_sched.NoSuchThing  # type: ignore[attr-defined]
