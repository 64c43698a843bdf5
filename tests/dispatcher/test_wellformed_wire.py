"""Well-formed mail on the wire (issue 16): random messages — Unicode subjects and
display names, long lines, text, html or both, custom headers, one-click
unsubscribe, SMTPUTF8 addresses — built by build_message, sent through the real
SmtpTransport to a real SMTP server (edm_sched.testing.smtp_sink), and parsed back with the
standard library: what arrived is what was asked, no line is over 998 octets, and
header text outside ASCII travels as RFC 2047 encoded-words."""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import re
import string
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edm_sched.rendering import (
    RenderContext,
    Rendered,
    TemplateRow,
    build_message,
    header_break,
)
from edm_sched.testing.smtp_sink import SmtpSink
from edm_sched.transports.base import Outcome, ServiceConfig
from edm_sched.transports.smtp import SmtpTransport
from edm_sched.unsubscribe import UnsubscribeConfig
from tests.support.mail import (
    addresses,
    body_pairs,
    display_name,
    expected_content,
    header_text,
    parts,
)

WIRE = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
UNSUBSCRIBE = UnsubscribeConfig(key=b"k" * 32, url="https://news.example/u",
                                mailto="unsubscribe@news.example")
UTF8_ADDRESSES = ["amélie@exemple.fr", "用户@例子.广告", "josé.ñúñez@correo.example"]

header_names = st.text(string.ascii_letters + string.digits + "-", min_size=1, max_size=30).map(
    lambda n: "X-" + n).filter(lambda n: not n.lower().startswith("x-edm-"))
header_values = st.one_of(
    st.text(string.printable.strip("\r\n\x0b\x0c") + " ", max_size=200).map(
        lambda v: v.replace("\t", " ")),
    header_text,
).filter(lambda v: len(v) <= 900 and not header_break(v))  # the door refuses the others


@st.composite
def wire_messages(draw: st.DrawFn) -> dict[str, Any]:
    text, html = draw(body_pairs)
    utf8 = draw(st.booleans().map(lambda b: b and draw(st.integers(0, 4)) == 0))
    to = draw(st.sampled_from(UTF8_ADDRESSES)) if utf8 else draw(addresses)
    headers = draw(st.dictionaries(header_names, header_values, max_size=4))
    # one name per field, case-insensitively
    headers = {k: v for k, v in {k.lower(): (k, v) for k, v in headers.items()}.values()}
    return {"subject": draw(header_text), "from_name": draw(st.none() | header_text),
            "reply_to": draw(st.none() | addresses), "to": to,
            "sender": "news@shop.example", "text": text, "html": html, "headers": headers,
            "unsubscribe": draw(st.booleans())}


@pytest.fixture(scope="module")
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as s:
        yield s


def send(sink: SmtpSink, m: dict[str, Any], n: int) -> bytes:
    service = ServiceConfig(7, "svc", "smtp", {"host": "127.0.0.1", "port": sink.port,
                                               "timeout": 10.0}, None, (m["sender"],))
    template = TemplateRow("unused", m["text"], m["html"], m["from_name"], m["reply_to"],
                           headers=tuple(m["headers"].items()))
    ctx = RenderContext(n, 56, "u", m["to"], {}, template)
    extra = UNSUBSCRIBE.headers("v1.tokenpayload.sig") if m["unsubscribe"] else ()
    message = build_message(service, ctx, Rendered(m["subject"], m["text"], m["html"], extra))

    async def go() -> Any:
        transport = SmtpTransport()
        try:
            return await transport.send(service, message)
        finally:
            await transport.aclose()

    before = len(sink.messages)
    result = asyncio.run(go())
    assert result.outcome is Outcome.SENT, result
    sink.wait_for(before + 1, timeout=10)
    received = sink.messages[before]
    assert received.rstrip(b"\r\n") == message.data.rstrip(b"\r\n")  # byte for byte
    return received


@WIRE
@given(m=wire_messages())
def test_random_messages_arrive_as_asked(sink: SmtpSink, m: dict[str, Any]) -> None:
    data = send(sink, m, 1000 + len(sink.messages))
    lines = data.split(b"\r\n")
    assert max(len(line) for line in lines) <= 998
    head = lines[:lines.index(b"")]
    if m["to"].isascii():  # 7-bit: every non-ASCII header text is an encoded-word
        assert data.isascii()
        for value in (m["subject"], m["from_name"] or "", *m["headers"].values()):
            if not value.isascii():
                assert re.search(rb"=\?utf-8\?[qb]\?", b"\r\n".join(head), re.IGNORECASE)
    parsed = email.parser.BytesParser(policy=email.policy.default).parsebytes(data)
    assert parsed.defects == []
    assert parsed["Subject"] == m["subject"]
    assert display_name(data) == (m["from_name"] or "")
    assert parsed["From"].addresses[0].addr_spec == m["sender"]
    assert parsed["To"] == m["to"]
    assert parsed["Reply-To"] == m["reply_to"]
    for name, value in m["headers"].items():
        assert parsed[name] == value, name
    if m["unsubscribe"]:
        assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert re.sub(r"\s+", " ", str(parsed["List-Unsubscribe"])) == (
            "<https://news.example/u?token=v1.tokenpayload.sig>, "
            "<mailto:unsubscribe@news.example?subject=unsubscribe%20v1.tokenpayload.sig>")
    want = [(f"text/{k}", b) for k, b in (("plain", m["text"]), ("html", m["html"]))
            if b is not None]
    got = parts(parsed)
    assert [t for t, _ in got] == [t for t, _ in want]
    for (_, content), (_, body) in zip(got, want, strict=True):
        assert content == expected_content(body)
