"""Message-shape helpers and hypothesis strategies shared by the rendering tests and the
well-formed-mail wire test."""

from __future__ import annotations

import email.header
import email.parser
import email.policy
import email.utils
import re
import string
from email.message import EmailMessage

from hypothesis import strategies as st


def display_name(data: bytes) -> str:
    """The From display name as an RFC 2047 decoder reads it.

    ``policy.default``'s address parser keeps the whitespace between two
    adjacent encoded-words of a display name (RFC 2047 section 6.2 says to
    drop it), so a long non-ASCII name comes back with a space wherever it was
    split; the legacy decoder follows the RFC.
    """
    raw = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(data)["From"]
    name, _ = email.utils.parseaddr(re.sub(r"\r\n(?=[ \t])", "", str(raw)))
    return str(email.header.make_header(email.header.decode_header(name)))


def parts(msg: EmailMessage) -> list[tuple[str, str]]:
    """(content type, get_content()) of each leaf part, in order."""
    return [(p.get_content_type(), p.get_content()) for p in msg.walk() if not p.is_multipart()]


def expected_content(body: str) -> str:
    """What get_content() returns for a part set from ``body``: CRLF line ends, one at the end
    (the builders split lines as bytes.splitlines(): CRLF, CR or LF)."""
    lines = body.replace("\r\n", "\n").replace("\r", "\n")
    return (lines if lines.endswith("\n") else lines + "\n").replace("\n", "\r\n")


# ------------------------------------------------------------------- strategies

# NUL and what str.splitlines() breaks on: refused in header values.
LINE_BREAKS = "\x00\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
ANY_CHAR = st.characters(codec="utf-8", exclude_characters=LINE_BREAKS)
SPECIMENS = [
    "Soldes d'été 🎉 – jusqu'à -50 %", "Boutique Éloïse", "Jean  Dupont", "  leading", "trailing ",
    "=?utf-8?q?not_an_encoded_word?=", "e\u0301\u0301\u0301 combining", "👩‍👩‍👧‍👦 family",
    "Shop, \"Inc\" <x@y>", "back\\slash", "tab\there", "control \x01\x1b\x7f", "x" * 300,
    "word " * 40, "Привет, мир! " * 8, "用户名称" * 30, "a_b=c?d", "(comment) [x]", " ", "",
]
header_text = st.one_of(
    st.text(ANY_CHAR, max_size=120),
    st.text(string.ascii_letters + string.digits + string.punctuation + " ", max_size=250),
    st.sampled_from(SPECIMENS),
)
display_names = st.one_of(st.none(), header_text)
addresses = st.emails().filter(lambda a: len(a) <= 254)
LINES = st.one_of(
    st.text(ANY_CHAR, max_size=80),
    st.text(st.characters(codec="utf-8"), max_size=80),  # any control character
    st.text(string.printable, max_size=120),
    st.sampled_from(["From the shop", "From ", ".", "..", ". dot", "", "  ", "trailing  ",
                     "=3D", "--=_boundary-looking", "<p>été</p>"]),
    st.integers(79, 3000).map(lambda n: "x" * n),
    st.integers(1, 1500).map(lambda n: "é😀" * n),
)
bodies = st.one_of(
    st.builds(lambda lines, sep, end: sep.join(lines) + end,
              st.lists(LINES, max_size=40), st.sampled_from(["\n", "\r\n", "\r"]),
              st.sampled_from(["", "\n", "\r\n"])),
    st.text(st.characters(codec="utf-8"), max_size=5000),
)
body_pairs = st.one_of(
    st.tuples(bodies, st.none()), st.tuples(st.none(), bodies), st.tuples(bodies, bodies))
