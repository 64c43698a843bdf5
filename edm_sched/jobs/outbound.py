"""The ``http`` job kind: one guarded request, connected to the address that was checked.

Each hop of a run (the URL, then any redirect the job allows) goes through the
same steps: parse and check the URL (:mod:`edm_sched.jobs.guard`), resolve the
host once through the runner's resolver, check every answer, then open a TCP
connection to one of those checked addresses with :mod:`http.client` while
the ``Host`` header and the TLS server name (SNI, certificate check) keep the
URL's host name. Nothing consults ``HTTP_PROXY`` and friends: a proxy would
be a destination the guard had not checked.

Bounds: the whole run (every hop, connection, TLS handshake, headers and
body) stops at ``timeout_seconds`` or the job's timeout, whichever is first,
even against a server that trickles bytes; at most ``max_response_bytes`` of
the body are read. Secrets named by ``SecretRef`` header values and
``basic_auth.password_ref`` are resolved just before the first hop, dropped on
a redirect to another origin, and scrubbed from anything recorded.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import http.client
import ipaddress
import json
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable

from edm_sched.jobs import guard
from edm_sched.jobs.models import HttpTarget, SecretRef

SecretResolver = Callable[[str, "str | None"], "str | None"]
"""``resolver(secret_ref, user_id)`` → the secret, or None when unknown.

The user is given so that a user's job can only reach that user's
secrets: a resolver must never answer a user's job with the platform's or
another user's secret."""

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK = 16384
_BODY_KEPT = 2000


@dataclasses.dataclass(frozen=True)
class HttpSettings:
    """What the runner gives every ``http`` run: DNS, secrets, TLS and the allowlist."""

    resolver: guard.Resolver = guard.system_resolver
    secrets: SecretResolver | None = None
    allowlist: guard.Allowlist = dataclasses.field(default_factory=guard.Allowlist)
    ssl_context: ssl.SSLContext | None = None


@dataclasses.dataclass
class HttpResult:
    """How a run ended, before it becomes an Outcome (kept free of the kinds module)."""

    status: int | None = None
    body: bytes = b""
    bytes_read: int = 0
    truncated: bool = False
    redirects: int = 0
    url: str = ""
    error: str | None = None
    error_kind: str | None = None
    timed_out: bool = False


class _Watch:
    """Stops a run at its deadline or on cancellation by shutting its sockets down."""

    def __init__(self, deadline: float, cancel: threading.Event) -> None:
        self.deadline = deadline
        self.cancel = cancel
        self.fired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="edm-http-watch")
        self._thread.start()

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def add(self, sock: socket.socket) -> None:
        dup = sock.dup()
        with self._lock:
            self._socks.append(dup)
            if self.fired:
                self._shutdown(dup)

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def _run(self) -> None:
        while not self._done.wait(min(0.05, self.remaining())):
            if self.cancel.is_set() or time.monotonic() >= self.deadline:
                with self._lock:
                    self.fired = True
                    for sock in self._socks:
                        self._shutdown(sock)
                return

    def close(self) -> None:
        self._done.set()
        with self._lock:
            for sock in self._socks:
                with contextlib.suppress(OSError):
                    sock.close()
            self._socks.clear()


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to ``host`` that opens its socket to one checked address."""

    def __init__(self, host: str, port: int, *, address: str, timeout: float,
                 watch: _Watch) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address
        self._watch = watch

    def _open(self) -> socket.socket:
        sock = socket.create_connection((self._address, self.port),
                                        max(0.01, self._watch.remaining()))
        self._watch.add(sock)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def connect(self) -> None:
        self.sock = self._open()


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    """The same over TLS; SNI and the certificate check use the URL's host name."""

    default_port = 443

    def __init__(self, host: str, port: int, *, address: str, timeout: float,
                 watch: _Watch, context: ssl.SSLContext) -> None:
        super().__init__(host, port, address=address, timeout=timeout, watch=watch)
        self._context = context

    def connect(self) -> None:
        sock = self._open()
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _resolve_secrets(target: HttpTarget, user_id: str | None,
                     resolver: SecretResolver | None
                     ) -> tuple[dict[str, str], set[str], list[str]]:
    """Headers with secrets filled in, the names of secret-bearing headers, and the
    strings to scrub. ValueError (naming the reference, never a value) when one is missing."""
    headers: dict[str, str] = {}
    secret_headers: set[str] = set()
    scrub: list[str] = []

    def lookup(ref: str) -> str:
        value = resolver(ref, user_id) if resolver is not None else None
        if value is None:
            raise ValueError(f"no secret for secret_ref {ref!r}" + (
                "" if resolver is not None else " (this runner has no secret resolver)"))
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise ValueError(f"the secret of secret_ref {ref!r} contains control characters")
        if value:
            scrub.append(value)
        return value

    for name, value in target.headers.items():
        if isinstance(value, SecretRef):
            headers[name] = value.prefix + lookup(value.secret_ref)
            secret_headers.add(name.lower())
        else:
            headers[name] = value
    if target.basic_auth is not None:
        password = lookup(target.basic_auth.password_ref)
        token = base64.b64encode(
            f"{target.basic_auth.username}:{password}".encode()).decode("ascii")
        headers["Authorization"] = "Basic " + token
        secret_headers.add("authorization")
        scrub.append(token)
    for value in list(scrub):
        for form in (json.dumps(value)[1:-1], urllib.parse.quote(value, safe=""),
                     urllib.parse.quote_plus(value, safe="")):
            if form != value:
                scrub.append(form)
    return headers, secret_headers, scrub


def scrub_text(text: str, secrets: list[str]) -> str:
    """``text`` with every secret (and its JSON/URL-escaped forms) replaced by ``[secret]``."""
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, "[secret]")
    return text


def _body(target: HttpTarget) -> tuple[bytes | None, str | None]:
    if isinstance(target.body, dict | list):
        return json.dumps(target.body).encode("utf-8"), "application/json"
    if isinstance(target.body, str):
        return target.body.encode("utf-8"), None
    return None, None


def request(target: HttpTarget, *, user_id: str | None, timeout: float,
            cancel: threading.Event, settings: HttpSettings) -> tuple[HttpResult, list[str]]:
    """Run one guarded request (following allowed redirects); never raises for I/O.

    Returns the result and the secrets to scrub from anything recorded.
    """
    result = HttpResult(url=target.url)
    try:
        headers, secret_headers, secrets = _resolve_secrets(target, user_id, settings.secrets)
    except ValueError as exc:
        result.error, result.error_kind = str(exc), "config"
        return result, []
    body, content_type = _body(target)
    if content_type is not None and not any(n.lower() == "content-type" for n in headers):
        headers["Content-Type"] = content_type
    scope = settings.allowlist.scope(user_id)
    watch = _Watch(time.monotonic() + timeout, cancel)
    method = target.method
    url = target.url
    first_origin: tuple[str, str, int] | None = None
    try:
        while True:
            try:
                checked = guard.parse_url(url)
                if first_origin is None:
                    first_origin = checked.origin
                elif checked.origin != first_origin and secret_headers:
                    headers = {n: v for n, v in headers.items()
                               if n.lower() not in secret_headers}
                    secret_headers = set()
                addresses = guard.resolve(checked, scope, settings.resolver)
            except guard.Blocked as exc:
                result.error, result.error_kind = f"destination refused: {exc}", "blocked"
                return result, secrets
            except LookupError as exc:
                result.error, result.error_kind = f"HTTP connection failed: {exc}", "connection"
                return result, secrets
            response_or_error = _exchange(checked, addresses, method, body, headers,
                                          target.max_response_bytes, watch, settings, result)
            if response_or_error is None:
                return result, secrets
            location = response_or_error
            if result.redirects >= target.max_redirects:
                return result, secrets
            result.redirects += 1
            url = urllib.parse.urljoin(url, location)
            result.url = url
            if result.status == 303 or (result.status in (301, 302) and method == "POST"):
                if method != "HEAD":
                    method = "GET"
                body = None
                headers = {n: v for n, v in headers.items() if n.lower() != "content-type"}
    finally:
        watch.close()


def _exchange(checked: guard.Target, addresses: list[guard.IPAddress], method: str,
              body: bytes | None, headers: dict[str, str], max_bytes: int, watch: _Watch,
              settings: HttpSettings, result: HttpResult) -> str | None:
    """One request/response on a connection to a checked address. Fills ``result``;
    returns the Location of a redirect to follow, else None."""
    conn: _PinnedHTTPConnection | None = None
    last_error: OSError | None = None
    try:
        for address in addresses:
            text = str(address).split("%")[0] if isinstance(address, ipaddress.IPv6Address) \
                else str(address)
            if checked.scheme == "https":
                context = settings.ssl_context or ssl.create_default_context()
                conn = _PinnedHTTPSConnection(checked.host, checked.port, address=text,
                                              timeout=watch.remaining(), watch=watch,
                                              context=context)
            else:
                conn = _PinnedHTTPConnection(checked.host, checked.port, address=text,
                                             timeout=watch.remaining(), watch=watch)
            try:
                conn.connect()
                break
            except ssl.SSLError as exc:
                last_error = exc
                conn.close()
                conn = None
                break  # a TLS failure is not cured by another address
            except OSError as exc:
                last_error = exc
                conn.close()
                conn = None
                if watch.fired:
                    break
        if conn is None:
            _failed(result, watch, str(last_error))
            return None
        conn.request(method, checked.path, body=body, headers=headers)
        response = conn.getresponse()
        if watch.fired:  # what was read before the sockets were shut down is not a response
            _timed_out(result, watch)
            return None
        result.status = int(response.status)
        location = response.getheader("Location")
        if result.status in REDIRECT_STATUSES and location:
            response.close()
            return location
        data = bytearray()
        while len(data) < max_bytes:
            chunk = response.read(min(_CHUNK, max_bytes - len(data)))
            if not chunk:
                break
            data += chunk
        result.truncated = len(data) >= max_bytes and bool(response.read(1)) \
            if max_bytes else bool(response.read(1))
        if watch.fired:
            _timed_out(result, watch)
            return None
        result.body = bytes(data)
        result.bytes_read = len(data)
        return None
    except (OSError, http.client.HTTPException) as exc:
        _failed(result, watch, f"{type(exc).__name__}: {exc}")
        return None
    finally:
        if conn is not None:
            conn.close()


def _failed(result: HttpResult, watch: _Watch, error: str) -> None:
    """A connection that failed: a time-out (or cancellation) when the watch fired, for the
    watch shuts the sockets down; else a connection error."""
    if watch.fired:
        _timed_out(result, watch)
    else:
        result.error, result.error_kind = f"HTTP connection failed: {error}", "connection"


def _timed_out(result: HttpResult, watch: _Watch) -> None:
    if watch.cancel.is_set():
        result.error, result.error_kind = "HTTP request stopped: execution cancelled", "cancelled"
    else:
        result.error, result.error_kind = "HTTP request timed out", "timeout"
        result.timed_out = True


__all__ = ["REDIRECT_STATUSES", "HttpResult", "HttpSettings", "SecretResolver", "request",
           "scrub_text"]
