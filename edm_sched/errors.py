"""Typed errors of edm-sched.

SQL functions raise with SQLSTATEs of the private class ``ED`` (see
``sql/migrations/0002_dispatch.sql``); :func:`edm_sched.db.translate` maps them,
and the relevant standard SQLSTATEs, onto these classes. Every error carries a
stable ``code`` string that scripts and the CLI can rely on.
"""

from __future__ import annotations


class EdmSchedError(Exception):
    """Base class of every error edm-sched raises on purpose."""

    code = "EDM_ERROR"

    def __init__(self, message: str, *, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.message} ({self.detail})" if self.detail else self.message


class ConfigurationError(EdmSchedError):
    """A malformed DSN or an impossible setting given to the library."""

    code = "CONFIGURATION_ERROR"


class DatabaseUnavailable(EdmSchedError):
    """The server could not be reached or refused the connection."""

    code = "DATABASE_UNAVAILABLE"


class PermissionDenied(EdmSchedError):
    """The database role lacks a privilege the operation needs."""

    code = "PERMISSION_DENIED"


class MigrationError(EdmSchedError):
    """The schema cannot be migrated safely (edited, unknown or foreign migrations)."""

    code = "MIGRATION_ERROR"


class InvalidInput(EdmSchedError, ValueError):
    """An argument is malformed or out of range; nothing was written."""

    code = "INVALID_INPUT"


class AlreadyExists(InvalidInput):
    """A unique name or key is already taken (e.g. a service name); nothing was written.

    A subclass of :class:`InvalidInput` (and ``ValueError``), so handlers of bad
    input catch it too; the database's ``UniqueViolation`` is its ``__cause__``.
    """

    code = "ALREADY_EXISTS"


class NotFound(EdmSchedError, LookupError):
    """An id names no object (or an object of another tenant)."""

    code = "NOT_FOUND"


class QuotaExceeded(EdmSchedError):
    """A user's quota cannot cover the request; nothing was written."""

    code = "QUOTA_EXCEEDED"


class InvalidTransition(EdmSchedError):
    """The status machine forbids the requested change (e.g. resuming a completed task)."""

    code = "INVALID_TRANSITION"


class LeaseLost(EdmSchedError):
    """A completion arrived for a subtask this dispatcher no longer holds."""

    code = "LEASE_LOST"


class ConfigRejected(InvalidInput):
    """A config value of the wrong type or out of its declared range."""

    code = "CONFIG_REJECTED"


# Refused at the door (issue 16): the specific kinds of InvalidInput.


class InvalidTemplate(InvalidInput):
    """A template does not compile (Jinja syntax error), in the subject or a body."""

    code = "INVALID_TEMPLATE"


class MissingVariables(InvalidInput):
    """A task asked for strict variables and some recipients lack variables its templates use."""

    code = "MISSING_VARIABLES"


class InvalidHeader(InvalidInput):
    """A header value holds CR, LF, NUL or a control character, or the header may not be set."""

    code = "INVALID_HEADER"


class NoRecipients(InvalidInput):
    """An explicit recipient list is empty."""

    code = "NO_RECIPIENTS"


class PayloadTooLarge(InvalidInput):
    """Content or variables exceed the documented size limits."""

    code = "PAYLOAD_TOO_LARGE"


class InvalidToken(InvalidInput):
    """An unsubscribe token is malformed, forged or expired."""

    code = "INVALID_TOKEN"
