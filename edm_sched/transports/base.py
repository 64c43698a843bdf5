"""The transport protocol: how a dispatcher hands one message to a provider.

A transport is async (a dispatcher keeps hundreds of sends in flight on one
event loop). It never raises for a provider's answer: it returns a
:class:`SendResult` whose ``outcome`` says how the scheduler must react:

* ``SENT``      — accepted; ``provider_id`` is the provider's id if any.
* ``TRANSIENT`` — this message failed for now (SMTP 4xx for the recipient,
  a timeout after DATA): retried later with back-off, counts an attempt.
* ``PERMANENT`` — this message will never go (SMTP 5xx): failed; for 550, 551
  and 553 the address is suppressed (decided in SQL, edm.smtp_code_suppresses).
* ``SERVICE``   — the *account* is unusable right now (connection refused,
  authentication failure, 421, throttling): the service backs off and the
  subtask returns to pending without using an attempt.
* ``UNCERTAIN`` — nobody can know whether the provider has the message: the
  connection failed, was reset or timed out *after* the whole message,
  final dot included, was handed to the network and *before* the provider
  answered. The provider may have accepted it, so a resend may deliver a
  second copy. The scheduler records the uncertain outcome (so that every
  possible duplicate is countable) before any resend. A transport never
  retries an uncertain send by itself. A failure before the end of the
  message (the final dot never left) is ``TRANSIENT`` instead: nothing could
  have been accepted.

Whatever the outcome, ``code`` (the SMTP reply code) and ``detail`` (the
reply, e.g. ``"RCPT TO: 421 4.7.28 ..."``, enhanced status code included) and,
for a non-SMTP transport, ``error_code`` (``"http:429"``, ``"ses:Throttling"``)
reach ``edm.complete``, where reply rules (``edm.reply_rules``, see
:mod:`edm_sched.reply_rules`) may turn a throttling answer into a suspension
of the (service, site) pair instead of a failure.

An exception escaping ``send`` is treated by the dispatcher as ``TRANSIENT``
with the exception text as detail, so a buggy transport never leaves a
subtask leased forever.

A transport may also offer ``async def prepare(service) -> None`` (optional,
not part of :class:`Transport`; a dispatcher calls it when present, e.g. with
``getattr``): open, greet and log in the service's connection ahead of time,
so that the first send at its slot starts the transaction at once. It never
raises; what fails there is reported by the next ``send``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


class Outcome(enum.StrEnum):
    SENT = "sent"
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    SERVICE = "service"
    UNCERTAIN = "uncertain"
    # Set by the dispatcher, never by a transport:
    RENDER_ERROR = "render_error"  # the message could not be built; nothing was spent
    RELEASED = "released"  # handed back unsent (its lease would end before its slot)


@dataclass(frozen=True)
class SendResult:
    outcome: Outcome
    code: int | None = None
    detail: str | None = None
    provider_id: str | None = None
    response_ms: int | None = None
    # A non-SMTP transport's error code, "kind:code" (e.g. "http:429",
    # "ses:Throttling"): reply rules (edm.reply_rules) match on it. An SMTP
    # transport leaves it None: its code and detail ("RCPT TO: 421 4.7.28 ...")
    # carry everything.
    error_code: str | None = None


@dataclass(frozen=True)
class ServiceConfig:
    """What a transport needs to know about one sending account (no secrets)."""

    service_id: int
    name: str
    transport: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    credential_ref: str | None = None
    from_addresses: tuple[str, ...] = ()


@dataclass(frozen=True)
class Message:
    """One rendered email, ready for the wire."""

    subtask_id: int
    task_id: int
    message_id: str  # deterministic, derived from the subtask: "<edm.{task}.{subtask}@{domain}>"
    sender: str  # envelope sender
    recipient: str  # envelope recipient
    data: bytes  # the whole RFC 5322 message, headers and body, CRLF line ends
    # Called by a transport that can tell, with time.monotonic(), once the provider has
    # answered the start of the transaction (SMTP: the reply to MAIL FROM, or its failure):
    # the lane paces the next start from there (see edm_sched.lanes). Optional.
    on_start: Callable[[float], None] | None = field(default=None, compare=False, repr=False)


CredentialResolver = Callable[[str], str | None]
"""Maps a service's ``credential_ref`` to its secret (env var, vault...); None if unknown."""


@runtime_checkable
class Transport(Protocol):
    async def send(self, service: ServiceConfig, message: Message) -> SendResult:
        """Send one message through ``service``; return, never raise, the provider's verdict."""
        ...

    async def aclose(self) -> None:
        """Close every connection this transport holds."""
        ...
