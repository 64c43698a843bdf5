"""The outbound guard of ``http`` jobs: where a job may connect, decided before it connects.

A URL's host is read once, the way the connection will use it: IDNA-encoded,
lower-cased, its trailing dot dropped, and — when it ends in a number — parsed
as an IPv4 address with every legacy spelling browsers and ``inet_aton``
accept (``2130706433``, ``0x7f000001``, ``0177.0.0.1``, ``127.1``). An address
is then refused when it is not a public unicast address (see
:data:`BLOCKED_NETWORKS`), IPv4-mapped, NAT64 and 6to4 forms being judged by
the IPv4 address they carry. ``localhost`` and names under ``.localhost`` are
loopback without asking DNS.

At the door (:func:`check_url`) only what the URL itself says is checked: an
address literal or a loopback name. At run time (:func:`resolve`) a host name
is resolved once, every address it resolves to is checked, and the caller
connects to one of those very addresses: nothing is looked up twice, so a
name cannot point somewhere else between the check and the connection.

The host's allowlist (:class:`Allowlist`, the ``jobs.http_allow`` setting)
may open networks or host names to every job, to platform jobs, or to one
user's jobs.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
import socket
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from edm_sched.jobs.models import deprecated_name

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

Resolver = Callable[[str, int], Sequence[str]]
"""``resolver(host, port)`` → the addresses (text) ``host`` resolves to; the runner's
DNS hook (default: :func:`system_resolver`)."""

MAX_REDIRECTS = 5
"""Most redirects one run follows (a job asks for 0 to this many with ``max_redirects``)."""

_N = ipaddress.ip_network
BLOCKED_NETWORKS: tuple[tuple[IPNetwork, str], ...] = (
    (_N("0.0.0.0/8"), "unspecified"),
    (_N("10.0.0.0/8"), "private"),
    (_N("100.64.0.0/10"), "carrier-grade NAT"),
    (_N("127.0.0.0/8"), "loopback"),
    (_N("169.254.0.0/16"), "link-local (cloud metadata)"),
    (_N("172.16.0.0/12"), "private"),
    (_N("192.0.0.0/24"), "reserved (IETF protocol assignments)"),
    (_N("192.0.2.0/24"), "reserved (documentation)"),
    (_N("192.88.99.0/24"), "reserved (6to4 relay)"),
    (_N("192.168.0.0/16"), "private"),
    (_N("198.18.0.0/15"), "reserved (benchmarking)"),
    (_N("198.51.100.0/24"), "reserved (documentation)"),
    (_N("203.0.113.0/24"), "reserved (documentation)"),
    (_N("224.0.0.0/4"), "multicast"),
    (_N("240.0.0.0/4"), "reserved (incl. broadcast)"),
    (_N("::/128"), "unspecified"),
    (_N("::1/128"), "loopback"),
    (_N("::/96"), "reserved (IPv4-compatible)"),
    (_N("64:ff9b:1::/48"), "reserved (local NAT64)"),
    (_N("100::/64"), "reserved (discard)"),
    (_N("2001::/23"), "reserved (IETF protocol assignments, Teredo)"),
    (_N("2001:db8::/32"), "reserved (documentation)"),
    (_N("fc00::/7"), "private (unique local)"),
    (_N("fe80::/10"), "link-local"),
    (_N("fec0::/10"), "private (site-local)"),
    (_N("ff00::/8"), "multicast"),
)
"""The networks an ``http`` job may not reach unless the host allows them, with the
name given in refusals. Anything else Python's :mod:`ipaddress` does not call
global is refused too (``not globally routable``)."""

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_LABELS = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")
_ALLOW_HOST = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*$")
_NUMBER = re.compile(r"^(0[xX][0-9a-fA-F]*|[0-9]+)$")


class Blocked(Exception):
    """A destination the guard refuses; the message names the host and the reason only."""


def parse_ipv4_number(host: str) -> ipaddress.IPv4Address | None:
    """``host`` as an IPv4 address when its last label is a number, else None.

    Follows the WHATWG URL standard's IPv4 parser: one to four parts, each
    decimal, ``0x`` hex or ``0``-prefixed octal; the last part fills the
    remaining bytes. A host that ends in a number but is no valid address
    raises :class:`Blocked` (a resolver might still read it as one).
    """
    parts = host.split(".")
    if parts and parts[-1] == "" and len(parts) > 1:
        parts = parts[:-1]
    if not parts or not _NUMBER.match(parts[-1]):
        return None
    if len(parts) > 4:
        raise Blocked(f"host {host!r} ends in a number but is not an IPv4 address")
    numbers: list[int] = []
    for part in parts:
        if not _NUMBER.match(part) and not re.match(r"^0[0-7]+$", part):
            raise Blocked(f"host {host!r} ends in a number but is not an IPv4 address")
        if part[:2] in ("0x", "0X"):
            numbers.append(int(part[2:] or "0", 16))
        elif len(part) > 1 and part[0] == "0":
            if not re.match(r"^[0-7]+$", part):
                raise Blocked(f"host {host!r} has an invalid octal part {part!r}")
            numbers.append(int(part, 8))
        else:
            numbers.append(int(part))
    if any(n > 255 for n in numbers[:-1]) or numbers[-1] >= 256 ** (5 - len(numbers)):
        raise Blocked(f"host {host!r} ends in a number but is not an IPv4 address")
    value = numbers[-1]
    for i, n in enumerate(numbers[:-1]):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def normalize_host(host: str) -> str:
    """The ASCII, lower-case form of a URL host, as it is resolved and sent (no trailing dot)."""
    if not host:
        raise Blocked("the URL has no host")
    if host.startswith("[") or ":" in host:
        return host.strip("[]").lower()
    try:
        ascii_host = host.encode("idna").decode("ascii").lower()
    except UnicodeError as exc:
        raise Blocked(f"host {host!r} is not a valid host name") from exc
    if ascii_host.endswith(".") and len(ascii_host) > 1:
        ascii_host = ascii_host[:-1]
    return ascii_host


def host_address(host: str) -> IPAddress | None:
    """The address a normalised host denotes by itself (a literal, in any spelling), or None."""
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise Blocked(f"host [{host}] is not a valid IPv6 address") from exc
    number = parse_ipv4_number(host)
    if number is not None:
        return number
    if not _HOST_LABELS.match(host):
        raise Blocked(f"host {host!r} is not a valid host name")
    return None


def is_loopback_name(host: str) -> bool:
    """``localhost`` and names under ``.localhost`` (RFC 6761): loopback without DNS."""
    return host == "localhost" or host.endswith(".localhost")


def classify(address: IPAddress) -> str | None:
    """Why ``address`` is refused (``loopback``, ``private``...), or None for a public address."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            address = ipaddress.IPv6Address(str(address).split("%")[0])
        embedded: ipaddress.IPv4Address | None = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            reason = classify(embedded)
            return None if reason is None else f"{reason}, as {embedded} inside an IPv6 address"
    for network, name in BLOCKED_NETWORKS:
        if address.version == network.version and address in network:
            return name
    if not address.is_global:
        return "not globally routable"
    return None


@dataclasses.dataclass(frozen=True)
class Allowlist:
    """Networks and host names the host opened to ``http`` jobs (the ``jobs.http_allow`` setting).

    ``all`` applies to every job, ``platform`` to jobs without a user,
    ``users[id]`` to that user's jobs (``tenants``, the older word, is read as
    ``users``). An entry is a network
    (``10.20.0.0/16``, ``127.0.0.1``, ``fd00::/8``) or a host name
    (``crm.intranet.example``, or ``*.intranet.example`` for the names under it).
    A host name entry lets that name resolve to refused addresses; a network
    entry lets any host reach addresses inside it.
    """

    all: tuple[str, ...] = ()
    platform: tuple[str, ...] = ()
    users: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    @classmethod
    def parse(cls, value: Any) -> Allowlist:
        """From the setting's JSON text (or the decoded object); ValueError when malformed."""
        if value is None or value == "":
            return cls()
        data = json.loads(value) if isinstance(value, str) else value
        if not isinstance(data, dict) or set(data) - {"all", "platform", "users", "tenants"}:
            raise ValueError('jobs.http_allow must be a JSON object with keys "all", '
                             '"platform" and "users"')
        users: dict[str, tuple[str, ...]] = {}
        for key in ("users", "tenants"):  # "tenants": the older word, merged
            per_user = data.get(key) or {}
            if not isinstance(per_user, dict):
                raise ValueError(f'jobs.http_allow: "{key}" must map user ids to lists')
            for u, v in per_user.items():
                users[str(u)] = users.get(str(u), ()) + _entries(v)
        return cls(all=_entries(data.get("all")), platform=_entries(data.get("platform")),
                   users=users)

    @property
    def tenants(self) -> Mapping[str, tuple[str, ...]]:
        """Deprecated: the older name of :attr:`users`."""
        deprecated_name("Allowlist.tenants", "users")
        return self.users

    def entries_for(self, user_id: str | None) -> tuple[str, ...]:
        extra = self.platform if user_id is None else self.users.get(user_id, ())
        return self.all + extra

    def scope(self, user_id: str | None) -> Scope:
        """The entries that apply to a job of ``user_id``, ready for lookups."""
        networks: list[IPNetwork] = []
        hosts: list[str] = []
        for entry in self.entries_for(user_id):
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.append(entry)
        return Scope(tuple(networks), tuple(hosts))


def _entries(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("jobs.http_allow: each list must hold strings")
    out: list[str] = []
    for entry in value:
        entry = entry.strip().lower()
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            if not _ALLOW_HOST.match(entry.rstrip(".")) or re.match(r"^[0-9.]+$", entry):
                raise ValueError(f"jobs.http_allow: {entry!r} is neither a network nor a "
                                 "host name") from None
            entry = entry.rstrip(".")
        out.append(entry)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Scope:
    """The allowlist entries of one job."""

    networks: tuple[IPNetwork, ...] = ()
    hosts: tuple[str, ...] = ()

    def allows_host(self, host: str) -> bool:
        for entry in self.hosts:
            if entry.startswith("*."):
                if host.endswith(entry[1:]):
                    return True
            elif host == entry:
                return True
        return False

    def allows_address(self, address: IPAddress) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None \
                and self.allows_address(address.ipv4_mapped):
            return True
        return any(address.version == n.version and address in n for n in self.networks)


NO_SCOPE = Scope()


@dataclasses.dataclass(frozen=True)
class Target:
    """A checked URL: scheme, normalised host, port, and the request path with its query."""

    scheme: str
    host: str
    port: int
    path: str
    address: IPAddress | None  # set when the URL names an address

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)

    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def parse_url(url: str) -> Target:
    """Split an absolute http(s) URL into what the guard checks; :class:`Blocked` if unusable."""
    if "\\" in url or any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise Blocked("the URL contains a backslash, a space or a control character")
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise Blocked(f"only http and https URLs are allowed, not {scheme or 'none'!r}")
    if "@" in parts.netloc:
        raise Blocked("credentials in the URL are not allowed (use basic_auth with a "
                      "password_ref)")
    try:
        port = parts.port
    except ValueError as exc:
        raise Blocked("the URL has an invalid port") from exc
    raw_host = parts.hostname or ""
    if "%" in raw_host and ":" not in raw_host:
        raise Blocked("percent-encoded host names are not allowed")
    host = normalize_host(raw_host)
    address = host_address(host)
    if address is not None:
        host = str(address) if address.version == 4 else host
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(scheme, host, port or (443 if scheme == "https" else 80), path, address)


def check_target(target: Target, scope: Scope) -> None:
    """Refuse what the URL itself says is off limits: a refused address literal, a loopback name."""
    if scope.allows_host(target.host):
        return
    if target.address is not None:
        reason = classify(target.address)
        if reason is not None and not scope.allows_address(target.address):
            raise Blocked(f"{target.host} is refused ({reason})")
    elif is_loopback_name(target.host):
        loopback = ipaddress.IPv4Address("127.0.0.1")
        if not scope.allows_address(loopback):
            raise Blocked(f"{target.host} is refused (loopback name)")


def check_url(url: str, scope: Scope = NO_SCOPE) -> Target:
    """The door's check of a URL (no DNS); returns the parsed target, raises :class:`Blocked`."""
    target = parse_url(url)
    check_target(target, scope)
    return target


def system_resolver(host: str, port: int) -> list[str]:
    """The system's answer for ``host`` (``getaddrinfo``), addresses in its order, deduplicated."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[str] = []
    for info in infos:
        address = str(info[4][0])
        if address not in seen:
            seen.append(address)
    return seen


def resolve(target: Target, scope: Scope, resolver: Resolver) -> list[IPAddress]:
    """The addresses to connect to, every one checked; :class:`Blocked` if any is refused.

    A literal is its own answer; ``localhost`` names are loopback; any other
    name is resolved exactly once, through ``resolver``.
    """
    check_target(target, scope)
    if target.address is not None:
        return [target.address]
    host_allowed = scope.allows_host(target.host)
    if is_loopback_name(target.host):
        return [ipaddress.IPv4Address("127.0.0.1")]
    try:
        answers = list(resolver(target.host, target.port))
    except (OSError, UnicodeError) as exc:
        raise LookupError(f"cannot resolve {target.host}: {exc}") from exc
    if not answers:
        raise LookupError(f"cannot resolve {target.host}: no address")
    addresses: list[IPAddress] = []
    for text in answers:
        try:
            address = ipaddress.ip_address(text)
        except ValueError as exc:
            raise Blocked(f"{target.host} resolved to {text!r}, not an address") from exc
        reason = classify(address)
        if reason is not None and not host_allowed and not scope.allows_address(address):
            raise Blocked(f"{target.host} resolves to {address}, refused ({reason})")
        addresses.append(address)
    return addresses


def parse_user_list(value: Any) -> frozenset[str]:
    """The ``jobs.shell_users`` setting: a JSON array of user ids (``"*"``: every user)."""
    if value is None or value == "":
        return frozenset()
    data = json.loads(value) if isinstance(value, str) else value
    if not isinstance(data, list) or not all(isinstance(t, str) and t for t in data):
        raise ValueError("jobs.shell_users must be a JSON array of user ids")
    return frozenset(data)


def parse_tenant_list(value: Any) -> frozenset[str]:
    """Deprecated: the older name of :func:`parse_user_list`."""
    deprecated_name("parse_tenant_list", "parse_user_list")
    return parse_user_list(value)


def refused_ranges() -> Iterable[tuple[str, str]]:
    """(network, reason) rows of :data:`BLOCKED_NETWORKS`, for documentation and the CLI."""
    return ((str(n), name) for n, name in BLOCKED_NETWORKS)


__all__ = [
    "BLOCKED_NETWORKS",
    "MAX_REDIRECTS",
    "Allowlist",
    "Blocked",
    "Resolver",
    "Scope",
    "Target",
    "check_target",
    "check_url",
    "classify",
    "parse_ipv4_number",
    "parse_tenant_list",
    "parse_url",
    "parse_user_list",
    "resolve",
    "system_resolver",
]
