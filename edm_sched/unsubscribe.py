"""One-click unsubscribe (RFC 8058, RFC 2369): signed tokens, headers, endpoints.

Gmail and Yahoo require bulk senders to offer one-click unsubscribe since 2024.
With an :class:`UnsubscribeConfig` (a key the host keeps, never stored in the
database; an https URL and/or a mailto address), :func:`with_unsubscribe` wraps
a renderer so that every message of a bulk task carries::

    List-Unsubscribe: <https://host/unsubscribe?token=...>,
     <mailto:unsub@host?subject=unsubscribe%20...>
    List-Unsubscribe-Post: List-Unsubscribe=One-Click

and templates may print ``{{ unsubscribe_url }}``. Transactional tasks
(``list_unsubscribe=False``) get the variable but not the headers.

The token is ``v1.<payload>.<mac>``: base64url of a compact JSON payload (user,
address, task, subtask, expiry) and of its HMAC-SHA256 under the key. It holds
no secret (a recipient may read its own address in it) and cannot be forged or
extended. :func:`verify_token` checks it (the current key, then
``previous_keys`` during a key rotation); :func:`unsubscribe` verifies it and
calls ``edm.unsubscribe`` (contact unsubscribed, address suppressed for that
user, its pending subtasks cancelled) — idempotently.

:func:`wsgi_app` and :func:`asgi_app` are ready-made endpoints: ``GET`` shows a
confirmation form (link scanners must not unsubscribe anyone), ``POST`` (the
mailbox provider's one-click request, or the form) unsubscribes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import datetime as dt
import hashlib
import hmac
import html
import json
import re
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

from edm_sched import core, db, errors
from edm_sched.core import Fetch, Op
from edm_sched.rendering import RenderContext, Rendered, Renderer, default_renderer
from edm_sched.sqlfiles import query

DEFAULT_TTL = dt.timedelta(days=180)
_VERSION = "v1"
_TOKEN = re.compile(r"v1\.([A-Za-z0-9_-]{1,2000})\.([A-Za-z0-9_-]{43})")
ONE_CLICK = "List-Unsubscribe=One-Click"


@dataclass(frozen=True)
class UnsubscribeConfig:
    """Where and how recipients unsubscribe.

    ``key``: at least 32 bytes the host keeps secret (an env var, a vault); never
    stored by edm-sched. ``url``: the https endpoint; the token is added as the
    ``token`` query parameter, or replaces ``{token}`` in the URL. ``mailto``: an
    address whose inbound processing calls :func:`unsubscribe_mailto`. At least one
    of the two. ``ttl``: how long a token stays valid. ``previous_keys``: keys
    still accepted (not used to sign) while rotating.
    """

    key: bytes
    url: str | None = None
    mailto: str | None = None
    ttl: dt.timedelta = DEFAULT_TTL
    previous_keys: tuple[bytes, ...] = ()
    allow_http: bool = False  # plain http URLs, for local tests only

    def __post_init__(self) -> None:
        for key in (self.key, *self.previous_keys):
            if not isinstance(key, bytes) or len(key) < 32:
                raise errors.ConfigurationError("an unsubscribe key must be at least 32 bytes")
        if self.url is None and self.mailto is None:
            raise errors.ConfigurationError("give an unsubscribe url, a mailto address or both")
        if self.url is not None:
            scheme = urllib.parse.urlsplit(self.url).scheme
            if scheme != "https" and not (self.allow_http and scheme == "http"):
                raise errors.ConfigurationError(
                    f"the unsubscribe url must be https (RFC 8058), got {self.url!r}")
            if not self.url.isascii() or any(c in self.url for c in " <>,\"\r\n"):
                raise errors.ConfigurationError("the unsubscribe url must be plain ASCII")
        if self.mailto is not None and not re.fullmatch(r"[!-~]+@[A-Za-z0-9.-]+", self.mailto):
            raise errors.ConfigurationError(f"invalid unsubscribe mailto {self.mailto!r}")
        if self.ttl <= dt.timedelta(0):
            raise errors.ConfigurationError("the token lifetime must be positive")

    def link(self, token: str) -> str:
        """The https URL of ``token``."""
        assert self.url is not None
        if "{token}" in self.url:
            return self.url.replace("{token}", token)
        return self.url + ("&" if "?" in self.url else "?") + "token=" + token

    def mailto_uri(self, token: str) -> str:
        assert self.mailto is not None
        return f"mailto:{self.mailto}?subject=unsubscribe%20{token}"

    def headers(self, token: str) -> tuple[tuple[str, str], ...]:
        """``List-Unsubscribe`` (https first, then mailto) and, with an https URL,
        ``List-Unsubscribe-Post: List-Unsubscribe=One-Click``."""
        uris = ([f"<{self.link(token)}>"] if self.url else []) + (
            [f"<{self.mailto_uri(token)}>"] if self.mailto else [])
        fields = [("List-Unsubscribe", ", ".join(uris))]
        if self.url:
            fields.append(("List-Unsubscribe-Post", ONE_CLICK))
        return tuple(fields)


@dataclass(frozen=True)
class UnsubscribeToken:
    user_id: str
    email: str
    task_id: int | None
    subtask_id: int | None
    expires_at: dt.datetime


@dataclass(frozen=True)
class UnsubscribeResult:
    user_id: str
    email: str
    contact_updated: bool  # a contact of the user was marked unsubscribed just now
    suppressed: bool  # the address was suppressed for the user just now
    cancelled: int  # pending subtasks to the address cancelled just now


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, payload: str) -> bytes:
    return hmac.new(key, f"{_VERSION}.{payload}".encode("ascii"), hashlib.sha256).digest()


def make_token(config: UnsubscribeConfig, user_id: str, email: str, *,
               task_id: int | None = None, subtask_id: int | None = None,
               now: dt.datetime | None = None) -> str:
    """A signed token for unsubscribing ``email`` from ``user_id``'s mail."""
    expires = (now or dt.datetime.now(dt.UTC)) + config.ttl
    body = {"u": user_id, "e": email, "x": int(expires.timestamp())}
    if task_id is not None:
        body["t"] = task_id
    if subtask_id is not None:
        body["s"] = subtask_id
    payload = _b64(json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode())
    return f"{_VERSION}.{payload}.{_b64(_mac(config.key, payload))}"


def verify_token(config: UnsubscribeConfig, token: str, *,
                 now: dt.datetime | None = None) -> UnsubscribeToken:
    """The token's content; :class:`errors.InvalidToken` when it is malformed, was not
    signed by one of the configured keys, or has expired."""
    match = _TOKEN.fullmatch(token.strip()) if isinstance(token, str) else None
    if match is None:
        raise errors.InvalidToken("malformed unsubscribe token")
    payload, mac = match.groups()
    try:
        given = _unb64(mac)
    except (binascii.Error, ValueError):
        raise errors.InvalidToken("malformed unsubscribe token") from None
    if not any(hmac.compare_digest(given, _mac(key, payload))
               for key in (config.key, *config.previous_keys)):
        raise errors.InvalidToken("unsubscribe token signature does not match")
    try:
        body = json.loads(_unb64(payload))
        result = UnsubscribeToken(
            user_id=str(body["u"]), email=str(body["e"]),
            task_id=int(body["t"]) if "t" in body else None,
            subtask_id=int(body["s"]) if "s" in body else None,
            expires_at=dt.datetime.fromtimestamp(int(body["x"]), dt.UTC))
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise errors.InvalidToken("malformed unsubscribe token payload") from None
    if result.expires_at <= (now or dt.datetime.now(dt.UTC)):
        raise errors.InvalidToken(f"unsubscribe token expired at {result.expires_at:%Y-%m-%d}")
    return result


def with_unsubscribe(config: UnsubscribeConfig,
                     renderer: Renderer = default_renderer) -> Renderer:
    """``renderer`` plus ``{{ unsubscribe_url }}`` and, for bulk tasks, the
    one-click headers. Pass the result as ``run_dispatcher(renderer=...)``."""

    def render(ctx: RenderContext) -> Rendered:
        token = make_token(config, ctx.user_id, ctx.email, task_id=ctx.task_id,
                           subtask_id=ctx.subtask_id)
        url = config.link(token) if config.url else config.mailto_uri(token)
        rendered = renderer(dataclasses.replace(
            ctx, variables={**ctx.variables, "unsubscribe_url": url}))
        if not ctx.template.list_unsubscribe:
            return rendered
        return dataclasses.replace(rendered, headers=rendered.headers + config.headers(token))

    return render


def unsubscribe(target: db.ConnOrDsn, config: UnsubscribeConfig, token: str, *,
                now: dt.datetime | None = None) -> UnsubscribeResult:
    """Verify ``token`` and unsubscribe its address from its user's mail (idempotent:
    a second call changes nothing and succeeds). ``target``: a connection (its
    transaction is used) or a DSN."""
    return core.run(target, unsubscribe_op(config, token, now))


def unsubscribe_op(config: UnsubscribeConfig, token: str,
                   now: dt.datetime | None = None) -> Op[UnsubscribeResult]:
    """The operation behind :func:`unsubscribe` and ``Scheduler.unsubscribe``."""
    t = verify_token(config, token, now=now)
    row = yield Fetch(query("unsubscribe"), (t.user_id, t.email, t.subtask_id, now))
    assert row is not None
    return UnsubscribeResult(t.user_id, t.email, bool(row[0]), bool(row[1]), int(row[2]))


def token_from_mailto(subject: str) -> str | None:
    """The token in the subject of a mail sent to the mailto address, if any."""
    match = re.search(r"v1\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{43}", subject or "")
    return match.group(0) if match else None


def unsubscribe_mailto(target: db.ConnOrDsn, config: UnsubscribeConfig, subject: str, *,
                       now: dt.datetime | None = None) -> UnsubscribeResult:
    """Unsubscribe from a mail received at the mailto address (its Subject)."""
    token = token_from_mailto(subject)
    if token is None:
        raise errors.InvalidToken("no unsubscribe token in the subject")
    return unsubscribe(target, config, token, now=now)


# ------------------------------------------------------------------ endpoints

_PAGE = ("<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title></head>"
         "<body><p>{text}</p>{form}</body></html>")
_FORM = ("<form method=\"post\"><input type=\"hidden\" name=\"token\" value=\"{token}\">"
         "<button type=\"submit\">Unsubscribe</button></form>")
MAX_BODY = 8192


def handle(target: db.ConnOrDsn, config: UnsubscribeConfig, method: str, query_string: str,
           body: bytes) -> tuple[int, str]:
    """The endpoint's logic, shared by the WSGI and ASGI apps: (status, html page)."""
    params = urllib.parse.parse_qs(query_string)
    if method == "POST":
        params.update(urllib.parse.parse_qs(body.decode("utf-8", "replace")))
    token = (params.get("token") or [""])[0]
    if method not in ("GET", "POST"):
        return 405, _PAGE.format(title="Method not allowed", text="Use GET or POST.", form="")
    try:
        verified = verify_token(config, token)
        if method == "GET":  # never unsubscribe on GET: link scanners follow links
            return 200, _PAGE.format(
                title="Unsubscribe",
                text=f"Unsubscribe {html.escape(verified.email)} from these emails?",
                form=_FORM.format(token=html.escape(token, quote=True)))
        unsubscribe(target, config, token)
    except errors.InvalidToken as exc:
        return 400, _PAGE.format(title="Invalid link", text=html.escape(str(exc)), form="")
    return 200, _PAGE.format(title="Unsubscribed", form="", text=(
        f"{html.escape(verified.email)} is unsubscribed. You will not receive these emails "
        "any more."))


_REASONS = {200: "OK", 400: "Bad Request", 405: "Method Not Allowed", 413: "Payload Too Large"}

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def wsgi_app(target: str, config: UnsubscribeConfig
             ) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    """A WSGI application serving the unsubscribe endpoint (``target``: a DSN)."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > MAX_BODY:
            status, page = 413, _PAGE.format(title="Too large", text="Request too large.",
                                             form="")
        else:
            body = environ["wsgi.input"].read(length) if length > 0 else b""
            status, page = handle(target, config, environ.get("REQUEST_METHOD", "GET"),
                                  environ.get("QUERY_STRING", ""), body)
        data = page.encode()
        start_response(f"{status} {_REASONS[status]}",
                       [("Content-Type", "text/html; charset=utf-8"),
                        ("Content-Length", str(len(data))), ("Cache-Control", "no-store")])
        return [data]

    return app


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def asgi_app(target: str, config: UnsubscribeConfig
             ) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """An ASGI application serving the unsubscribe endpoint (``target``: a DSN; the
    database call runs in a worker thread)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body, more = b"", True
        while more and len(body) <= MAX_BODY:
            message = await receive()
            body += message.get("body", b"")
            more = bool(message.get("more_body"))
        if len(body) > MAX_BODY:
            status, page = 413, _PAGE.format(title="Too large", text="Request too large.",
                                             form="")
        else:
            status, page = await asyncio.to_thread(
                handle, target, config, scope.get("method", "GET"),
                scope.get("query_string", b"").decode("latin-1"), body)
        data = page.encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/html; charset=utf-8"),
                                (b"content-length", str(len(data)).encode()),
                                (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": data})

    return app
