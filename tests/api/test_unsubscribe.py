"""One-click unsubscribe (RFC 8058): signed expiring tokens, the headers of bulk
messages, the idempotent unsubscribe, and the WSGI and ASGI endpoints answering real
HTTP requests on a local port. Real PostgreSQL, real dispatcher and SMTP server."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import email.parser
import email.policy
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import wsgiref.simple_server
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from edm_sched import errors
from edm_sched.api import Scheduler
from edm_sched.dispatcher import run_dispatcher
from edm_sched.rendering import RenderContext, TemplateRow, build_message, default_renderer
from edm_sched.testing.smtp_sink import SmtpSink
from edm_sched.transports.base import ServiceConfig
from edm_sched.transports.smtp import SmtpTransport
from edm_sched.unsubscribe import (
    UnsubscribeConfig,
    asgi_app,
    make_token,
    token_from_mailto,
    unsubscribe,
    unsubscribe_mailto,
    verify_token,
    with_unsubscribe,
    wsgi_app,
)
from tests.support.helpers import T0, counters_match, make_service

KEY = b"k" * 32
CONFIG = UnsubscribeConfig(key=KEY, url="https://news.example/unsubscribe",
                           mailto="unsubscribe@news.example")


# ---------------------------------------------------------------------- tokens


def test_a_token_round_trips_and_cannot_be_forged_or_extended() -> None:
    token = make_token(CONFIG, "tenant-1", "ann@example.com", task_id=5, subtask_id=77, now=T0)
    got = verify_token(CONFIG, token, now=T0 + dt.timedelta(days=179))
    assert (got.user_id, got.email, got.task_id, got.subtask_id) == (
        "tenant-1", "ann@example.com", 5, 77)
    _, payload, mac = token.split(".")
    other = make_token(CONFIG, "tenant-1", "bob@example.com", now=T0).split(".")[1]
    for forged in (f"v1.{other}.{mac}", f"v1.{payload}.{mac[:-2]}AA", f"v2.{payload}.{mac}",
                   token + "x", "", "v1..", "garbage"):
        with pytest.raises(errors.InvalidToken):
            verify_token(CONFIG, forged, now=T0)
    with pytest.raises(errors.InvalidToken, match="expired"):
        verify_token(CONFIG, token, now=T0 + dt.timedelta(days=181))
    with pytest.raises(errors.InvalidToken, match="signature"):
        verify_token(UnsubscribeConfig(key=b"o" * 32, url=CONFIG.url), token, now=T0)
    rotated = UnsubscribeConfig(key=b"n" * 32, url=CONFIG.url, previous_keys=(KEY,))
    assert verify_token(rotated, token, now=T0).email == "ann@example.com"


def test_a_configuration_without_https_or_a_short_key_is_refused() -> None:
    with pytest.raises(errors.ConfigurationError):
        UnsubscribeConfig(key=b"short", url="https://x.example/u")
    with pytest.raises(errors.ConfigurationError):
        UnsubscribeConfig(key=KEY, url="http://x.example/u")
    with pytest.raises(errors.ConfigurationError):
        UnsubscribeConfig(key=KEY)
    assert UnsubscribeConfig(key=KEY, url="http://127.0.0.1:1/u", allow_http=True)


# -------------------------------------------------------------------- headers


def render(template: TemplateRow, config: UnsubscribeConfig = CONFIG) -> Any:
    service = ServiceConfig(7, "svc", "null", {}, None, ("news@shop.example",))
    ctx = RenderContext(1234, 56, "tenant-1", "ann@example.com", {}, template)
    message = build_message(service, ctx, with_unsubscribe(config, default_renderer)(ctx))
    assert max(len(line) for line in message.data.split(b"\r\n")) <= 998
    return email.parser.BytesParser(policy=email.policy.default).parsebytes(message.data)


def test_bulk_messages_carry_one_click_headers_and_the_url_variable() -> None:
    parsed = render(TemplateRow("Hi", "Leave: {{ unsubscribe_url }}", None))
    https, mailto = [u.strip(" <>") for u in str(parsed["List-Unsubscribe"]).split(",")]
    assert https.startswith("https://news.example/unsubscribe?token=v1.")
    assert mailto.startswith("mailto:unsubscribe@news.example?subject=unsubscribe%20v1.")
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    token = urllib.parse.parse_qs(urllib.parse.urlsplit(https).query)["token"][0]
    assert verify_token(CONFIG, token).subtask_id == 1234
    assert token_from_mailto(urllib.parse.unquote(mailto)) == token
    assert parsed.get_content().strip() == f"Leave: {https}"


def test_transactional_messages_carry_no_list_unsubscribe() -> None:
    parsed = render(TemplateRow("Receipt", "{{ unsubscribe_url }}", None, list_unsubscribe=False))
    assert parsed["List-Unsubscribe"] is None and parsed["List-Unsubscribe-Post"] is None


def test_a_mailto_only_configuration_has_no_one_click_post() -> None:
    parsed = render(TemplateRow("Hi", "x", None),
                    UnsubscribeConfig(key=KEY, mailto="unsubscribe@news.example"))
    assert str(parsed["List-Unsubscribe"]).startswith("<mailto:")
    assert parsed["List-Unsubscribe-Post"] is None


def test_the_dispatcher_sends_the_headers_through_smtp(dsn: str) -> None:
    with SmtpSink() as sink, Scheduler(dsn) as s:
        s.upsert_user("u")
        sid = s.create_service({"name": "smtp", "from_addresses": ["news@shop.example"],
                                "interval_seconds": 0, "daily_quota": 100,
                                "settings": {"host": "127.0.0.1", "port": sink.port,
                                             "headers": {"X-Campaign": "spring"}}})
        s.grant(sid, "u")
        task = s.create_task({"user_id": "u", "name": "n", "scheduled_at": T0,
                              "templates": [{"subject": "Hi",
                                             "body_text": "{{ unsubscribe_url }}"}],
                              "recipients": [{"email": "ann@rcpt.example"}]}).task_id
        stop = threading.Event()
        th = threading.Thread(target=run_dispatcher, kwargs={
            "dsn": dsn, "transport": {"smtp": SmtpTransport()},
            "renderer": with_unsubscribe(CONFIG), "stop_event": stop, "handle_signals": False})
        th.start()
        try:
            assert len(sink.wait_for(1, timeout=30)) == 1
            deadline = time.monotonic() + 30
            while s.get_task(task).sent_count < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            stop.set()
            th.join(30)
        (data,) = sink.messages
        parsed = email.parser.BytesParser(policy=email.policy.default).parsebytes(data)
        assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert parsed["X-Campaign"] == "spring"
        assert "token=v1." in str(parsed["List-Unsubscribe"])
        assert s.get_task(task).sent_count == 1


# ---------------------------------------------------------------- unsubscribe


@pytest.fixture
def world(dsn: str, conn: psycopg.Connection[Any]) -> Iterator[dict[str, Any]]:
    with Scheduler(dsn) as s:
        s.upsert_user("u1", quota_limit=100)
        s.upsert_user("u2", quota_limit=100)
        make_service(s, "svc", users=["u1", "u2"])
        s.upsert_contacts("u1", [{"email": "ann@rcpt.example", "tags": ["vip"]}])
        tasks = {}
        for user in ("u1", "u2"):
            tasks[user] = s.create_task({
                "user_id": user, "name": "n", "scheduled_at": T0,
                "templates": [{"subject": "Hi", "body_text": "x"}],
                "recipients": [{"email": "ann@rcpt.example"}, {"email": "bob@rcpt.example"}],
            }).task_id
        yield {"s": s, "conn": conn, "dsn": dsn, "tasks": tasks}


def test_unsubscribe_is_scoped_to_the_user_and_idempotent(world: dict[str, Any]) -> None:
    conn, s = world["conn"], world["s"]
    token = make_token(CONFIG, "u1", "ann@rcpt.example", task_id=world["tasks"]["u1"])
    first = unsubscribe(world["dsn"], CONFIG, token)
    assert (first.contact_updated, first.suppressed, first.cancelled) == (True, True, 1)
    again = unsubscribe(conn, CONFIG, token)  # a connection works too
    assert (again.contact_updated, again.suppressed, again.cancelled) == (False, False, 0)
    assert conn.execute("SELECT user_id, email, reason FROM edm.suppressions").fetchall() == [
        ("u1", "ann@rcpt.example", "unsubscribe")]
    assert conn.execute("SELECT unsubscribed FROM edm.contacts").fetchall() == [(True,)]
    st = s.get_task(world["tasks"]["u1"])
    assert (st.pending_count, st.cancelled_count) == (1, 1)
    assert s.get_task(world["tasks"]["u2"]).pending_count == 2  # another tenant's mail still goes
    assert s.get_user("u1").quota_used == 1  # the cancelled recipient's quota came back
    assert counters_match(conn) == []
    # and the next task of u1 leaves the address out
    created = s.create_task({"user_id": "u1", "name": "m", "templates": [{"subject": "s",
                             "body_text": "b"}], "recipients": [{"email": "ann@rcpt.example"}]})
    assert (created.recipients, created.suppressed) == (0, 1)


def test_a_bad_token_unsubscribes_nobody(world: dict[str, Any]) -> None:
    token = make_token(CONFIG, "u1", "ann@rcpt.example", now=T0 - dt.timedelta(days=365))
    with pytest.raises(errors.InvalidToken):
        unsubscribe(world["dsn"], CONFIG, token)
    with pytest.raises(errors.InvalidToken):
        unsubscribe_mailto(world["dsn"], CONFIG, "please unsubscribe me")
    assert world["conn"].execute("SELECT count(*) FROM edm.suppressions").fetchone() == (0,)


def test_unsubscribe_by_mail(world: dict[str, Any]) -> None:
    token = make_token(CONFIG, "u2", "bob@rcpt.example")
    result = unsubscribe_mailto(world["dsn"], CONFIG, f"Re: unsubscribe {token}")
    assert (result.user_id, result.suppressed, result.cancelled) == ("u2", True, 1)


# ------------------------------------------------------------------ endpoints


def request(url: str, data: bytes | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if data is not None:
        req.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def one_click(base: str, world: dict[str, Any]) -> None:
    """What a mailbox provider does (RFC 8058), and what a link scanner does."""
    token = make_token(CONFIG, "u1", "ann@rcpt.example")
    status, page = request(f"{base}?token={token}")  # GET: a confirmation page only
    assert status == 200 and "<form" in page and "ann@rcpt.example" in page
    assert world["conn"].execute("SELECT count(*) FROM edm.suppressions").fetchone() == (0,)
    status, page = request(f"{base}?token={token}", b"List-Unsubscribe=One-Click")
    assert status == 200 and "is unsubscribed" in page
    assert request(f"{base}?token={token}", b"List-Unsubscribe=One-Click")[0] == 200
    assert request(f"{base}?token=v1.forged.{'A' * 43}", b"List-Unsubscribe=One-Click")[0] == 400
    assert world["conn"].execute("SELECT user_id, email FROM edm.suppressions").fetchall() == [
        ("u1", "ann@rcpt.example")]


def test_the_wsgi_endpoint_over_http(world: dict[str, Any]) -> None:
    server = wsgiref.simple_server.make_server(
        "127.0.0.1", 0, wsgi_app(world["dsn"], CONFIG),
        handler_class=type("Quiet", (wsgiref.simple_server.WSGIRequestHandler,),
                           {"log_message": lambda *a: None}))
    th = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    th.start()
    try:
        one_click(f"http://127.0.0.1:{server.server_port}/unsubscribe", world)
    finally:
        server.shutdown()
        server.server_close()


async def _serve_asgi(app: Any, ready: threading.Event, box: dict[str, Any],
                      stop: asyncio.Event) -> None:
    """A minimal HTTP/1.1 server (one request per connection) in front of an ASGI app."""

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        method, target, _ = head[0].split(" ")
        fields = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
        body = await reader.readexactly(int(fields.get("content-length", "0")))
        path, _, qs = target.partition("?")
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        out: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return messages.pop(0)

        async def send(message: dict[str, Any]) -> None:
            out.append(message)

        await app({"type": "http", "method": method, "path": path,
                   "query_string": qs.encode(), "headers": []}, receive, send)
        status = out[0]["status"]
        data = b"".join(m.get("body", b"") for m in out[1:])
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: {len(data)}\r\n"
                     "Connection: close\r\n\r\n".encode() + data)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    box["port"] = server.sockets[0].getsockname()[1]
    ready.set()
    async with server:
        await stop.wait()


def test_the_asgi_endpoint_over_http(world: dict[str, Any]) -> None:
    loop = asyncio.new_event_loop()
    ready, box, stop = threading.Event(), {}, asyncio.Event()
    th = threading.Thread(target=loop.run_until_complete, daemon=True,
                          args=(_serve_asgi(asgi_app(world["dsn"], CONFIG), ready, box, stop),))
    th.start()
    assert ready.wait(10)
    try:
        one_click(f"http://127.0.0.1:{box['port']}/unsubscribe", world)
    finally:
        loop.call_soon_threadsafe(stop.set)
        th.join(10)
        with contextlib.suppress(Exception):
            loop.close()
    time.sleep(0)
