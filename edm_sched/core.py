"""The sans-I/O core of the host API: every operation written once, run sync or async.

An *operation* is a generator. Its body validates the arguments (before any
connection is taken: a malformed call never reaches the database), then yields
*steps* and receives each step's result; its return value is the call's result::

    def get_user(user_id: str) -> Op[UserInfo]:
        check_user(user_id)
        row = yield Fetch(query("get_user"), (user_id,), dicts=True)
        ...
        return UserInfo.model_validate(row)

The steps are a named statement with its parameters (:class:`Fetch`), a COPY
(:class:`Copy`), a CPU-heavy pure computation (:class:`Compute`, run in a worker
thread by the async runner so the event loop keeps turning) and the end of one
unit of work (:class:`Commit`). Two tiny runners execute them: :func:`run_sync`
on a psycopg ``Connection`` (from a pool or the caller's), :func:`run_async` on
an ``AsyncConnection``. :class:`edm_sched.api.Scheduler` and
:class:`edm_sched.api.AsyncScheduler` are one-line facades over the same
operations, so argument checking, SQL and result mapping exist once.

Database errors raised by a step are thrown into the operation at its
``yield``, so an operation may narrow them (the jobs API does); what it does
not handle is mapped by :func:`edm_sched.db.translate`.

Transactions. With a pool, an operation runs in one transaction on a pooled
connection; a :class:`Commit` step commits it and begins the next (tag-rule
expansion commits per chunk). With ``conn=`` (the host's connection) the
operation joins the host's transaction inside a savepoint and never commits:
:class:`Commit` steps are ignored, so everything the call does (a whole
tag-rule expansion included) commits or rolls back with the host's work, and an
error rolls back only what this call did (the savepoint). An autocommit host
connection outside a transaction block has no transaction to join: the call
then runs as on a pooled connection (its own transaction(s)).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, LiteralString, Protocol, TypeVar

import psycopg
from psycopg import pq
from psycopg.rows import dict_row, tuple_row

from edm_sched import db, errors
from edm_sched.sqlfiles import query

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool, ConnectionPool

T = TypeVar("T")
_COPY_YIELD_ROWS = 200  # the async COPY lets other coroutines run this often


@dataclass(frozen=True, slots=True)
class Fetch:
    """Run one named statement; the result is None, one row or all rows."""

    sql: LiteralString
    params: Any = None
    rows: Literal["none", "one", "all"] = "one"
    dicts: bool = False


@dataclass(frozen=True, slots=True)
class Copy:
    """COPY ``rows`` into ``sql``'s target (rows are produced lazily, while copying)."""

    sql: LiteralString
    rows: Iterable[Sequence[Any]]


@dataclass(frozen=True, slots=True)
class Compute:
    """A pure, possibly long computation; its return value is the step's result."""

    fn: Callable[[], Any]


@dataclass(frozen=True, slots=True)
class Commit:
    """End of a unit of work: commit and begin the next transaction (own connection only)."""


Step = Fetch | Copy | Compute | Commit
Op = Generator[Step, Any, T]


@dataclass(frozen=True)
class Session:
    """How the calls of one facade run: statements issued at the start of each transaction.

    ``setup`` runs in the transactions the runner owns (pool, autocommit
    connection); ``host_setup`` runs inside the caller's transaction under
    ``conn=`` (it lasts until the caller's transaction ends, so keep it to
    what is meant to: the actor of the audit log).
    """

    setup: tuple[Fetch, ...] = ()
    host_setup: tuple[Fetch, ...] = field(default=())

    @classmethod
    def for_actor(cls, actor: str | None, *extra: Fetch) -> Session:
        named = (Fetch(query("set_actor"), (actor,)),) if actor else ()
        return cls(setup=(*named, *extra), host_setup=named)


NO_SESSION = Session()


class SyncRunner(Protocol):
    """Runs an operation, on the caller's connection when one is given."""

    def __call__(self, op: Op[T], conn: psycopg.Connection[Any] | None,
                 session: Session) -> T: ...


class AsyncRunner(Protocol):
    """Runs an operation, on the caller's connection when one is given."""

    def __call__(self, op: Op[T], conn: psycopg.AsyncConnection[Any] | None,
                 session: Session) -> Awaitable[T]: ...


# ---------------------------------------------------------------------------
# Steps without a connection: the operation's body up to its first statement
# ---------------------------------------------------------------------------


def _first_io_step(op: Op[T]) -> tuple[Step | None, T | None]:
    """Advance ``op`` through its validation and Compute steps; (first I/O step, None)
    or (None, result) when it finished without touching the database."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = op.throw(error) if error is not None else op.send(value)
        except StopIteration as stop:
            return None, stop.value
        value, error = None, None
        if not isinstance(step, Compute):
            return step, None
        try:
            value = step.fn()
        except Exception as exc:
            error = exc


async def _afirst_io_step(op: Op[T]) -> tuple[Step | None, T | None]:
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = op.throw(error) if error is not None else op.send(value)
        except StopIteration as stop:
            return None, stop.value
        value, error = None, None
        if not isinstance(step, Compute):
            return step, None
        try:
            value = await asyncio.to_thread(step.fn)
        except Exception as exc:
            error = exc


# ---------------------------------------------------------------------------
# The sync runner
# ---------------------------------------------------------------------------


def _execute(conn: psycopg.Connection[Any], step: Step) -> Any:
    if isinstance(step, Fetch):
        cur = conn.cursor(row_factory=dict_row if step.dicts else tuple_row)
        cur.execute(step.sql, step.params)
        if step.rows == "one":
            return cur.fetchone()
        return cur.fetchall() if step.rows == "all" else None
    if isinstance(step, Copy):
        with conn.cursor().copy(step.sql) as copy:
            for row in step.rows:
                copy.write_row(row)
        return None
    if isinstance(step, Compute):
        return step.fn()
    raise TypeError(f"not a step: {step!r}")  # pragma: no cover


def _drive(conn: psycopg.Connection[Any], op: Op[T], step: Step,
           commit: Callable[[], None]) -> T:
    while True:
        value: Any = None
        error: BaseException | None = None
        try:
            if isinstance(step, Commit):
                commit()
            else:
                value = _execute(conn, step)
        except Exception as exc:
            error = exc
        try:
            step = op.throw(error) if error is not None else op.send(value)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


def _own_transactions(conn: psycopg.Connection[Any], op: Op[T], step: Step,
                      session: Session) -> T:
    """Run on a connection we own (autocommit): one transaction per unit of work."""
    with contextlib.ExitStack() as outer:
        stack = outer.enter_context(contextlib.ExitStack())

        def begin() -> None:
            stack.enter_context(conn.transaction())
            for s in session.setup:
                _execute(conn, s)

        def commit() -> None:
            stack.close()
            begin()

        begin()
        return _drive(conn, op, step, commit)


def _host_transaction(conn: psycopg.Connection[Any], op: Op[T], step: Step,
                      session: Session) -> T:
    """Run inside the caller's transaction, in a savepoint, never committing it."""
    if conn.pgconn.transaction_status == pq.TransactionStatus.IDLE:
        if conn.autocommit:
            return _own_transactions(conn, op, step, session)
        # Non-autocommit and idle: psycopg begins the host's transaction with the
        # next statement. Begin it now, so that the savepoint below is a
        # savepoint and not a transaction of our own that would commit.
        conn.execute(query("host_tx_begin"))
    with conn.transaction():
        for s in session.host_setup:
            _execute(conn, s)
        return _drive(conn, op, step, lambda: None)


def run_sync(op: Op[T], *, pool: ConnectionPool | None = None,
             conn: psycopg.Connection[Any] | None = None,
             session: Session = NO_SESSION) -> T:
    """Run ``op`` on the caller's ``conn`` (joining its transaction) or on a pooled connection."""
    if conn is not None and not isinstance(conn, psycopg.Connection):
        op.close()
        raise errors.ConfigurationError(
            f"conn= takes a psycopg.Connection here, not {type(conn).__name__} "
            "(use AsyncScheduler for an AsyncConnection)")
    with db.translate():
        step, result = _first_io_step(op)
        if step is None:
            return result  # type: ignore[return-value]
        if conn is not None:
            return _host_transaction(conn, op, step, session)
        if pool is None:
            op.close()
            raise errors.ConfigurationError("this scheduler has no pool: pass conn=")
        with pool.connection() as own:
            return _own_transactions(own, op, step, session)


def run(target: psycopg.Connection[Any] | str, op: Op[T]) -> T:
    """Run ``op`` on ``target``: a connection (joining its transaction, as ``conn=``)
    or a DSN (a short connection of its own). The free functions of the modules
    (feedback, unsubscribe, reputation) are this over the same operations the
    Scheduler runs."""
    if isinstance(target, str):
        return run_on(target, op)
    return run_sync(op, conn=target)


def run_on(dsn: str, op: Op[T], *, session: Session = NO_SESSION) -> T:
    """Run ``op`` on a short connection to ``dsn`` (the one-shot entry points)."""
    with db.translate():
        step, result = _first_io_step(op)
        if step is None:
            return result  # type: ignore[return-value]
        with db.connect(dsn) as own:
            return _own_transactions(own, op, step, session)


# ---------------------------------------------------------------------------
# The async runner: the same, awaited
# ---------------------------------------------------------------------------


async def _aexecute(conn: psycopg.AsyncConnection[Any], step: Step) -> Any:
    if isinstance(step, Fetch):
        cur = conn.cursor(row_factory=dict_row if step.dicts else tuple_row)
        await cur.execute(step.sql, step.params)
        if step.rows == "one":
            return await cur.fetchone()
        return await cur.fetchall() if step.rows == "all" else None
    if isinstance(step, Copy):
        async with conn.cursor().copy(step.sql) as copy:
            for i, row in enumerate(step.rows, 1):
                await copy.write_row(row)
                if i % _COPY_YIELD_ROWS == 0:
                    await asyncio.sleep(0)  # write_row awaits only when its buffer is full
        return None
    if isinstance(step, Compute):
        return await asyncio.to_thread(step.fn)
    raise TypeError(f"not a step: {step!r}")  # pragma: no cover


async def _adrive(conn: psycopg.AsyncConnection[Any], op: Op[T], step: Step,
                  commit: Callable[[], Any]) -> T:
    while True:
        value: Any = None
        error: BaseException | None = None
        try:
            if isinstance(step, Commit):
                await commit()
            else:
                value = await _aexecute(conn, step)
        except Exception as exc:
            error = exc
        try:
            step = op.throw(error) if error is not None else op.send(value)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


async def _aown_transactions(conn: psycopg.AsyncConnection[Any], op: Op[T], step: Step,
                             session: Session) -> T:
    async with contextlib.AsyncExitStack() as outer:
        stack = await outer.enter_async_context(contextlib.AsyncExitStack())

        async def begin() -> None:
            await stack.enter_async_context(conn.transaction())
            for s in session.setup:
                await _aexecute(conn, s)

        async def commit() -> None:
            await stack.aclose()
            await begin()

        await begin()
        return await _adrive(conn, op, step, commit)


async def _ahost_transaction(conn: psycopg.AsyncConnection[Any], op: Op[T], step: Step,
                             session: Session) -> T:
    if conn.pgconn.transaction_status == pq.TransactionStatus.IDLE:
        if conn.autocommit:
            return await _aown_transactions(conn, op, step, session)
        await conn.execute(query("host_tx_begin"))

    async def nothing() -> None:
        return None

    async with conn.transaction():
        for s in session.host_setup:
            await _aexecute(conn, s)
        return await _adrive(conn, op, step, nothing)


async def run_async(op: Op[T], *, pool: AsyncConnectionPool | None = None,
                    conn: psycopg.AsyncConnection[Any] | None = None,
                    session: Session = NO_SESSION) -> T:
    """Run ``op`` on the caller's ``conn`` (joining its transaction) or on a pooled connection."""
    if conn is not None and not isinstance(conn, psycopg.AsyncConnection):
        op.close()
        raise errors.ConfigurationError(
            f"conn= takes a psycopg.AsyncConnection here, not {type(conn).__name__} "
            "(use Scheduler for a psycopg.Connection)")
    with db.translate():
        step, result = await _afirst_io_step(op)
        if step is None:
            return result  # type: ignore[return-value]
        if conn is not None:
            return await _ahost_transaction(conn, op, step, session)
        if pool is None:
            op.close()
            raise errors.ConfigurationError("this scheduler has no pool: pass conn=")
        async with pool.connection() as own:
            return await _aown_transactions(own, op, step, session)


__all__ = ["AsyncRunner", "Commit", "Compute", "Copy", "Fetch", "Op", "Session", "SyncRunner",
           "run_async", "run_on", "run_sync"]
