"""The sites API (edm_sched/sites.py): site map, suspensions, warm-up, the resolver hook."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from edm_sched import AsyncScheduler, Scheduler, errors
from edm_sched.sites import warmup_ramp
from tests.support.helpers import TEMPLATE


@pytest.fixture
def sched(dsn: str) -> Iterator[Scheduler]:
    with Scheduler(dsn) as s:
        yield s


def site_of(conn: psycopg.Connection[Any], email: str) -> str | None:
    row = conn.execute("SELECT edm.site_of(%s)", (email,)).fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def task_spec(user: str, emails: list[str]) -> dict[str, Any]:
    return {"user_id": user, "name": "t", "templates": [TEMPLATE],
            "recipients": [{"email": e} for e in emails]}


# The MX hosts a DNS lookup would give (no DNS in tests).
MX = {"corp.example": "aspmx.l.google.com",
      "shop.example": "shop-example.mail.protection.outlook.com",
      "tiny.example": "mx.tiny.example"}


class DirectoryResolver:
    """A resolver over a fixed directory of MX hosts, recording what it was asked."""

    def __init__(self) -> None:
        self.asked: list[list[str]] = []

    def __call__(self, domains: list[str]) -> dict[str, str | None]:
        self.asked.append(list(domains))
        answers: dict[str, str | None] = {}
        for d in domains:
            mx = MX.get(d, "")
            answers[d] = ("google" if mx.endswith(".google.com")
                          else "microsoft" if mx.endswith(".outlook.com") else None)
        return answers


def test_site_map_and_suspensions(sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    assert sched.set_site_domains("orange", ["orange.fr", "Wanadoo.FR"], "Orange France") == 2
    assert site_of(conn, "x@wanadoo.fr") == "orange"
    listed = {s.site: s for s in sched.sites()}
    assert listed["orange"].domains == 2 and listed["orange"].description == "Orange France"
    assert listed["google"].domains >= 2
    assert [(d.domain, d.source) for d in sched.site_domains("orange")] == [
        ("orange.fr", "admin"), ("wanadoo.fr", "admin")]
    with pytest.raises(errors.NotFound):
        sched.site_domains("nosuchsite")
    for bad in (("Bad Name", ["x.example"]), ("ok", ["a@b.example"]), ("ok", ["with space"])):
        with pytest.raises(errors.InvalidInput):
            sched.set_site_domains(*bad)
    sid = sched.create_service({"name": "s", "from_addresses": ["s@x.example"],
                                "interval_seconds": 0, "daily_quota": 100, "transport": "null"})
    until = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=30)
    sched.suspend_site(sid, "google", until, "postmaster asked")
    assert conn.execute("SELECT edm.suspended_sites(%s)", (sid,)).fetchone() == (["google"],)
    with pytest.raises(errors.NotFound):
        sched.suspend_site(sid, "nosuchsite", until, "x")
    with pytest.raises(errors.InvalidInput):
        sched.suspend_site(sid, "google", dt.datetime(2030, 1, 1), "naive datetime")
    sched.suspend_site(sid, "google", dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1), "lifted")
    assert conn.execute("SELECT edm.suspended_sites(%s)", (sid,)).fetchone() == ([],)


def test_warmup_through_the_api(sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sid = sched.create_service({"name": "fresh", "from_addresses": ["s@x.example"],
                                "interval_seconds": 0, "daily_quota": 5000,
                                "transport": "null", "quota_tz": "Europe/Paris"})
    assert sched.warmup(sid) is None
    ramp = warmup_ramp(50, 5000)
    assert ramp == [50, 100, 200, 400, 800, 1600, 3200, 5000]
    w = sched.set_service_warmup(sid, ramp)
    assert w is not None
    assert (w.state, w.day, w.days, w.ceiling_today, w.ceiling_in_force, w.ceiling_tomorrow,
            w.final_ceiling, w.used_today) == ("ramping", 1, 8, 50, 50, 100, 5000, 0)
    limits = {lim.limit_name: lim for lim in sched.service_limits(sid)}
    assert (limits["warmup"].kind, limits["warmup"].max_count) == ("calendar_day", 50)
    # started three days ago: day 4 of 8
    today = conn.execute("SELECT (now() AT TIME ZONE 'Europe/Paris')::date").fetchone()
    assert today is not None
    w = sched.set_service_warmup(sid, ramp, today[0] - dt.timedelta(days=3))
    assert w is not None and (w.day, w.ceiling_today, w.ceiling_in_force) == (4, 400, 400)
    for bad in ([5, 3], [0], list(range(1, 400)), [10**9]):
        with pytest.raises(errors.InvalidInput):
            sched.set_service_warmup(sid, bad)
    with pytest.raises(errors.NotFound):
        sched.set_service_warmup(10**9, [1, 2])
    assert sched.set_service_warmup(sid, None) is None
    assert "warmup" not in {lim.limit_name for lim in sched.service_limits(sid)}


@pytest.mark.parametrize(("start", "full", "factor"), [
    (50, 1000, 2), (1, 1, 2), (100, 400, 1.5), (3, 100_000, 3), (10, 1000, Decimal("1.25")),
    (7, 50, 1.1)])
def test_python_ramp_helper_agrees_with_sql(conn: psycopg.Connection[Any], start: int,
                                            full: int, factor: Any) -> None:
    row = conn.execute("SELECT edm.warmup_ramp(%s::int, %s::int, %s::numeric)",
                       (start, full, factor)).fetchone()
    assert row is not None and warmup_ramp(start, full, factor) == row[0]


def test_python_ramp_helper_refuses_bad_bounds() -> None:
    for bad in ((0, 10, 2), (10, 5, 2), (1, 10, 1), (1, 100_000_000, 1.01), (1, 10, True)):
        with pytest.raises(errors.InvalidInput):
            warmup_ramp(*bad)


def test_resolver_hook_maps_a_new_tasks_unknown_domains(dsn: str,
                                                        conn: psycopg.Connection[Any]) -> None:
    hook = DirectoryResolver()
    with Scheduler(dsn, site_resolver=hook) as s:
        s.upsert_user("u")
        s.create_task(task_spec("u", ["a@corp.example", "b@Corp.example", "c@gmail.com",
                                      "d@tiny.example", "e@shop.example"]))
        assert hook.asked == [["corp.example", "shop.example", "tiny.example"]]
        assert site_of(conn, "x@corp.example") == "google"
        assert site_of(conn, "x@shop.example") == "microsoft"
        assert site_of(conn, "x@tiny.example") is None  # no site: not cached, asked again
        resolved = {d.domain: d.source for d in s.site_domains("google")}
        assert resolved["corp.example"] == "resolved" and resolved["gmail.com"] == "shipped"
        s.create_task(task_spec("u", ["f@corp.example", "g@tiny.example"]))
        assert hook.asked[-1] == ["tiny.example"]
        # on demand, e.g. when contacts are imported
        assert s.resolve_sites(["new.example", "corp.example", "shop.example"]) == 0
        assert hook.asked[-1] == ["new.example"]


def test_a_failing_or_wrong_hook_never_fails_task_creation(
        dsn: str, conn: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture) -> None:
    def broken(domains: list[str]) -> dict[str, str | None]:
        raise OSError("DNS server unreachable")

    def wrong(domains: list[str]) -> Any:
        return {"corp.example": "Not A Site", "other.example": "google",
                "ok.example": "google"}

    with Scheduler(dsn, site_resolver=broken) as s, caplog.at_level(logging.WARNING):
        s.upsert_user("u")
        created = s.create_task(task_spec("u", ["a@corp.example"]))
        assert created.recipients == 1
        assert "DNS server unreachable" in caplog.text
        with pytest.raises(OSError):
            s.resolve_sites(["corp.example"])  # asked directly, the error is the caller's
    caplog.clear()
    with Scheduler(dsn, site_resolver=wrong) as s, caplog.at_level(logging.WARNING):
        created = s.create_task(task_spec("u", ["a@corp.example", "b@ok.example"]))
        assert created.recipients == 2
        assert site_of(conn, "x@ok.example") == "google"
        assert site_of(conn, "x@corp.example") is None
        assert "not a site name" in caplog.text and "not asked" in caplog.text
    with Scheduler(dsn, site_resolver=lambda d: "google") as s, caplog.at_level(logging.WARNING):
        assert s.create_task(task_spec("u", ["a@corp.example"])).recipients == 1
    async def coro(domains: list[str]) -> dict[str, str | None]:
        return {}
    with pytest.raises(errors.ConfigurationError):
        Scheduler(dsn, site_resolver=coro)


def test_hook_answers_join_the_hosts_transaction(dsn: str) -> None:
    hook = DirectoryResolver()
    with Scheduler(dsn, site_resolver=hook) as s, psycopg.connect(dsn) as host:
        s.upsert_user("u")
        s.create_task(task_spec("u", ["a@corp.example"]), conn=host)
        host.rollback()  # the task and the cached answer go together
        assert host.execute("SELECT count(*) FROM edm.tasks").fetchone() == (0,)
        assert host.execute("SELECT edm.site_of('x@corp.example')").fetchone() == (None,)
        s.create_task(task_spec("u", ["a@corp.example"]), conn=host)
        host.commit()
        assert host.execute("SELECT edm.site_of('x@corp.example')").fetchone() == ("google",)


def test_async_scheduler_takes_an_async_or_a_plain_hook(
        dsn: str, conn: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture) -> None:
    directory = DirectoryResolver()

    async def async_hook(domains: list[str]) -> dict[str, str | None]:
        await asyncio.sleep(0)
        return directory(domains)

    async def failing(domains: list[str]) -> dict[str, str | None]:
        raise TimeoutError("resolver timed out")

    async def main() -> None:
        async with AsyncScheduler(dsn, site_resolver=async_hook) as s:
            await s.upsert_user("u")
            await s.create_task(task_spec("u", ["a@corp.example"]))
            assert await s.set_site_domains("orange", ["orange.fr"]) == 1
            assert "orange" in {x.site for x in await s.sites()}
        async with AsyncScheduler(dsn, site_resolver=DirectoryResolver()) as s:
            await s.create_task(task_spec("u", ["a@shop.example"]))
            assert await s.resolve_sites(["tiny.example"]) == 0
        async with AsyncScheduler(dsn, site_resolver=failing) as s:
            created = await s.create_task(task_spec("u", ["a@never.example"]))
            assert created.recipients == 1

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    assert site_of(conn, "x@corp.example") == "google"
    assert site_of(conn, "x@shop.example") == "microsoft"
    assert "resolver timed out" in caplog.text
