"""Rendering: template + recipient variables → an RFC 5322 message.

The default renderer runs Jinja2's ``SandboxedEnvironment`` (templates are
written by the platform's customers: no attribute access to Python internals)
with ``StrictUndefined``, so a variable missing for one recipient is a clear
error for that recipient — use ``{{ name | default('there') }}`` for optional
ones. HTML bodies are autoescaped. A host renders itself by passing its own
``Renderer`` to ``run_dispatcher(renderer=...)``.

Messages are assembled by hand, not through :class:`email.message.EmailMessage`:
under ``email.policy.SMTP`` every header assignment is parsed into a
structured header and refolded, 0.8-2.3 ms of Python per message, the
dispatcher's largest CPU cost. ``build_message`` writes its dozen header
lines itself and takes only the encoders from the standard library
(``base64``, ``binascii.b2a_qp``), 25-100 us per message, 20-35x less
(``python -m benchmarks render``). Header values that repeat (the From line
of a template and service, a subject without variables) are cached. The
rules, the email package's except where noted:

* Header text (Subject, the From display name): printable ASCII as is,
  folded before a space to keep lines within 78 columns (a display name that
  is not plain atoms becomes a quoted-string); anything else (other
  characters, leading or trailing spaces, a literal ``=?``, a word too long
  to fold) as RFC 2047 encoded-words: utf-8, Q or B whichever is shorter,
  whole characters per word. (``email.policy.default``'s parser reads a
  space where a long display name was split into two encoded-words;
  RFC 2047 decoders do not.)
* Bodies: utf-8, line ends CRLF with one at the end, as ``set_content`` does.
  7bit when the part is printable ASCII in lines of at most 78 octets;
  otherwise base64 when more than a sixth of the octets are non-ASCII
  (Cyrillic, Greek, CJK: smaller than QP), else quoted-printable. The
  message is 7-bit (the email package sent short non-ASCII lines as 8bit).
  Text and html together make a multipart/alternative, text first; its
  random boundary is checked against both parts.
* Addresses outside ASCII (SMTPUTF8: the SQL accepts them, the SMTP
  transport negotiates it) have no ASCII form: when the envelope sender or
  recipient, i.e. the From or To address, is not ASCII the header block is
  UTF-8 (RFC 6532), and such a message only leaves through a server offering
  SMTPUTF8 (the transport checks). A non-ASCII Reply-To in a message with an
  ASCII envelope is a ``RenderError``.

Header injection is impossible by construction: a header-bound value (the
subject, the display name, each address) containing NUL or any character
``str.splitlines()`` breaks on (CR, LF, VT, FF, NEL, U+2028...) is a
``RenderError``; text is written as printable ASCII or as encoded-words,
neither of which can hold a line break; an address must be one bare
addr-spec (no whitespace, control characters or specials but its @), so it
cannot add a recipient either; the ids are formatted as integers. A
rendering error fails only that subtask (permanently, with the reason).

Custom header fields come from the service (``settings["headers"]``), the task
(``TemplateRow.headers``) and the renderer (``Rendered.headers``, e.g. the
one-click unsubscribe pair of :mod:`edm_sched.unsubscribe`), in that order, a
later field replacing an earlier one of the same name. Each is checked again
by :func:`header_problem` (the door checks them first): a caller may not set
the fields edm-sched writes or relays write (:data:`FORBIDDEN_HEADERS`).
Values go out as header text (folded, encoded-words outside ASCII);
``List-Unsubscribe`` is written as a list of URIs, folded after its commas.

At the door (:mod:`edm_sched.models`), :func:`check_template` compiles every
template with the environment and cache the dispatcher renders with, and
:func:`required_variables` reads the variables a template needs from its
syntax tree (for ``strict_variables``).
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import functools
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.meta
import jinja2.nodes
import jinja2.sandbox

from edm_sched.transports.base import Message, ServiceConfig

Headers = tuple[tuple[str, str], ...]
"""Extra header fields as (name, value) pairs, in order."""


@dataclass(frozen=True)
class TemplateRow:
    subject: str
    body_text: str | None
    body_html: str | None
    from_name: str | None = None
    reply_to: str | None = None
    headers: Headers = ()  # the task's own header fields (validated at the door)
    list_unsubscribe: bool = True  # False: a transactional task, no List-Unsubscribe


@dataclass(frozen=True)
class RenderContext:
    subtask_id: int
    task_id: int
    user_id: str
    email: str
    variables: Mapping[str, Any]
    template: TemplateRow


@dataclass(frozen=True)
class Rendered:
    subject: str
    text: str | None
    html: str | None
    headers: Headers = ()  # set by the renderer, e.g. List-Unsubscribe (edm_sched.unsubscribe)


Renderer = Callable[[RenderContext], Rendered]


class RenderError(Exception):
    """A template could not be rendered for one recipient."""


_text_env = jinja2.sandbox.SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)
_html_env = jinja2.sandbox.SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=True)


@functools.lru_cache(maxsize=4096)
def _compile(source: str, html: bool) -> jinja2.Template:
    return (_html_env if html else _text_env).from_string(source)


@functools.lru_cache(maxsize=4096)
def _globals(template: jinja2.Template) -> dict[str, Any]:
    """The template's globals (the environment's: ``range``, ``dict``, ``namespace``,
    ...) as one plain dict, made once per compiled template."""
    return dict(template.globals)


def _render_compiled(template: jinja2.Template, variables: Mapping[str, Any]) -> str:
    """``template.render(variables)`` without its per-call copy of the globals.

    ``Template.render`` builds each context from a ``ChainMap`` of the template's
    and the environment's globals, iterated afresh on every call: two thirds of
    a short template's rendering (10.6 against 3.9 us for a subject line). The
    context here is the same names over a dict of the globals made once
    (:func:`_globals`); the recipient's variables win over a global of the same
    name, as in ``render``. The context is made as ``Template.new_context(...,
    shared=True)`` makes it, but handed the globals' dict rather than the ``ChainMap``,
    which it would iterate again for the names of the globals. Errors are raised as
    ``render`` raises them."""
    env = template.environment
    glob = _globals(template)
    context = env.context_class(env, {**glob, **variables}, template.name, template.blocks,
                                globals=glob)
    try:
        return template.environment.concat(template.root_render_func(context))
    except Exception:
        template.environment.handle_exception()  # raises the rewritten exception


def _plain(source: str) -> bool:
    """True when ``source`` has no template syntax (no ``{``) and no CR: Jinja would
    give it back as is, less one trailing newline, so compiling it (seconds of CPU
    for a multi-megabyte body) can be skipped."""
    return "{" not in source and "\r" not in source


def _render(source: str, html: bool, variables: Mapping[str, Any]) -> str:
    if _plain(source):
        return source[:-1] if source.endswith("\n") else source  # Jinja's trailing rule
    return _render_compiled(_compile(source, html), variables)


# ------------------------------------------------------------- at the door

BUILTIN_VARIABLES = frozenset({"email", "unsubscribe_url"})
"""Variables every recipient has: its address, and the one-click unsubscribe URL
(set by :func:`edm_sched.unsubscribe.with_unsubscribe`)."""

_OPTIONAL_FILTERS = frozenset({"default", "d"})  # {{ x | default('...') }} makes x optional
_OPTIONAL_TESTS = frozenset({"defined", "undefined", "none"})


def check_template(source: str, *, html: bool) -> None:
    """Compile ``source`` with the renderer's sandboxed environment (cached, so the
    dispatcher reuses the result); raises :class:`jinja2.TemplateSyntaxError`."""
    if not _plain(source):
        _compile(source, html)


def required_variables(source: str, *, html: bool = False) -> frozenset[str]:
    """Variables ``source`` needs from every recipient: those it reads anywhere but
    as the subject of a ``default`` filter, less those it tests with ``is defined``
    (or ``undefined``, ``none``) and the built-in ones (:data:`BUILTIN_VARIABLES`)."""
    env = _html_env if html else _text_env
    ast = env.parse(source)
    required: set[str] = set()

    def walk(node: jinja2.nodes.Node, guarded: bool) -> None:
        if isinstance(node, jinja2.nodes.Name) and node.ctx == "load":
            if not guarded:
                required.add(node.name)
            return
        if isinstance(node, jinja2.nodes.Filter) and node.name in _OPTIONAL_FILTERS:
            if node.node is not None:
                walk(node.node, True)
            for child in node.iter_child_nodes(exclude=("node",)):
                walk(child, False)
            return
        for child in node.iter_child_nodes():
            walk(child, False)

    walk(ast, False)
    tested = {n.node.name for n in ast.find_all(jinja2.nodes.Test)
              if n.name in _OPTIONAL_TESTS and isinstance(n.node, jinja2.nodes.Name)}
    # find_undeclared_variables leaves out loop variables and {% set %} names
    undeclared = jinja2.meta.find_undeclared_variables(ast)
    return frozenset((required - tested) & undeclared - BUILTIN_VARIABLES)


def default_renderer(ctx: RenderContext) -> Rendered:
    """Render subject and bodies with the sandboxed Jinja2 environment."""
    variables = {"email": ctx.email, **ctx.variables}
    try:
        t = ctx.template
        return Rendered(
            subject=_render(t.subject, False, variables),
            text=None if t.body_text is None else _render(t.body_text, False, variables),
            html=None if t.body_html is None else _render(t.body_html, True, variables),
        )
    except jinja2.TemplateError as exc:
        raise RenderError(f"template error: {type(exc).__name__}: {exc}") from exc


def message_id(subtask_id: int, task_id: int, sender: str) -> str:
    """Deterministic Message-ID: a resend after a crash carries the same id (dedupe downstream)."""
    domain = sender.rpartition("@")[2] or "edm-sched.invalid"
    return f"<edm.{task_id}.{subtask_id}@{domain}>"


# ------------------------------------------------------------------ the message

_MAX_LINE = 78  # header lines are folded to this (RFC 5322's SHOULD); bodies to 76 or 78
# NUL and every character str.splitlines() breaks a line on: refused in any header value.
_HEADER_BREAK = re.compile("[\x00\n\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
# One bare addr-spec: no whitespace, control characters or RFC 5322 specials but the one @.
_ADDR_CHARS = r'[^\s\x00-\x1f\x7f-\x9f@<>(),;:"\[\]\\]+'
_ADDR_SPEC = re.compile(f"{_ADDR_CHARS}@{_ADDR_CHARS}")
_PRINTABLE = re.compile("[ -~]*")
_ATOMS = re.compile(r"[\w!#$%&'*+/=?^`{|}~-]+(?: [\w!#$%&'*+/=?^`{|}~-]+)*", re.ASCII)
_WORDS = re.compile(" *[^ ]+")  # fold points: before a run of spaces
# RFC 2047 "Q": letters, digits and !*+-/ as themselves (what a phrase allows), space as _.
_Q_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/ ")
_Q_COST = [1 if b in _Q_SAFE else 3 for b in range(256)]
_Q_TABLE = {b: "_" if b == 0x20 else f"={b:02X}"
            for b in range(256) if b == 0x20 or b not in _Q_SAFE}
_EW_OVERHEAD = len("=?utf-8?q??=")
_CTRL_IN_HEADER = re.compile("[\x00-\x08\x0a-\x1f\x7f]")  # C0 controls but TAB, and DEL
_BODY_CTRL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_HIGH_BYTES = bytes(range(128, 256))


# Header fields a caller (a task's or a service's custom headers) may not set:
# edm-sched writes them itself (addresses, ids, dates, MIME structure, its own
# X-Edm-* and the one-click unsubscribe pair), or only relays may write them
# (trace and authentication fields: a sender that writes them forges them).
MANAGED_HEADERS = frozenset({
    "from", "to", "cc", "bcc", "subject", "reply-to", "sender", "message-id", "date",
    "mime-version", "content-type", "content-transfer-encoding", "content-disposition",
    "content-id", "list-unsubscribe", "list-unsubscribe-post",
})
FORBIDDEN_HEADERS = MANAGED_HEADERS | frozenset({
    "return-path", "received", "received-spf", "authentication-results", "dkim-signature",
    "domainkey-signature", "arc-seal", "arc-message-signature", "arc-authentication-results",
    "delivered-to", "x-original-to", "bounces-to", "errors-to",
})
FORBIDDEN_HEADER_PREFIXES = ("resent-", "x-edm-")
MAX_HEADERS = 50  # custom header fields per task or service
MAX_HEADER_VALUE = 900  # characters of one custom header value
_HEADER_NAME = re.compile(r"[!-9;-~]{1,76}")  # RFC 5322 ftext: printable ASCII but ':'


def header_problem(name: str, value: str, *, managed: bool = False) -> str | None:
    """Why ``name: value`` may not be added to a message, or None.

    ``managed=True`` lets a renderer (not a caller) set the fields edm-sched
    manages on the caller's behalf (List-Unsubscribe and List-Unsubscribe-Post).
    """
    if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
        return f"header name {name!r:.80} is not 1-76 printable ASCII characters without ':'"
    lower = name.lower()
    allowed = managed and lower in ("list-unsubscribe", "list-unsubscribe-post")
    if not allowed and (lower in FORBIDDEN_HEADERS
                        or lower.startswith(FORBIDDEN_HEADER_PREFIXES)):
        return f"header {name} is set by edm-sched or by relays and may not be given"
    if not isinstance(value, str):
        return f"header {name}: the value must be a string"
    if header_break(value):
        return f"header {name}: the value contains a line break, NUL or a control character"
    if len(value) > MAX_HEADER_VALUE:
        return f"header {name}: the value is longer than {MAX_HEADER_VALUE} characters"
    return None


def check_headers(headers: Mapping[str, str], what: str) -> None:
    """Raise ValueError naming the first problem of a custom header mapping."""
    if len(headers) > MAX_HEADERS:
        raise ValueError(f"{what}: at most {MAX_HEADERS} header fields, got {len(headers)}")
    seen: set[str] = set()
    for name, value in headers.items():
        problem = header_problem(name, value)
        if problem:
            raise ValueError(f"{what}: {problem}")
        if name.lower() in seen:
            raise ValueError(f"{what}: header {name} is given twice")
        seen.add(name.lower())


def header_break(value: str) -> bool:
    """True when ``value`` holds a line break (CR, LF, VT, FF, NEL, U+2028...), NUL or
    another control character but TAB: it may not go into a header field."""
    return bool(_HEADER_BREAK.search(value) or _CTRL_IN_HEADER.search(value))


def _single_line(what: str, value: str) -> str:
    if _HEADER_BREAK.search(value):
        raise RenderError(f"{what} contains a line break or NUL: {value!r:.100}")
    return value


def _address(what: str, value: str, utf8: bool) -> str:
    """``value`` if it is one bare address that may go in this message's headers."""
    _single_line(what, value)
    if len(value) > 254 or not _ADDR_SPEC.fullmatch(value):
        raise RenderError(f"{what} is not a single plain address: {value!r:.100}")
    if not (utf8 or value.isascii()):
        raise RenderError(f"{what} {value!r:.100} is not ASCII but the envelope is: the message "
                          "would leave without SMTPUTF8")
    return value


def _encoded_words(text: str, first: int) -> list[str]:
    """``text`` as RFC 2047 encoded-words holding whole characters: Q or B, whichever is
    shorter; the first word at most ``first`` characters long, the others at most 75."""
    data = text.encode()
    use_q = sum(_Q_COST[b] for b in data) <= 4 * ((len(data) + 2) // 3)
    words: list[str] = []
    chunk, size, room = bytearray(), 0, first - _EW_OVERHEAD
    for char in text:
        octets = char.encode()
        cost = sum(_Q_COST[b] for b in octets) if use_q else len(octets)
        if chunk and size + cost > (room if use_q else room // 4 * 3):
            words.append(_encoded_word(bytes(chunk), use_q))
            chunk, size, room = bytearray(), 0, 75 - _EW_OVERHEAD
        chunk += octets
        size += cost
    if chunk:
        words.append(_encoded_word(bytes(chunk), use_q))
    return words


def _encoded_word(octets: bytes, q: bool) -> str:
    if q:
        return f"=?utf-8?q?{octets.decode('latin-1').translate(_Q_TABLE)}?="
    return f"=?utf-8?b?{base64.b64encode(octets).decode('ascii')}?="


def _fold(prefix: str, segments: list[str]) -> list[str]:
    """Header lines: ``prefix`` then the segments (each but the first starting with the
    whitespace before it), a new line before a segment that would pass 78 columns."""
    lines = [prefix]
    for segment in segments:
        if len(lines[-1]) + len(segment) > _MAX_LINE:
            lines.append(segment)
        else:
            lines[-1] += segment
    return lines


@functools.lru_cache(maxsize=4096)
def _text_header(name: str, value: str, phrase: bool) -> str:
    """``Name: value`` (unstructured text, or a display name when ``phrase``), folded.

    Printable ASCII goes as is (a display name that is not plain atoms as a
    quoted-string), folded before a space; anything else — other characters,
    leading or trailing spaces, ``=?``, a word too long to fold — as encoded-words.
    """
    prefix = f"{name}:"
    if _PRINTABLE.fullmatch(value) and "=?" not in value:
        text = value if not phrase or _ATOMS.fullmatch(value) else _quoted(value)
        if text[:1] != " " and text[-1:] != " ":
            lines = _fold(prefix, [" " + w if i == 0 else w
                                   for i, w in enumerate(_WORDS.findall(text))])
            if max(map(len, lines)) <= _MAX_LINE:
                return "\r\n".join(lines)
    words = _encoded_words(value, _MAX_LINE - len(prefix) - 1)
    return "\r\n".join(_fold(prefix, [" " + w for w in words]))


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@functools.lru_cache(maxsize=1024)
def _mailbox(name: str, display: str | None, address: str) -> str:
    """``Name: address`` or ``Name: display-name <address>``."""
    if not display:
        return f"{name}: {address}"
    head = _text_header(name, display, True)
    fits = len(head) - head.rfind("\n") - 1 + len(address) + 3 <= _MAX_LINE
    return head + (" <" if fits else "\r\n <") + address + ">"


def _encode_body(text: str) -> tuple[str, bytes]:
    """(Content-Transfer-Encoding, encoded body) of a utf-8 text part; line ends CRLF."""
    lines = text.encode().splitlines()  # CRLF, CR or LF, as set_content() does
    body = b"\r\n".join(lines) + b"\r\n"
    if (body.isascii() and max(map(len, lines), default=0) <= _MAX_LINE
            and not _BODY_CTRL.search(body)):
        return "7bit", body
    if 6 * (len(body) - len(body.translate(None, _HIGH_BYTES))) > len(body):
        encoded = base64.b64encode(body)
        return "base64", b"".join(encoded[i:i + 76] + b"\r\n" for i in range(0, len(encoded), 76))
    return "quoted-printable", binascii.b2a_qp(b"\n".join(lines) + b"\n").replace(b"\n", b"\r\n")


def _boundary(parts: list[bytes]) -> str:
    """A multipart boundary found in none of the parts ("=_" never occurs in QP or base64)."""
    while True:
        boundary = "=_" + secrets.token_hex(12)
        if not any(boundary.encode() in part for part in parts):
            return boundary


def _mime(head: list[str], text: str | None, html: str | None) -> bytes:
    """Append the MIME headers to ``head``; return the blank line and the body."""
    parts = [(subtype, *_encode_body(body))
             for subtype, body in (("plain", text), ("html", html)) if body is not None]
    if not parts:
        return b"\r\n"
    head.append("MIME-Version: 1.0")
    if len(parts) == 1:
        subtype, cte, body = parts[0]
        head += [f'Content-Type: text/{subtype}; charset="utf-8"',
                 f"Content-Transfer-Encoding: {cte}"]
        return b"\r\n" + body
    boundary = _boundary([body for _, _, body in parts])
    head.append(f'Content-Type: multipart/alternative; boundary="{boundary}"')
    out = [b"\r\n"]
    for subtype, cte, body in parts:
        out += [f'--{boundary}\r\nContent-Type: text/{subtype}; charset="utf-8"\r\n'
                f"Content-Transfer-Encoding: {cte}\r\n\r\n".encode(), body, b"\r\n"]
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out)


def _extra_headers(head: list[str], service: ServiceConfig, template: TemplateRow,
                   rendered: Rendered) -> None:
    """The service's, then the task's custom headers (a task's field replaces the
    service's of the same name), then the renderer's (List-Unsubscribe...)."""
    fields: dict[str, tuple[str, str]] = {}
    service_headers = service.settings.get("headers") or {}
    if not isinstance(service_headers, Mapping):
        raise RenderError(f"service {service.name}: settings.headers is not an object")
    for source, managed in ((tuple(service_headers.items()), False), (template.headers, False),
                            (rendered.headers, True)):
        for name, value in source:
            problem = header_problem(name, value, managed=managed)
            if problem:
                raise RenderError(problem)
            fields[name.lower()] = (name, value)
    for name, value in fields.values():
        if name.lower() in ("list-unsubscribe", "list-unsubscribe-post"):
            head.append(_list_header(name, value))
        else:
            head.append(_text_header(name, value, False))


def _list_header(name: str, value: str) -> str:
    """A structured list header (RFC 2369: ``<uri>, <uri>``) folded after its commas;
    URIs are never split (each stays well under 998 octets)."""
    if not _PRINTABLE.fullmatch(value):
        raise RenderError(f"{name}: the value must be printable ASCII (URIs are %-encoded)")
    items = re.split(r"\s*,\s*(?=<)", value.strip())
    segments = [item + ("," if i < len(items) - 1 else "") for i, item in enumerate(items)]
    lines = [f"{name}: {segments[0]}"]  # the first URI on the field's line, however long
    for segment in segments[1:]:
        if len(lines[-1]) + 1 + len(segment) > _MAX_LINE:
            lines.append(" " + segment)
        else:
            lines[-1] += " " + segment
    return "\r\n".join(lines)


_date_cache: tuple[int, str] = (-1, "")


def _date_now() -> str:
    """The Date header's value for now (RFC 5322, UTC), formatted once a second:
    ``email.utils.formatdate`` costs about 3 us, paid for every message."""
    global _date_cache
    second = int(time.time())
    cached = _date_cache  # one read: another thread may swap the tuple meanwhile
    if cached[0] != second:
        cached = (second, email.utils.formatdate(second, localtime=False))
        _date_cache = cached
    return cached[1]


def build_message(service: ServiceConfig, ctx: RenderContext, rendered: Rendered) -> Message:
    """Assemble the wire message; raises RenderError for anything unsendable."""
    if not service.from_addresses:
        raise RenderError(f"service {service.name} has no sender address")
    sender = service.from_addresses[0]
    mid = message_id(ctx.subtask_id, ctx.task_id, sender)
    template = ctx.template
    # Non-ASCII From/To only when they are the envelope too, i.e. under SMTPUTF8.
    utf8 = not (sender.isascii() and ctx.email.isascii())
    try:
        from_name = _single_line("from name", template.from_name) if template.from_name else None
        head = [
            _mailbox("From", from_name, _address("sender", sender, utf8)),
            "To: " + _address("recipient", ctx.email, utf8),
            _text_header("Subject", _single_line("subject", rendered.subject), False),
            "Message-ID: " + mid,
            "Date: " + _date_now(),
            f"X-Edm-Service: {service.service_id:d}",
            f"X-Edm-Task: {ctx.task_id:d}",
        ]
        if template.reply_to:
            head.append("Reply-To: " + _address("reply-to", template.reply_to, utf8))
        _extra_headers(head, service, template, rendered)
        body = _mime(head, rendered.text, rendered.html)
        data = "\r\n".join(head).encode("utf-8" if utf8 else "ascii") + b"\r\n" + body
    except ValueError as exc:  # a lone surrogate in the subject, a name or a body
        raise RenderError(f"cannot build message: {exc}") from exc
    return Message(subtask_id=ctx.subtask_id, task_id=ctx.task_id, message_id=mid,
                   sender=sender, recipient=ctx.email, data=data)
