"""Transports: SMTP, a null/recording transport, and the protocol hosts implement."""

from edm_sched.transports.base import (
    CredentialResolver,
    Message,
    Outcome,
    SendResult,
    ServiceConfig,
    Transport,
)

__all__ = [
    "CredentialResolver",
    "Message",
    "Outcome",
    "SendResult",
    "ServiceConfig",
    "Transport",
]
