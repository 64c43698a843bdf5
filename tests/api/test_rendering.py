"""build_message: the wire format, round trips through the email package, header
injection, and equivalence with the EmailMessage-based builder it replaced.

No database. Hypothesis draws subjects, display names, addresses and bodies
(ASCII, any Unicode text with emoji and combining characters, very long
lines, lines starting with "From " or ".", empty bodies; text only, html only
or both); every message is parsed back with ``email.policy.default``.
"""

from __future__ import annotations

import email.header
import email.parser
import email.policy
import email.utils
import re
import secrets
import time
from email.message import EmailMessage
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edm_sched.rendering import (
    RenderContext,
    Rendered,
    RenderError,
    TemplateRow,
    build_message,
)
from edm_sched.testing.reference_builder import email_message_builder
from edm_sched.transports.base import Message, ServiceConfig
from tests.support.mail import (
    LINE_BREAKS,
    addresses,
    body_pairs,
    display_name,
    display_names,
    expected_content,
    header_text,
    parts,
)

SENDER = "news@shop.example"
PROPERTY = settings(max_examples=200, deadline=None)


def build(subject: str = "Hello", text: str | None = "Hi there\n", html: str | None = None, *,
          from_name: str | None = None, reply_to: str | None = None,
          to: str = "bob@example.com", sender: str = SENDER,
          builder: Any = build_message) -> Message:
    service = ServiceConfig(service_id=7, name="svc", transport="null", from_addresses=(sender,))
    template = TemplateRow(subject="unused", body_text=text, body_html=html,
                           from_name=from_name, reply_to=reply_to)
    ctx = RenderContext(subtask_id=1234, task_id=56, user_id="u", email=to, variables={},
                        template=template)
    message: Message = builder(service, ctx, Rendered(subject, text, html))
    return message


def parse(data: bytes) -> EmailMessage:
    msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(data)
    assert isinstance(msg, EmailMessage)
    return msg


def normalised(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def loose(text: str) -> str:
    return " ".join(text.split())


@st.composite
def messages(draw: st.DrawFn) -> dict[str, Any]:
    text, html = draw(body_pairs)
    return {"subject": draw(header_text), "from_name": draw(display_names),
            "reply_to": draw(st.none() | addresses), "to": draw(addresses),
            "sender": draw(st.just(SENDER) | addresses), "text": text, "html": html}


# ---------------------------------------------------------------- the properties


@pytest.mark.slow
@PROPERTY
@given(messages())
def test_round_trip_through_the_email_package(m: dict[str, Any]) -> None:
    msg = build(**m)
    parsed = parse(msg.data)
    assert parsed.defects == []
    assert parsed["Subject"] == m["subject"]
    assert display_name(msg.data) == (m["from_name"] or "")
    (address,) = parsed["From"].addresses
    assert address.addr_spec == m["sender"]
    if m["from_name"]:  # policy.default: the same but for whitespace (see display_name)
        assert address.display_name.split() == m["from_name"].split() or (
            "".join(address.display_name.split()) == "".join(m["from_name"].split()))
    assert parsed["To"] == m["to"]
    assert parsed["Reply-To"] == m["reply_to"]
    assert parsed["Message-ID"] == msg.message_id == f"<edm.56.1234@{m['sender'].split('@')[1]}>"
    assert (parsed["X-Edm-Service"], parsed["X-Edm-Task"]) == ("7", "56")
    assert parsed["MIME-Version"] == "1.0"
    assert email.utils.parsedate_to_datetime(parsed["Date"]) is not None
    want = [(f"text/{kind}", body) for kind, body in (("plain", m["text"]), ("html", m["html"]))
            if body is not None]
    assert parsed.get_content_type() == (
        "multipart/alternative" if len(want) == 2 else want[0][0])
    got = parts(parsed)
    assert [t for t, _ in got] == [t for t, _ in want]
    for (_, content), (_, body) in zip(got, want, strict=True):
        assert content == expected_content(body)
        assert normalised(content) == normalised(expected_content(body))
    assert (msg.sender, msg.recipient, msg.subtask_id, msg.task_id) == (
        m["sender"], m["to"], 1234, 56)


@PROPERTY
@given(messages())
def test_wire_format(m: dict[str, Any]) -> None:
    data = build(**m).data
    assert data.isascii()
    assert data.endswith(b"\r\n")
    lines = data.split(b"\r\n")[:-1]
    assert not any(b"\r" in line or b"\n" in line for line in lines)  # CRLF only
    assert max(map(len, lines)) <= 998
    head = lines[:lines.index(b"")]
    longest_address = max(len(a) for a in (m["to"], m["sender"], m["reply_to"] or ""))
    assert max(map(len, head)) <= max(78, longest_address + len(b"Message-ID: <edm.56.1234>"))
    assert all(re.fullmatch(rb"[\x21-\x7e]+:( .*)?|[ \t].*\S.*", line) for line in head)
    subject = [line for line in head if line.startswith(b"Subject:")]
    assert len(subject) == 1 and max(map(len, head)) <= 998
    body = lines[lines.index(b"") + 1:]
    assert all(len(line) <= 78 for line in body)


@PROPERTY
@given(messages(), st.sampled_from(["subject", "from_name", "reply_to", "to", "sender"]),
       st.sampled_from(LINE_BREAKS), st.sampled_from(["", "\n", "Bcc: victim@example.com"]))
def test_line_breaks_and_nul_in_a_header_value_are_refused(
        m: dict[str, Any], field: str, brk: str, tail: str) -> None:
    value = m[field] or "x@y.example"
    m[field] = value[: len(value) // 2] + brk + tail + value[len(value) // 2:]
    with pytest.raises(RenderError):
        build(**m)


@pytest.mark.slow
@PROPERTY
@given(messages())
def test_same_message_as_the_reference_builder(m: dict[str, Any]) -> None:
    """Parsed, both builders give the same message, except where the old one was lossy:
    whitespace at the ends or in runs of a subject (dropped or collapsed), whitespace in a
    long display name (its folding put some of the name's spaces between encoded-words,
    where RFC 2047 decoders drop them), a Message-ID folded onto its own line (read back
    with a leading space), and text that looks like an encoded-word (written as is, so
    "=?utf-8?q?x?=" read back as "x")."""
    new, old = build(**m), build(**m, builder=email_message_builder)
    assert new.message_id == old.message_id
    assert (new.sender, new.recipient) == (old.sender, old.recipient)
    a, b = parse(new.data), parse(old.data)
    for name in ("To", "Reply-To", "X-Edm-Service", "X-Edm-Task"):
        assert a[name] == b[name]
    assert a["Message-ID"] == b["Message-ID"].strip()
    assert a.get_content_type() == b.get_content_type()
    assert a["From"].addresses[0].addr_spec == b["From"].addresses[0].addr_spec
    if "=?" not in m["subject"]:
        assert loose(a["Subject"]) == loose(b["Subject"])
    if "=?" not in (m["from_name"] or ""):
        assert display_name(new.data).split() == display_name(old.data).split() or (
            "".join(display_name(new.data).split()) == "".join(display_name(old.data).split()))
    assert parts(a) == parts(b)


# ------------------------------------------------------------------------ examples


def test_a_typical_campaign_message() -> None:
    text = "Bonjour Éloïse,\n\nNos soldes d'été commencent demain. 🎉\n" * 30
    html = "<html><body><p>Bonjour Éloïse,</p><p>Nos soldes d'été 🎉</p></body></html>\n" * 30
    msg = build("Soldes d'été 🎉 – jusqu'à -50 %", text, html, from_name="Boutique Éloïse",
                reply_to="help@shop.example")
    head, _, _ = msg.data.partition(b"\r\n\r\n")
    assert head.startswith(b"From: =?utf-8?")
    assert b"\r\nTo: bob@example.com\r\n" in head
    assert b"\r\nReply-To: help@shop.example" in head
    assert b"\r\nMIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=" in head
    parsed = parse(msg.data)
    assert parsed["Subject"] == "Soldes d'été 🎉 – jusqu'à -50 %"
    assert parsed["From"].addresses[0].display_name == "Boutique Éloïse"
    assert parts(parsed) == [("text/plain", expected_content(text)),
                             ("text/html", expected_content(html))]


@pytest.mark.parametrize(("body", "cte"), [
    ("Hello\nworld\n", "7bit"),
    ("", "7bit"),
    ("x" * 78, "7bit"),
    ("x" * 79, "quoted-printable"),            # a long ASCII line
    ("tab\tand trailing space \n", "7bit"),
    ("nul \x00 in it", "quoted-printable"),    # a control character is not 7bit text
    ("Voilà les soldes d'été, profitez-en vite !\n" * 10, "quoted-printable"),
    ("Привет, мир!\n" * 10, "base64"),        # mostly non-ASCII: base64 is shorter
    ("こんにちは", "base64"),
])
def test_transfer_encoding(body: str, cte: str) -> None:
    parsed = parse(build(text=body).data)
    assert parsed["Content-Transfer-Encoding"] == cte
    assert parsed.get_content() == expected_content(body)


def test_body_lines_starting_with_from_or_a_dot_are_kept() -> None:
    body = "From the shop\n.\n..twice\nFrom \n"
    for text in (body, body + "é"):  # 7bit and quoted-printable
        assert parse(build(text=text).data).get_content() == expected_content(text)


def test_no_body_gives_an_empty_message_like_before() -> None:
    new, old = build(text=None), build(text=None, builder=email_message_builder)
    assert new.data.endswith(b"X-Edm-Task: 56\r\n\r\n")
    assert parse(new.data).get_content() == parse(old.data).get_content() == ""


def test_a_long_subject_is_folded_within_78_columns() -> None:
    subject = "Our spring catalogue is here with " + "many great offers " * 10
    data = build(subject.strip()).data
    head = data.partition(b"\r\n\r\n")[0].split(b"\r\n")
    assert max(map(len, head)) <= 78
    assert b"=?" not in data.partition(b"\r\n\r\n")[0]  # ASCII folded at its spaces
    assert parse(data)["Subject"] == subject.strip()


def test_the_boundary_is_drawn_again_when_a_part_contains_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = iter(["collides", "collides", "fresh"])
    monkeypatch.setattr(secrets, "token_hex", lambda n: next(tokens))
    text = "quoting an old message:\n--=_collides\nend\n"
    msg = build(text=text, html="<p>x</p>")
    parsed = parse(msg.data)
    assert parsed.get_boundary() == "=_fresh"
    assert parts(parsed)[0][1] == expected_content(text)


@pytest.mark.parametrize("field", ["subject", "text", "html", "from_name"])
def test_a_lone_surrogate_is_a_render_error(field: str) -> None:
    with pytest.raises(RenderError):
        build(**{field: "bad \ud800 text"})


@pytest.mark.parametrize("address", [
    "no-at-sign", "<a@b.example>", "a@b.example, c@d.example", "Bob <a@b.example>",
    "a b@example.com", "a@b@c.example", "x" * 250 + "@b.example", "",
])
@pytest.mark.parametrize("field", ["to", "sender", "reply_to"])
def test_anything_but_one_bare_address_is_refused(field: str, address: str) -> None:
    if field == "reply_to" and not address:
        return  # no Reply-To
    with pytest.raises(RenderError):
        build(**{field: address})


@pytest.mark.parametrize(("field", "address"), [
    ("to", "jörg@example.com"), ("to", "bob@exämple.com"), ("sender", "nëws@shop.example")])
def test_a_non_ascii_envelope_address_goes_as_utf8_headers(field: str, address: str) -> None:
    """SMTPUTF8 addresses (accepted by the SQL, negotiated by the SMTP transport): the
    headers are UTF-8 (RFC 6532); the old builder wrote an encoded-word in the address,
    which RFC 2047 forbids."""
    msg = build("Grüße", "Hallo\n", from_name="Jörg", reply_to="rëply@shop.example",
                **{field: address})
    head, _, body = msg.data.partition(b"\r\n\r\n")
    assert address.encode() in head and body.isascii()
    parsed = email.parser.Parser(policy=email.policy.default).parsestr(msg.data.decode())
    assert parsed["To" if field == "to" else "From"].addresses[0].addr_spec == address
    assert parsed["Reply-To"] == "rëply@shop.example"
    assert parsed["Subject"] == "Grüße"
    assert parsed["From"].addresses[0].display_name == "Jörg"


def test_a_non_ascii_reply_to_with_an_ascii_envelope_is_refused() -> None:
    with pytest.raises(RenderError, match="SMTPUTF8"):
        build(reply_to="rëply@shop.example")


def test_header_values_are_cached_per_value_not_per_message() -> None:
    a = build("Same subject", from_name="Shop", sender="a@one.example").data
    b = build("Same subject", from_name="Shop", sender="b@two.example").data
    assert parse(a)["From"].addresses[0].addr_spec == "a@one.example"
    assert parse(b)["From"].addresses[0].addr_spec == "b@two.example"


@PROPERTY
@given(source=st.text(st.characters(codec="utf-8", exclude_characters="{\r"), max_size=300),
       html=st.booleans())
def test_plain_templates_skip_jinja_with_the_same_result(source: str, html: bool) -> None:
    """A body with no template syntax is returned without compiling it (a 5 MB body took
    seconds of CPU), exactly as Jinja would render it."""
    from edm_sched.rendering import _compile, _render

    assert _render(source, html, {}) == _compile(source, html).render({})


_TEMPLATES = [
    "Hello {{ first_name }}",
    "{% for i in range(3) %}{{ i }},{% endfor %} {{ email }}",  # a global: range
    "{% set ns = namespace(n=0) %}{% for w in words %}{% set ns.n = ns.n + 1 %}{% endfor %}"
    "{{ ns.n }} words",
    "{{ range }}",  # a variable named like a global wins, as in Template.render
    "<p>{{ first_name }}</p>{{ words | join(', ') }}",
]


@PROPERTY
@given(source=st.sampled_from(_TEMPLATES), html=st.booleans(),
       first_name=st.text(max_size=20), words=st.lists(st.text(max_size=5), max_size=4),
       shadow=st.booleans())
def test_compiled_templates_render_as_template_render_does(
        source: str, html: bool, first_name: str, words: list[str], shadow: bool) -> None:
    """The renderer's context (the globals copied once per template) gives what
    ``Template.render`` gives, globals and a variable shadowing one included."""
    from edm_sched.rendering import _compile, _render

    variables: dict[str, Any] = {"first_name": first_name, "words": words, "email": "a@b.example"}
    if shadow:
        variables["range"] = "shadowed"
    if source == "{{ range }}" and not shadow:
        variables["range"] = first_name

    def outcome(render: Any) -> tuple[str, str]:
        try:
            return ("ok", render())
        except Exception as exc:  # a shadowed range() fails alike in both
            return (type(exc).__name__, str(exc))

    assert (outcome(lambda: _render(source, html, variables))
            == outcome(lambda: _compile(source, html).render(variables)))


def test_a_missing_variable_still_raises_the_same_error() -> None:
    from jinja2 import UndefinedError

    from edm_sched.rendering import _render

    with pytest.raises(UndefinedError, match="'first_name' is undefined"):
        _render("Hello {{ first_name }}", False, {})


def test_the_date_header_is_the_current_second_in_utc() -> None:
    before = time.time()
    data = build().data.decode()
    after = time.time()
    date = re.search(r"^Date: (.+)\r$", data, re.M)
    assert date is not None
    parsed = email.utils.parsedate_tz(date.group(1))
    assert parsed is not None
    sent = email.utils.mktime_tz(parsed)  # -0000 is UTC (parsedate_to_datetime: naive)
    assert int(before) <= sent <= after
    assert date.group(1).endswith("-0000")
