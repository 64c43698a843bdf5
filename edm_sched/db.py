"""Connections and the mapping of database errors onto typed errors."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import psycopg
import psycopg.errors
from psycopg import conninfo

from edm_sched import errors

DSN_ENV = "EDM_SCHED_DSN"
CONNECT_TIMEOUT = 5.0
"""Default seconds to wait for a connection before DatabaseUnavailable (libpq connect_timeout)."""

# SQLSTATEs raised by our SQL functions (class ED) and the standard ones we map.
_SQLSTATE_ERRORS: dict[str, type[errors.EdmSchedError]] = {
    "ED001": errors.NotFound,
    "ED002": errors.QuotaExceeded,
    "ED003": errors.InvalidTransition,
    "ED004": errors.LeaseLost,
    "ED005": errors.InvalidInput,
    "ED006": errors.ConfigRejected,
    # ED010-ED015: recurring jobs, registered by edm_sched.jobs.errors.
    # Deliverability (sql/migrations/0009_deliverability.sql).
    "ED030": errors.MissingVariables,
    "22023": errors.InvalidInput,  # invalid_parameter_value
    "22P02": errors.InvalidInput,  # invalid_text_representation
    "22003": errors.InvalidInput,  # numeric_value_out_of_range
    "22001": errors.InvalidInput,  # string_data_right_truncation
    "22021": errors.InvalidInput,  # character_not_in_repertoire (NUL bytes)
    "22P05": errors.InvalidInput,  # untranslatable_character (\u0000 in JSON)
    "22007": errors.InvalidInput,  # invalid_datetime_format
    "22008": errors.InvalidInput,  # datetime_field_overflow
    "23514": errors.InvalidInput,  # check_violation
    "23502": errors.InvalidInput,  # not_null_violation
    "23503": errors.NotFound,  # foreign_key_violation: a referenced id does not exist
    "23505": errors.AlreadyExists,  # unique_violation
    "42501": errors.PermissionDenied,  # insufficient_privilege
}



def register_sqlstates(mapping: dict[str, type[errors.EdmSchedError]]) -> None:
    """Map more SQLSTATEs onto typed errors: how a feature package (jobs) adds its
    own without the core importing it. A code mapped to another class is refused."""
    for state, cls in mapping.items():
        if _SQLSTATE_ERRORS.setdefault(state, cls) is not cls:
            raise RuntimeError(f"SQLSTATE {state} is already mapped to "
                               f"{_SQLSTATE_ERRORS[state].__name__}")


_PASSWORD = re.compile(r"(password\s*=\s*)(\S+)|(://[^:/@]*:)([^@]*)(@)", re.IGNORECASE)


def redact(dsn: str) -> str:
    """The DSN with any password replaced by ``***``, safe for messages and logs."""
    return _PASSWORD.sub(
        lambda m: f"{m.group(1)}***" if m.group(1) else f"{m.group(3)}***{m.group(5)}", dsn
    )


def resolve_dsn(dsn: str | None) -> str | None:
    """The explicit DSN, else ``$EDM_SCHED_DSN``, else None (embedded server)."""
    return dsn or os.environ.get(DSN_ENV) or None


def check_dsn(dsn: str) -> str:
    """Raise ConfigurationError when ``dsn`` is not a valid libpq connection string."""
    try:
        conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise errors.ConfigurationError(
            f"malformed DSN {redact(dsn)!r}: {_first_line(exc)}"
        ) from None
    return dsn


def connect(dsn: str, *, autocommit: bool = True, connect_timeout: float | None = None,
            **kwargs: Any) -> psycopg.Connection[Any]:
    """Open a connection, turning libpq failures into typed errors.

    ``connect_timeout`` (default :data:`CONNECT_TIMEOUT`) bounds the attempt
    unless the DSN sets its own ``connect_timeout``.
    """
    check_dsn(dsn)
    timeout = CONNECT_TIMEOUT if connect_timeout is None else connect_timeout
    try:
        return psycopg.connect(dsn, autocommit=autocommit, **timeout_kwargs(dsn, timeout),
                               **kwargs)
    except psycopg.OperationalError as exc:
        raise _connect_error(dsn, timeout, exc) from None


def timeout_kwargs(dsn: str, timeout: float) -> dict[str, Any]:
    """``connect_timeout`` for libpq (whole seconds, at least 2), unless ``dsn`` sets one."""
    if "connect_timeout" in conninfo.conninfo_to_dict(dsn):
        return {}
    return {"connect_timeout": max(2, round(timeout))}


def server_address(dsn: str) -> str:
    """``host:port`` of ``dsn`` as libpq will use it (never the password)."""
    params = conninfo.conninfo_to_dict(dsn)
    host = str(params.get("host") or params.get("hostaddr") or os.environ.get("PGHOST")
               or "localhost (Unix socket)")
    port = str(params.get("port") or os.environ.get("PGPORT") or 5432)
    return f"{host}:{port}"


def unavailable(dsn: str, timeout: float, reason: str) -> errors.DatabaseUnavailable:
    """The DatabaseUnavailable of a failed connection: host, port, database, never a password."""
    params = conninfo.conninfo_to_dict(dsn)
    where = server_address(dsn)
    dbname = params.get("dbname")
    return errors.DatabaseUnavailable(
        f"cannot connect to PostgreSQL at {where}"
        + (f" (database {dbname})" if dbname else "")
        + f" within {timeout:g} s: {redact(reason)}")


def probe(dsn: str, timeout: float) -> None:
    """One connection attempt, bounded by ``timeout``: DatabaseUnavailable (or
    PermissionDenied) at once, rather than a pool retrying in the dark."""
    try:
        psycopg.connect(dsn, autocommit=True, **timeout_kwargs(dsn, timeout)).close()
    except psycopg.OperationalError as exc:
        raise _connect_error(dsn, timeout, exc) from None


async def aprobe(dsn: str, timeout: float) -> None:
    """:func:`probe` for asyncio."""
    try:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True,
                                                     **timeout_kwargs(dsn, timeout))
        await conn.close()
    except psycopg.OperationalError as exc:
        raise _connect_error(dsn, timeout, exc) from None


def _connect_error(dsn: str, timeout: float, exc: BaseException) -> errors.EdmSchedError:
    text = _first_line(exc)
    if "permission denied" in text or "authentication failed" in text:
        return errors.PermissionDenied(f"{server_address(dsn)}: {redact(text)}")
    return unavailable(dsn, timeout, text)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def to_typed(exc: psycopg.Error) -> errors.EdmSchedError | None:
    """The typed error for a database error, or None when it is not one we map."""
    state = exc.sqlstate or ""
    if not state and isinstance(exc, psycopg.DataError):
        # raised by psycopg before sending, e.g. a NUL byte in a text value
        return errors.InvalidInput(_first_line(exc))
    cls = _SQLSTATE_ERRORS.get(state)
    if cls is None:
        if isinstance(exc, psycopg.OperationalError):
            return errors.DatabaseUnavailable(_first_line(exc))
        return None
    diag = exc.diag
    message = diag.message_primary or _first_line(exc)
    if state == "23514" and diag.constraint_name:
        message = f"{message} (constraint {diag.constraint_name})"
    if state == "23505":
        message = f"already exists (constraint {diag.constraint_name or 'unique'})"
    return cls(message, detail=diag.message_detail)


@contextlib.contextmanager
def translate() -> Iterator[None]:
    """Re-raise database errors that have a typed counterpart as that type."""
    try:
        yield
    except psycopg.Error as exc:
        typed = to_typed(exc)
        if typed is None:
            raise
        raise typed from exc
    except UnicodeEncodeError as exc:  # lone surrogates cannot be sent as UTF-8
        raise errors.InvalidInput(f"text is not valid Unicode: {exc.reason}") from None


ConnOrDsn = psycopg.Connection[Any] | str
"""A psycopg connection (used as is, inside the caller's transaction) or a DSN."""


@contextlib.contextmanager
def using(target: ConnOrDsn) -> Iterator[psycopg.Connection[Any]]:
    """A connection for one call: ``target`` itself, or a new autocommit connection to
    the DSN ``target``, closed afterwards; database errors translated either way."""
    if isinstance(target, str):
        with connect(target) as conn, translate():
            yield conn
    else:
        with translate():
            yield target


def setting(values: Mapping[str, Any], key: str) -> Any:
    """Setting ``key`` from a read of ``edm.config`` (e.g. the ``config_all`` query).

    ``edm.config`` holds every setting with its shipped default (the migrations
    insert them), so Python keeps no second copy of a default: a missing key
    means a database behind this version's migrations.
    """
    try:
        return values[key]
    except KeyError:
        raise errors.MigrationError(
            f"edm.config has no setting {key!r}: run the migrations (edm-sched migrate)") from None
