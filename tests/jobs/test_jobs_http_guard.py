"""The outbound guard of http jobs, secrets by reference, and what tenants may run.

Real HTTP servers on loopback addresses (127.0.0.1, 127.0.0.2, 127.0.0.3: all of
127/8 is this machine), a real database, a resolver hook. No test sends a
packet beyond this machine: refusals of other ranges are shown at the door or
on a resolver answer, before any connection is opened.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.server
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from edm_sched import errors
from edm_sched.jobs import (
    DestinationNotAllowed,
    HttpTarget,
    InvalidJobConfig,
    JobContext,
    JobRunner,
    JobScheduler,
    guard,
    kinds,
)
from edm_sched.jobs.outbound import HttpSettings

T0 = dt.datetime(2026, 1, 5, 10, 1, tzinfo=dt.UTC)
SECRET = "s3cr3t-PLANTED-7f1e9c"


class Server:
    """A threaded HTTP server on one loopback address; records every request."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 redirect_to: str | None = None, body: bytes = b'{"done": true}',
                 trickle: bool = False) -> None:
        self.hits: list[dict[str, Any]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                data = self.rfile.read(length) if length else b""
                outer.hits.append({"path": self.path, "method": self.command,
                                   "headers": dict(self.headers), "body": data})
                if trickle:
                    with contextlib.suppress(OSError):
                        self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                        for _ in range(100):
                            self.wfile.write(b"X")
                            self.wfile.flush()
                            time.sleep(0.1)
                    return
                if redirect_to is not None:
                    self.send_response(302)
                    self.send_header("Location", redirect_to + self.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                # Echo what was received, as a careless server would.
                payload = body if body else json.dumps(
                    {"headers": dict(self.headers)}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = _any

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.host = host
        self.port = int(self.server.server_address[1])
        # serve_forever polls for shutdown every 0.5 s by default: every test paid it.
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    made: list[Server] = []
    yield made
    for s in made:
        s.close()


def serve(made: list[Server], host: str = "127.0.0.1", port: int = 0, **kw: Any) -> Server:
    s = Server(host, port, **kw)
    made.append(s)
    return s


@pytest.fixture
def sched(dsn: str) -> JobScheduler:
    return JobScheduler(dsn)


def allow(conn: psycopg.Connection[Any], value: dict[str, Any]) -> None:
    conn.execute("SELECT edm.config_set('jobs.http_allow', to_jsonb(%s::text))",
                 [json.dumps(value)])


def http_job(sched: JobScheduler, url: str, *, name: str = "call", tenant: str | None = "acme",
             retries: int = 0, **target: Any) -> int:
    return sched.create_job({
        "name": name, "cron": "0 0 1 1 *", "user_id": tenant,
        "target": {"kind": "http", "url": url, **target},
        "retry": {"max_retries": retries, "delay_seconds": 0},
    }).job_id


def run_once(sched: JobScheduler, dsn: str, job_id: int, *, tenant: str | None = "acme",
             **runner_kw: Any) -> Any:
    """Trigger the job, run the runner until it finished (and any retry ran)."""
    sched.trigger_job(job_id)
    runner = JobRunner(dsn, {}, **runner_kw)
    try:
        for _ in range(10):
            report = runner.step(timeout=30)
            if not report.claimed:
                break
    finally:
        runner.close()
    return sched.list_executions(job_id=job_id)


# -- at the door -------------------------------------------------------------------


SPELLINGS = [
    "http://127.0.0.1:{port}/", "http://localhost:{port}/", "http://2130706433:{port}/",
    "http://0x7f000001:{port}/", "http://127.1:{port}/", "http://[::ffff:127.0.0.1]:{port}/",
    "http://0177.0.0.1:{port}/", "http://0x7f.1:{port}/", "http://LOCALHOST.:{port}/",
    "http://api.localhost:{port}/", "http://[::1]:{port}/", "http://[::ffff:7f00:1]:{port}/",
    "http://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54:{port}/",  # full-width
    "http://127.0.0.1.:{port}/", "https://127.0.0.1:{port}/",
]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_loopback_in_every_spelling_is_refused_at_the_door(
        spelling: str, sched: JobScheduler, conn: psycopg.Connection[Any],
        servers: list[Server]) -> None:
    server = serve(servers)
    with pytest.raises(DestinationNotAllowed) as info:
        http_job(sched, spelling.format(port=server.port))
    assert info.value.code == "DESTINATION_NOT_ALLOWED"
    assert isinstance(info.value, InvalidJobConfig)  # callers catching the old error still do
    assert conn.execute("SELECT count(*) FROM edm.jobs").fetchone() == (0,)
    assert server.hits == []


@pytest.mark.parametrize("url, reason", [
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://10.1.2.3/", "private"), ("http://172.16.0.1/", "private"),
    ("http://192.168.1.1/", "private"), ("http://100.64.0.1/", "carrier-grade NAT"),
    ("http://0.0.0.0/", "unspecified"), ("http://0/", "unspecified"),
    ("http://224.0.0.1/", "multicast"), ("http://240.0.0.1/", "reserved"),
    ("http://255.255.255.255/", "reserved"), ("http://198.18.0.1/", "reserved"),
    ("http://[fe80::1]/", "link-local"), ("http://[fc00::1]/", "private"),
    ("http://[fd12:3456::1]/", "private"), ("http://[ff02::1]/", "multicast"),
    ("http://[::]/", "unspecified"), ("http://[::ffff:169.254.169.254]/", "link-local"),
    ("http://[::ffff:10.0.0.1]/", "private"), ("http://[64:ff9b::a00:1]/", "private"),
    ("http://[2002:a00:1::1]/", "private"), ("http://[2001:db8::1]/", "reserved"),
    ("http://0xa9fea9fe/", "link-local"), ("http://2852039166/", "link-local"),
    ("http://012.0.0.1/", "private"), ("http://10.1/", "private"),
])
def test_other_ranges_are_refused_without_a_packet(url: str, reason: str) -> None:
    with pytest.raises(guard.Blocked, match=reason):
        guard.check_url(url)


@pytest.mark.parametrize("url", [
    "http://user:pw@example.com/", "http://example.com\\@127.0.0.1/", "ftp://example.com/",
    "http://256.1.1.1/", "http://1.2.3.4.5/", "http://foo.08/", "http://%31%32%37.0.0.1/",
])
def test_malformed_or_ambiguous_urls_are_refused(url: str, sched: JobScheduler) -> None:
    with pytest.raises(guard.Blocked):
        guard.check_url(url)
    with pytest.raises(InvalidJobConfig):
        http_job(sched, url)


def test_public_addresses_and_names_pass_the_door(sched: JobScheduler) -> None:
    for url in ("https://93.184.215.14/", "https://[2606:4700::1111]/x",
                "https://crm.example.com/hook?x=1", "http://8.8.8.8:8080/"):
        guard.check_url(url)
    assert http_job(sched, "https://crm.example.com/hook") > 0  # names resolve at run time


def test_update_to_a_refused_url_is_refused_and_changes_nothing(sched: JobScheduler) -> None:
    job_id = http_job(sched, "https://crm.example.com/hook")
    with pytest.raises(DestinationNotAllowed):
        sched.update_job(job_id, {"target": {"kind": "http", "url": "http://169.254.169.254/"}},
                         user_id="acme")
    assert sched.get_job(job_id).target["url"] == "https://crm.example.com/hook"


def test_malformed_allowlist_is_refused_by_the_database(conn: psycopg.Connection[Any]) -> None:
    for bad in ("not json", '{"users": ["acme"]}', '{"tenants": ["acme"]}',
                '{"all": ["not a host!"]}', '{"everyone": []}'):
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("SELECT edm.config_set('jobs.http_allow', to_jsonb(%s::text))", [bad])
    allow(conn, {"all": ["10.20.0.0/16", "*.intranet.example"], "platform": ["::1"],
                 "users": {"acme": ["127.0.0.1", "crm.acme.test"]}})
    # "tenants", the older word for "users", is still read
    allow(conn, {"tenants": {"acme": ["127.0.0.1"]}, "users": {"globex": ["::1"]}})


# -- allowlist, run time -------------------------------------------------------------


def test_loopback_server_is_reached_only_when_allowed_for_the_tenant(
        sched: JobScheduler, dsn: str, conn: psycopg.Connection[Any],
        servers: list[Server]) -> None:
    server = serve(servers)
    allow(conn, {"users": {"acme": ["127.0.0.1/32"]}})
    job_id = http_job(sched, server.url + "/report", retries=3)
    with pytest.raises(DestinationNotAllowed):  # another tenant is not opened
        http_job(sched, server.url + "/report", tenant="globex")

    done = run_once(sched, dsn, job_id)
    assert [e.status for e in done] == ["succeeded"]
    assert [h["path"] for h in server.hits] == ["/report"]

    # The host closes it again: the next run is refused before connecting, with
    # its own error kind, and not retried although the job has retries left.
    allow(conn, {})
    done = run_once(sched, dsn, job_id)
    assert (done[0].status, done[0].error_kind) == ("failed", "blocked")
    assert len(done) == 2 and len(server.hits) == 1
    assert "127.0.0.1" in (done[0].error or "") and "loopback" in (done[0].error or "")


def test_allowed_host_name_reaches_a_private_address_through_the_resolver(
        sched: JobScheduler, dsn: str, conn: psycopg.Connection[Any],
        servers: list[Server]) -> None:
    server = serve(servers, "127.0.0.2")
    allow(conn, {"all": ["*.intranet.test"]})
    job_id = http_job(sched, f"http://crm.intranet.test:{server.port}/ping", tenant=None)
    asked: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        asked.append(host)
        return ["127.0.0.2"]

    done = run_once(sched, dsn, job_id, http_resolver=resolver)
    assert [e.status for e in done] == ["succeeded"]
    assert asked == ["crm.intranet.test"]
    assert server.hits[0]["headers"]["Host"] == f"crm.intranet.test:{server.port}"


# -- resolution: checked once, connected to what was checked ------------------------------


def test_no_dns_rebinding_window(sched: JobScheduler, dsn: str, conn: psycopg.Connection[Any],
                                 servers: list[Server]) -> None:
    good = serve(servers, "127.0.0.1")
    trap = serve(servers, "127.0.0.3", good.port)  # same port, refused address
    allow(conn, {"all": ["127.0.0.1/32"]})
    answers = iter([["127.0.0.1"], ["127.0.0.3"], ["127.0.0.3"]])
    calls: list[str] = []

    def rebinding(host: str, port: int) -> list[str]:
        calls.append(host)
        return next(answers)  # checked answer first, then a refused one

    job_id = http_job(sched, f"http://svc.rebind.test:{good.port}/", tenant="acme")
    done = run_once(sched, dsn, job_id, http_resolver=rebinding)
    assert [e.status for e in done] == ["succeeded"]
    assert calls == ["svc.rebind.test"]  # resolved once; connected to that answer
    assert len(good.hits) == 1 and trap.hits == []

    # The other order: the first answer is refused, so nothing connects.
    answers = iter([["127.0.0.3"], ["127.0.0.1"]])
    calls.clear()
    done = run_once(sched, dsn, job_id, http_resolver=rebinding)
    assert (done[0].status, done[0].error_kind) == ("failed", "blocked")
    assert calls == ["svc.rebind.test"] and len(good.hits) == 1 and trap.hits == []


@pytest.mark.parametrize("answer", [
    ["169.254.169.254"], ["10.0.0.5"], ["100.64.1.1"], ["fd00::1"], ["::ffff:10.0.0.1"],
    ["93.184.215.14", "192.168.0.10"],  # one refused answer refuses the name
])
def test_names_resolving_to_refused_ranges_are_refused_before_connecting(
        answer: list[str]) -> None:
    ctx = _ctx()
    target = HttpTarget(url="https://metadata.example.test/latest")
    outcome = kinds.run_http(ctx, target, settings=HttpSettings(resolver=lambda h, p: answer))
    assert (outcome.status, outcome.error_kind) == ("failed", "blocked")


def test_proxy_variables_do_not_route_around_the_guard(
        sched: JobScheduler, dsn: str, conn: psycopg.Connection[Any], servers: list[Server],
        monkeypatch: pytest.MonkeyPatch) -> None:
    target = serve(servers, "127.0.0.1")
    proxy = serve(servers, "127.0.0.2")
    for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY",
                "all_proxy"):
        monkeypatch.setenv(var, proxy.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    allow(conn, {"all": ["127.0.0.1/32"]})
    ok = http_job(sched, target.url + "/direct", name="direct")
    refused = http_job(sched, "http://internal.example.test/", name="refused")

    assert [e.status for e in run_once(sched, dsn, ok)] == ["succeeded"]
    done = run_once(sched, dsn, refused, http_resolver=lambda h, p: ["10.9.8.7"])
    assert done[0].error_kind == "blocked"
    assert len(target.hits) == 1 and proxy.hits == []


# -- redirects ---------------------------------------------------------------------


def test_redirects_are_not_followed_unless_asked_and_each_hop_is_checked(
        sched: JobScheduler, dsn: str, conn: psycopg.Connection[Any],
        servers: list[Server]) -> None:
    internal = serve(servers, "127.0.0.1")
    bouncer = serve(servers, "127.0.0.2", redirect_to=internal.url)
    allow(conn, {"all": ["127.0.0.2/32"]})  # the redirector is allowed, its target is not

    plain = http_job(sched, bouncer.url + "/a", name="plain")
    done = run_once(sched, dsn, plain)
    assert (done[0].error_kind, done[0].result["status"]) == ("unexpected_status", 302)

    follow = http_job(sched, bouncer.url + "/b", name="follow", max_redirects=3)
    done = run_once(sched, dsn, follow)
    assert (done[0].status, done[0].error_kind) == ("failed", "blocked")
    assert internal.hits == []

    allow(conn, {"all": ["127.0.0.2/32", "127.0.0.1/32"]})
    done = run_once(sched, dsn, follow)
    assert done[0].status == "succeeded"
    assert done[0].result["redirects"] == 1 and done[0].result["url"] == internal.url + "/b"
    assert [h["path"] for h in internal.hits] == ["/b"]


def test_redirect_loops_stop_at_max_redirects(servers: list[Server]) -> None:
    port = _free_port()
    self_loop = serve(servers, "127.0.0.1", port, redirect_to=f"http://127.0.0.1:{port}")
    settings = HttpSettings(allowlist=guard.Allowlist(all=("127.0.0.1/32",)))
    target = HttpTarget(url=self_loop.url + "/x", max_redirects=2)
    outcome = kinds.run_http(_ctx(), target, settings=settings)
    assert outcome.error_kind == "unexpected_status" and outcome.result["redirects"] == 2
    assert len(self_loop.hits) == 3


# -- secrets -------------------------------------------------------------------------


def test_secrets_by_reference_never_reach_the_database_or_the_logs(
        sched: JobScheduler, dsn: str, conn: psycopg.Connection[Any], servers: list[Server],
        caplog: pytest.LogCaptureFixture) -> None:
    echo = serve(servers, "127.0.0.1", body=b"")  # echoes the request headers back
    bouncer = serve(servers, "127.0.0.2", redirect_to=echo.url)
    allow(conn, {"all": ["127.0.0.1/32", "127.0.0.2/32"]})
    asked: list[tuple[str, str | None]] = []

    def secrets(ref: str, tenant_id: str | None) -> str | None:
        asked.append((ref, tenant_id))
        return SECRET if (ref, tenant_id) in {("crm-token", "acme"), ("crm/pw", "acme")} \
            else None

    bearer = http_job(sched, echo.url + "/bearer", name="bearer",
                      headers={"Authorization": {"secret_ref": "crm-token", "prefix": "Bearer "},
                               "X-Plain": "visible"})
    basic = http_job(sched, echo.url + "/basic", name="basic",
                     basic_auth={"username": "api", "password_ref": "crm/pw"})
    other = http_job(sched, echo.url + "/other", name="other", tenant="globex",
                     headers={"X-Key": {"secret_ref": "crm-token"}})
    moved = http_job(sched, bouncer.url + "/moved", name="moved", max_redirects=1,
                     headers={"X-Key": {"secret_ref": "crm-token"}})
    with caplog.at_level(logging.DEBUG):
        assert run_once(sched, dsn, bearer, secret_resolver=secrets)[0].status == "succeeded"
        assert run_once(sched, dsn, basic, secret_resolver=secrets)[0].status == "succeeded"
        refused = run_once(sched, dsn, other, tenant="globex", secret_resolver=secrets)[0]
        assert run_once(sched, dsn, moved, secret_resolver=secrets)[0].status == "succeeded"

    # The server got the secrets; the echoed bodies were scrubbed before recording.
    sent = {h["path"]: h["headers"] for h in echo.hits}
    assert sent["/bearer"]["Authorization"] == f"Bearer {SECRET}"
    assert sent["/basic"]["Authorization"].startswith("Basic ")
    assert "/other" not in sent  # another tenant's job cannot use acme's secret
    assert (refused.status, refused.error_kind) == ("failed", "config")
    assert "crm-token" in (refused.error or "") and ("crm-token", "globex") in asked
    assert "X-Key" not in sent["/moved"]  # dropped on the redirect to another origin
    bearer_result = sched.list_executions(job_id=bearer)[0].result
    assert "[secret]" in bearer_result["body"] and "visible" in bearer_result["body"]

    import base64
    token = base64.b64encode(f"api:{SECRET}".encode()).decode()
    tables = conn.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'edm'"
        " AND table_type = 'BASE TABLE'").fetchall()
    for (table,) in tables:
        for needle in (SECRET, token):
            row = conn.execute(sql.SQL("SELECT count(*) FROM edm.{} t WHERE t::text LIKE %s")
                               .format(sql.Identifier(table)), [f"%{needle}%"]).fetchone()
            assert row == (0,), f"secret found in edm.{table}"
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert SECRET not in logged and token not in logged


# -- bounds ----------------------------------------------------------------------------


def test_response_bytes_are_capped(servers: list[Server]) -> None:
    big = serve(servers, "127.0.0.1", body=b"A" * 3_000_000)
    settings = HttpSettings(allowlist=guard.Allowlist(all=("127.0.0.1/32",)))
    outcome = kinds.run_http(_ctx(), HttpTarget(url=big.url, max_response_bytes=10_000),
                             settings=settings)
    assert outcome.status == "succeeded"
    assert outcome.result["bytes_read"] == 10_000 and outcome.result["truncated"] is True
    assert len(outcome.result["body"]) == 2000


def test_total_time_is_capped_against_a_trickling_server(servers: list[Server]) -> None:
    slow = serve(servers, "127.0.0.1", trickle=True)  # one byte every 0.1 s for 10 s
    settings = HttpSettings(allowlist=guard.Allowlist(all=("127.0.0.1/32",)))
    started = time.monotonic()
    outcome = kinds.run_http(_ctx(), HttpTarget(url=slow.url, timeout_seconds=1),
                             settings=settings)
    elapsed = time.monotonic() - started
    assert (outcome.status, outcome.error_kind) == ("timed_out", "timeout")
    assert elapsed < 3, elapsed  # a per-read timeout alone would wait the whole 10 s


# -- shell jobs of tenants, concurrency per tenant ----------------------------------------


def test_tenant_shell_jobs_need_the_host_to_allow_the_tenant(
        sched: JobScheduler, conn: psycopg.Connection[Any]) -> None:
    def shell(tenant: str | None, name: str) -> int:
        return sched.create_job({"name": name, "cron": "0 0 1 1 *", "user_id": tenant,
                                 "target": {"kind": "shell", "command": ["true"]}}).job_id

    with pytest.raises(InvalidJobConfig, match="disabled"):
        shell(None, "platform")
    conn.execute("SELECT edm.config_set('jobs.shell_enabled', 'true')")
    assert shell(None, "platform") > 0  # platform jobs: the one switch, as before
    with pytest.raises(InvalidJobConfig, match="acme"):
        shell("acme", "a")
    conn.execute("SELECT edm.config_set('jobs.shell_users', to_jsonb(%s::text))", ['["acme"]'])
    assert shell("acme", "a") > 0
    with pytest.raises(InvalidJobConfig, match="globex"):
        shell("globex", "g")
    # A function job cannot be turned into a tenant's shell job behind the door either.
    fn = sched.create_job({"name": "f", "cron": "0 0 1 1 *", "user_id": "globex",
                           "target": {"kind": "function", "function": "x"}}).job_id
    with pytest.raises(psycopg.DatabaseError, match="globex") as info:
        conn.execute("UPDATE edm.jobs SET kind = 'shell', target = "
                     "'{\"kind\": \"shell\", \"command\": \"id\"}' WHERE job_id = %s", [fn])
    assert info.value.sqlstate == "ED012"


def test_runner_refuses_a_tenant_shell_run_the_host_no_longer_allows(
        sched: JobScheduler, dsn: str, conn: psycopg.Connection[Any]) -> None:
    conn.execute("SELECT edm.config_set('jobs.shell_enabled', 'true')")
    conn.execute("SELECT edm.config_set('jobs.shell_users', to_jsonb(%s::text))", ['["*"]'])
    job_id = sched.create_job({"name": "s", "cron": "0 0 1 1 *", "user_id": "acme",
                               "target": {"kind": "shell", "command": ["true"]}}).job_id
    conn.execute("SELECT edm.config_set('jobs.shell_users', to_jsonb(%s::text))", ['[]'])
    done = run_once(sched, dsn, job_id, allow_shell=True)
    assert (done[0].status, done[0].error_kind) == ("failed", "config")
    assert "acme" in (done[0].error or "")


def test_running_executions_per_tenant_are_capped_across_kinds(
        sched: JobScheduler, conn: psycopg.Connection[Any]) -> None:
    conn.execute("SELECT edm.config_set('jobs.max_running_per_user', '2')")
    ids = [sched.create_job({"name": f"j{i}", "cron": "0 0 1 1 *", "user_id": tenant,
                             "target": target}).job_id
           for i, (tenant, target) in enumerate([
               ("acme", {"kind": "function", "function": "f"}),
               ("acme", {"kind": "http", "url": "https://a.example.com/"}),
               ("acme", {"kind": "http", "url": "https://b.example.com/"}),
               ("globex", {"kind": "http", "url": "https://c.example.com/"}),
               (None, {"kind": "function", "function": "g"})])]
    for job_id in ids:
        sched.trigger_job(job_id)
    first = conn.execute("SELECT user_id FROM edm.job_claim('w1', 10)").fetchall()
    assert sorted(t or "-" for (t,) in first) == ["-", "acme", "acme", "globex"]
    assert conn.execute("SELECT count(*) FROM edm.job_claim('w2', 10)").fetchone() == (0,)
    # Runners sleep: the waiting acme execution is not work they could take now.
    wakeup = conn.execute("SELECT edm.job_next_wakeup()").fetchone()
    assert wakeup is not None and (wakeup[0] is None or wakeup[0] > dt.datetime.now(dt.UTC)
                                   + dt.timedelta(seconds=60))
    # One acme run finishes: the third acme execution may start.
    running = conn.execute("SELECT execution_id FROM edm.job_executions WHERE user_id = 'acme'"
                           " AND status = 'running' LIMIT 1").fetchone()
    assert running is not None
    conn.execute("SELECT edm.job_complete(%s, 'w1', 'succeeded')", [running[0]])
    again = conn.execute("SELECT user_id FROM edm.job_claim('w2', 10)").fetchall()
    assert again == [("acme",)]


# -- helpers -----------------------------------------------------------------------------


def _ctx(timeout: float = 30.0) -> JobContext:
    return JobContext(execution_id=1, job_id=1, job_name="t", user_id="acme",
                      trigger="manual", scheduled_for=None, retry_count=0, args={},
                      timeout_seconds=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_configuration_errors_are_typed() -> None:
    assert issubclass(DestinationNotAllowed, errors.InvalidInput)


# -- TLS to a pinned address -------------------------------------------------------------


def _self_signed(tmp_path: Any, name: str) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_https_connects_to_the_checked_address_with_the_name_for_sni_and_host(
        tmp_path: Any, servers: list[Server]) -> None:
    pytest.importorskip("cryptography")
    cert, key = _self_signed(tmp_path, "svc.tls.test")
    server = serve(servers, "127.0.0.1", body=b"")
    names: list[str | None] = []
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)

    def record_sni(sock: Any, name: str | None, ctx: Any) -> None:
        names.append(name)

    server_ctx.sni_callback = record_sni
    server.server.socket = server_ctx.wrap_socket(server.server.socket, server_side=True)
    client_ctx = ssl.create_default_context(cafile=cert)
    asked: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        asked.append(host)
        return ["127.0.0.1"]

    settings = HttpSettings(resolver=resolver, ssl_context=client_ctx,
                            allowlist=guard.Allowlist(all=("svc.tls.test",)))
    url = f"https://svc.tls.test:{server.port}/secure"
    outcome = kinds.run_http(_ctx(), HttpTarget(url=url), settings=settings)
    assert outcome.status == "succeeded", outcome.error
    assert names == ["svc.tls.test"] and asked == ["svc.tls.test"]
    assert server.hits[0]["headers"]["Host"] == f"svc.tls.test:{server.port}"

    # The certificate is still checked against the URL's host: by address it fails.
    settings = HttpSettings(ssl_context=client_ctx,
                            allowlist=guard.Allowlist(all=("127.0.0.1/32",)))
    outcome = kinds.run_http(_ctx(), HttpTarget(url=f"https://127.0.0.1:{server.port}/"),
                             settings=settings)
    assert outcome.error_kind == "connection" and "certificate" in (outcome.error or "").lower()


def test_cli_refuses_loopback_and_stores_only_secret_references(
        capsys: pytest.CaptureFixture[str], dsn: str) -> None:
    from edm_sched.cli import main

    code = main(["jobs", "create", "--dsn", dsn, "--json", "--name", "peek", "--cron", "@daily",
                 "--tenant-id", "acme", "--http", "http://0x7f.1:8080/"])
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 1 and json.loads(out)["error"] == "DESTINATION_NOT_ALLOWED"
    code = main(["jobs", "create", "--dsn", dsn, "--json", "--name", "crm", "--cron", "@daily",
                 "--tenant-id", "acme", "--http", "https://crm.example.com/",
                 "--secret-header", "Authorization:crm-token", "--max-redirects", "2"])
    capsys.readouterr()
    assert code == 0
    target = JobScheduler(dsn).list_jobs(user_id="acme")[0].target
    assert target["headers"] == {"Authorization": {"secret_ref": "crm-token", "prefix": ""}}
    assert target["max_redirects"] == 2


def test_the_deprecated_http_opener_is_ignored_with_a_warning(dsn: str) -> None:
    import urllib.request

    with pytest.warns(DeprecationWarning, match="outbound guard"):
        runner = JobRunner(dsn, {}, http_opener=urllib.request.build_opener())
    runner.close()
    with pytest.warns(DeprecationWarning):
        outcome = kinds.run_http(_ctx(), HttpTarget(url="http://127.0.0.1:9/"),
                                 urllib.request.build_opener())
    assert outcome.error_kind == "blocked"
