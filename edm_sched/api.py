"""The host-facing API: :class:`Scheduler` and :class:`AsyncScheduler`.

Both are one-line facades over the operations of :mod:`edm_sched.ops` (and
:mod:`edm_sched.jobs.ops`), run by the sync or the async runner of
:mod:`edm_sched.core`: the argument checking, the SQL and the mapping of rows
onto models exist once. Inputs are validated by pydantic models first (a
malformed call never reaches the database), then by SQL (the authority); both
kinds of refusal surface as :class:`edm_sched.errors.InvalidInput` or a more
specific typed error.

Each call is one transaction on a pooled connection (tag-rule expansion
commits per chunk, with progress visible in the task's counters) — or, with
``conn=``, part of the caller's transaction, which it never commits: a task
created in a transaction that rolls back leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import warnings
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg

from edm_sched import core, db, errors, feedback, ops, reputation, shaping, sites, unsubscribe
from edm_sched.feedback import FeedbackEvent, Recorded
from edm_sched.jobs.api import AsyncJobs, Jobs
from edm_sched.models import (
    Contact,
    ContactImport,
    CreatedTask,
    LimitStatus,
    Service,
    ServiceLimit,
    ServiceSpec,
    ServiceUpdate,
    TaskSpec,
    TaskStatus,
    Template,
    UserInfo,
)
from edm_sched.ops import EXPANSION_CHUNK, InvalidRecipients, check_id, check_scope
from edm_sched.reply_rules import (
    ReplyRule,
    ReplyRuleSpec,
    ShapingAction,
    SiteSuspension,
    delete_reply_rule_op,
    enable_reply_rule_op,
    lift_suspension_op,
    reply_rules_op,
    set_reply_rule_op,
    shaping_actions_op,
    suspensions_op,
)
from edm_sched.reputation import ReputationRow
from edm_sched.shaping import ShapingLimitStatus
from edm_sched.sites import Site, SiteDomain, SiteResolver, Warmup
from edm_sched.unsubscribe import UnsubscribeConfig, UnsubscribeResult

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool, ConnectionPool

    from edm_sched.monitoring import ConfigEntry, Status

T = TypeVar("T")

DEFAULT_CONNECT_TIMEOUT = db.CONNECT_TIMEOUT
"""Seconds a new Scheduler waits for its first connection before DatabaseUnavailable."""

Conn = psycopg.Connection[Any]
AConn = psycopg.AsyncConnection[Any]


def _older_verb(old: str, new: str) -> None:
    warnings.warn(f"{old}() is deprecated: call {new}(), the verb of docs/glossary.md",
                  DeprecationWarning, stacklevel=3)


def _pool_settings(dsn: str | None, connect_timeout: float) -> tuple[str, dict[str, Any]]:
    resolved = db.resolve_dsn(dsn)
    if not resolved:
        raise errors.ConfigurationError("no DSN given and EDM_SCHED_DSN is not set")
    db.check_dsn(resolved)
    if not 0 < connect_timeout <= 600:
        raise errors.ConfigurationError("connect_timeout must be between 0 and 600 seconds")
    return resolved, {"autocommit": True, **db.timeout_kwargs(resolved, connect_timeout)}


class Monitoring:
    """Status and configuration (``scheduler.monitoring``): the views a DBA reads in psql."""

    def __init__(self, runner: core.SyncRunner, actor: str | None = None) -> None:
        self._runner = runner
        self._actor = actor

    def status(self, *, limit: int = 50, conn: Conn | None = None) -> Status:
        """System health, recent tasks, services, waiting reasons and open alerts."""
        return self._runner(ops.status(limit), conn, core.NO_SESSION)

    def config_list(self, *, conn: Conn | None = None) -> list[ConfigEntry]:
        return self._runner(ops.config_list(), conn, core.NO_SESSION)

    def config_get(self, key: str, *, conn: Conn | None = None) -> ConfigEntry:
        return self._runner(ops.config_get(key), conn, core.NO_SESSION)

    def config_set(self, key: str, value: Any, *, conn: Conn | None = None) -> Any:
        """Set a config value (text is read as JSON when it parses); ConfigRejected when refused."""
        return self._runner(ops.config_set(key, value, self._actor), conn, core.NO_SESSION)


class AsyncMonitoring:
    """The methods of :class:`Monitoring`, awaited (``async_scheduler.monitoring``)."""

    def __init__(self, runner: core.AsyncRunner, actor: str | None = None) -> None:
        self._runner = runner
        self._actor = actor

    async def status(self, *, limit: int = 50, conn: AConn | None = None) -> Status:
        return await self._runner(ops.status(limit), conn, core.NO_SESSION)

    async def config_list(self, *, conn: AConn | None = None) -> list[ConfigEntry]:
        return await self._runner(ops.config_list(), conn, core.NO_SESSION)

    async def config_get(self, key: str, *, conn: AConn | None = None) -> ConfigEntry:
        return await self._runner(ops.config_get(key), conn, core.NO_SESSION)

    async def config_set(self, key: str, value: Any, *, conn: AConn | None = None) -> Any:
        return await self._runner(ops.config_set(key, value, self._actor), conn,
                                  core.NO_SESSION)


class Scheduler:
    """Host API over a connection pool. Use as a context manager, or call :meth:`close`.

    ``scheduler.jobs`` manages recurring jobs and ``scheduler.monitoring``
    reads status and config, in the same style. Every method takes an optional
    ``conn=`` (a ``psycopg.Connection``) to run inside the caller's transaction.
    """

    def __init__(self, dsn: str | None = None, *, pool: ConnectionPool | None = None,
                 min_size: int = 1, max_size: int = 4, actor: str | None = None,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 site_resolver: SiteResolver | None = None) -> None:
        from psycopg_pool import ConnectionPool, PoolTimeout

        self.actor = actor  # recorded in edm.audit_log for administrative changes
        if site_resolver is not None and inspect.iscoroutinefunction(site_resolver):
            raise errors.ConfigurationError(
                "Scheduler takes a plain function as site_resolver (AsyncScheduler awaits one)")
        self.site_resolver = site_resolver
        if pool is None:
            resolved, kwargs = _pool_settings(dsn, connect_timeout)
            db.probe(resolved, connect_timeout)  # fails fast, naming host and port
            pool = ConnectionPool(resolved, min_size=min_size, max_size=max_size, open=False,
                                  kwargs=kwargs)
            try:
                pool.open(wait=True, timeout=connect_timeout)
            except PoolTimeout:
                pool.close()
                raise db.unavailable(resolved, connect_timeout, "the pool did not fill") \
                    from None
            self._own_pool = True
        else:
            self._own_pool = False
        self.pool = pool
        self._session = core.Session.for_actor(actor)
        self.jobs = Jobs(self._runner, actor=actor)
        self.monitoring = Monitoring(self._runner, actor)

    def _runner(self, op: core.Op[T], conn: Conn | None, session: core.Session) -> T:
        return core.run_sync(op, pool=self.pool, conn=conn, session=session)

    def _run(self, op: core.Op[T], conn: Conn | None) -> T:
        return core.run_sync(op, pool=self.pool, conn=conn, session=self._session)

    def close(self) -> None:
        if self._own_pool:
            self.pool.close()

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ users

    def upsert_user(self, user_id: str, *, display_name: str | None = None,
                    quota_limit: int | None = None, conn: Conn | None = None) -> None:
        """Create a user (the host's tenant id) or update its display name."""
        return self._run(ops.upsert_user(user_id, display_name, quota_limit), conn)

    def set_user_quota(self, user_id: str, quota_limit: int | None, *,
                       conn: Conn | None = None) -> None:
        """Most recipients the user may have reserved (None = unlimited)."""
        return self._run(ops.set_user_quota(user_id, quota_limit), conn)

    def get_user(self, user_id: str, *, conn: Conn | None = None) -> UserInfo:
        return self._run(ops.get_user(user_id), conn)

    # --------------------------------------------------------------- services

    def create_service(self, spec: ServiceSpec | Mapping[str, Any], *,
                       conn: Conn | None = None) -> int:
        """Add a sending account; returns its id (AlreadyExists for a taken name)."""
        return self._run(ops.create_service(spec), conn)

    def update_service(self, service_id: int, changes: ServiceUpdate | Mapping[str, Any], *,
                       conn: Conn | None = None) -> None:
        """Change some fields of a service (None = unchanged)."""
        return self._run(ops.update_service(service_id, changes), conn)

    def disable_service(self, service_id: int, *, conn: Conn | None = None) -> None:
        return self._run(ops.update_service(service_id, ServiceUpdate(enabled=False)), conn)

    def enable_service(self, service_id: int, *, conn: Conn | None = None) -> None:
        return self._run(ops.update_service(service_id, ServiceUpdate(enabled=True)), conn)

    def get_service(self, service_id: int, *, conn: Conn | None = None) -> Service:
        return self._run(ops.get_service(service_id), conn)

    def set_service_limits(self, service_id: int,
                           limits: Iterable[ServiceLimit | Mapping[str, Any]], *,
                           conn: Conn | None = None) -> int:
        """Replace the extra limits of a service (rate, rolling, calendar_day); returns
        how many it has. A limit whose definition is unchanged keeps its state."""
        return self._run(ops.set_service_limits(service_id, limits), conn)

    def service_limits(self, service_id: int, *, conn: Conn | None = None) -> list[LimitStatus]:
        """Every limit of a service (interval and daily quota included), use and headroom."""
        return self._run(ops.service_limits(service_id), conn)

    # ------------------------------------------------------- traffic shaping

    def set_global_limits(self, limits: Iterable[ServiceLimit | Mapping[str, Any]], *,
                          conn: Conn | None = None) -> int:
        """Replace the global limits (every send of every service); returns how many
        there are. A limit whose definition is unchanged keeps its state."""
        return self._run(shaping.set_global_limits_op(limits), conn)

    def set_site_limits(self, site: str, limits: Iterable[ServiceLimit | Mapping[str, Any]], *,
                        service_id: int | None = None, conn: Conn | None = None) -> int:
        """Replace the limits of a destination site across all services, or with
        ``service_id`` of that service to the site; returns how many there are."""
        return self._run(shaping.set_site_limits_op(site, limits, service_id), conn)

    def set_user_limits(self, user_id: str, limits: Iterable[ServiceLimit | Mapping[str, Any]], *,
                        conn: Conn | None = None) -> int:
        """Replace the limits of a user (a tenant's plan: per hour, per day...)."""
        return self._run(shaping.set_user_limits_op(user_id, limits), conn)

    def set_task_limits(self, task_id: int, limits: Iterable[ServiceLimit | Mapping[str, Any]], *,
                        conn: Conn | None = None) -> int:
        """Replace the limits of a task (a campaign's maximum rate)."""
        return self._run(shaping.set_task_limits_op(task_id, limits), conn)

    def set_task_transactional(self, task_id: int, transactional: bool = True, *,
                               conn: Conn | None = None) -> bool:
        """Move a task that is not finished to the transactional lane (or back)."""
        return self._run(shaping.set_task_transactional_op(task_id, transactional), conn)

    def shaping_limits(self, scope: str | None = None, *,
                       conn: Conn | None = None) -> list[ShapingLimitStatus]:
        """Every shaping limit (or those of one scope) with use, headroom and next free time."""
        return self._run(shaping.shaping_limits_op(scope), conn)

    def send_message(self, user_id: str, to: str, template: Template | Mapping[str, Any], *,
                     vars: Mapping[str, Any] | None = None, name: str | None = None,
                     scheduled_at: dt.datetime | None = None,
                     conn: Conn | None = None) -> CreatedTask:
        """Send one message now, in the transactional lane: a one-recipient
        transactional task (validated, suppressed and counted like any task)."""
        return self._run(shaping.send_message_op(user_id, to, template, vars=vars, name=name,
                                                 scheduled_at=scheduled_at), conn)

    def grant(self, service_id: int, user_id: str, *, priority: int = 0,
              conn: Conn | None = None) -> None:
        """Let ``user_id`` send through ``service_id``; higher priority grants are used first."""
        return self._run(ops.grant(service_id, user_id, priority), conn)

    def revoke(self, service_id: int, user_id: str, *, conn: Conn | None = None) -> bool:
        return self._run(ops.revoke(service_id, user_id), conn)

    # --------------------------------------------------------------- contacts

    def upsert_contacts(self, user_id: str, contacts: Iterable[Contact | Mapping[str, Any]], *,
                        conn: Conn | None = None) -> ContactImport:
        """Insert or merge contacts in bulk (COPY), in one transaction."""
        return self._run(ops.upsert_contacts(user_id, contacts), conn)

    def tag_contacts(self, user_id: str, emails: list[str], *, add: list[str] | None = None,
                     remove: list[str] | None = None, conn: Conn | None = None) -> int:
        """Add and remove tags on some of the user's contacts; returns contacts changed."""
        return self._run(ops.tag_contacts(user_id, emails, add, remove), conn)

    def delete_tag(self, user_id: str, tag: str, *, conn: Conn | None = None) -> int:
        """Delete a tag of the user everywhere; returns how many contacts had it."""
        return self._run(ops.delete_tag(user_id, tag), conn)

    def suppress(self, email: str, *, reason: str = "manual", user_id: str | None = None,
                 conn: Conn | None = None) -> None:
        """Never send to ``email`` (for ``user_id``, or for everyone)."""
        return self._run(ops.suppress(email, reason, user_id), conn)

    def unsuppress(self, email: str, *, user_id: str | None = None,
                   conn: Conn | None = None) -> bool:
        return self._run(ops.unsuppress(email, user_id), conn)

    # ------------------------------------------------------------------ tasks

    def create_task(self, spec: TaskSpec | Mapping[str, Any], *,
                    conn: Conn | None = None) -> CreatedTask:
        """Create a campaign from an explicit list or a tag rule.

        Explicit lists: COPY, then one set-based statement (dedupe, suppressions,
        quota reservation); an invalid address refuses the task with a
        per-address report (:class:`InvalidRecipients`) unless
        ``on_invalid="skip"``. Tag rules: the quota is reserved for every match,
        then subtasks are created in chunks, each its own transaction — or,
        under ``conn=``, all inside the caller's transaction.
        """
        created = self._run(ops.create_task(spec), conn)
        self._resolve_task_sites(created.task_id, conn)
        return created

    def expand(self, task_id: int, *, chunk: int = EXPANSION_CHUNK,
               conn: Conn | None = None) -> int:
        """Run (or resume) the expansion of a tag-rule task; returns subtasks created."""
        return self._run(ops.expand(task_id, chunk), conn)

    def pause_task(self, task_id: int, *, user_id: str | None = None,
                   conn: Conn | None = None) -> str:
        """Stop new claims for the task at once (in-flight sends complete)."""
        return self._run(ops.pause(task_id, user_id), conn)

    def resume_task(self, task_id: int, *, user_id: str | None = None,
                    conn: Conn | None = None) -> str:
        """Continue a paused task where it stopped."""
        return self._run(ops.resume(task_id, user_id), conn)

    def cancel_task(self, task_id: int, *, user_id: str | None = None,
                    conn: Conn | None = None) -> int:
        """End the task; unsent recipients are cancelled and their quota refunded."""
        return self._run(ops.cancel(task_id, user_id), conn)

    def get_task(self, task_id: int, *, user_id: str | None = None,
                 conn: Conn | None = None) -> TaskStatus:
        """Status and counters of a task (scoped to ``user_id`` when given)."""
        return self._run(ops.task(task_id, user_id), conn)

    # The older names of the task verbs, kept for a release (CHANGELOG: Deprecated).

    def pause(self, task_id: int, *, user_id: str | None = None,
              conn: Conn | None = None) -> str:
        """Deprecated: :meth:`pause_task`."""
        _older_verb("pause", "pause_task")
        return self.pause_task(task_id, user_id=user_id, conn=conn)

    def resume(self, task_id: int, *, user_id: str | None = None,
               conn: Conn | None = None) -> str:
        """Deprecated: :meth:`resume_task`."""
        _older_verb("resume", "resume_task")
        return self.resume_task(task_id, user_id=user_id, conn=conn)

    def cancel(self, task_id: int, *, user_id: str | None = None,
               conn: Conn | None = None) -> int:
        """Deprecated: :meth:`cancel_task`."""
        _older_verb("cancel", "cancel_task")
        return self.cancel_task(task_id, user_id=user_id, conn=conn)

    def task(self, task_id: int, *, user_id: str | None = None,
             conn: Conn | None = None) -> TaskStatus:
        """Deprecated: :meth:`get_task`."""
        _older_verb("task", "get_task")
        return self.get_task(task_id, user_id=user_id, conn=conn)

    def tasks(self, user_id: str, *, limit: int = 100,
              conn: Conn | None = None) -> list[TaskStatus]:
        """The user's tasks, newest first (at most ``limit``, 1..10000)."""
        return self._run(ops.tasks(user_id, limit), conn)

    # --------------------------------------------------------- deliverability

    def record_feedback(self, event: FeedbackEvent, *, now: dt.datetime | None = None,
                        conn: Conn | None = None) -> Recorded:
        """Record a bounce, complaint, unsubscribe or delivery, found by Message-ID."""
        return self._run(feedback.record_op([event], now), conn)[0]

    def unsubscribe(self, config: UnsubscribeConfig, token: str, *,
                    conn: Conn | None = None) -> UnsubscribeResult:
        """Verify an unsubscribe token and unsubscribe its address (idempotent)."""
        return self._run(unsubscribe.unsubscribe_op(config, token), conn)

    # -- reply rules and (service, site) suspensions (edm_sched.reply_rules) ------------

    def reply_rules(self, *, conn: Conn | None = None) -> list[ReplyRule]:
        """Every reply rule, in the order edm.complete tries them."""
        return self._run(reply_rules_op(), conn)

    def set_reply_rule(self, spec: ReplyRuleSpec | Mapping[str, Any], *,
                       conn: Conn | None = None) -> int:
        """Create or replace (by name) a reply rule; returns its rule_id."""
        return self._run(set_reply_rule_op(spec), conn)

    def enable_reply_rule(self, name: str, *, conn: Conn | None = None) -> None:
        """Enable a reply rule (NotFound for an unknown name)."""
        self._run(enable_reply_rule_op(name, True), conn)

    def disable_reply_rule(self, name: str, *, conn: Conn | None = None) -> None:
        """Disable a reply rule, shipped or not; it is kept (NotFound for an unknown name)."""
        self._run(enable_reply_rule_op(name, False), conn)

    def delete_reply_rule(self, name: str, *, conn: Conn | None = None) -> None:
        """Delete a reply rule (NotFound for an unknown name)."""
        self._run(delete_reply_rule_op(name), conn)

    def suspensions(self, service_id: int | None = None, *, in_force: bool = False,
                    conn: Conn | None = None) -> list[SiteSuspension]:
        """(service, site) suspensions with the rule and reply that set them."""
        return self._run(suspensions_op(service_id, in_force=in_force), conn)

    def lift_suspension(self, service_id: int, site: str, *, conn: Conn | None = None) -> bool:
        """End a (service, site) suspension now and reset its escalation; True if in force."""
        return self._run(lift_suspension_op(service_id, site), conn)

    def shaping_actions(self, service_id: int | None = None, *, limit: int = 100,
                        conn: Conn | None = None) -> list[ShapingAction]:
        """The latest reply-rule applications (newest first), with their replies."""
        return self._run(shaping_actions_op(service_id, limit=limit), conn)

    def reputation(self, *, conn: Conn | None = None) -> list[ReputationRow]:
        """Bounce and complaint rates per service and user, and pause reasons."""
        return self._run(reputation.status_op(), conn)

    def resume_service_reputation(self, service_id: int, *, conn: Conn | None = None) -> bool:
        """Re-enable a service the reputation breaker disabled."""
        return self._run(reputation.resume_service_op(check_id(service_id, "service_id")),
                         conn)

    def resume_user_reputation(self, user_id: str, *, conn: Conn | None = None) -> int:
        """Resume a user the reputation breaker paused; returns tasks resumed."""
        return self._run(reputation.resume_user_op(user_id), conn)

    # ------------------------------------------- sites and warm-up (issue 15)
    # Destination sites, the site resolver hook and warm-up ramps: see
    # edm_sched/sites.py (warmup_ramp builds a ramp without a database) and
    # docs/explanation/traffic-shaping.md.

    def set_site_domains(self, site: str, domains: Iterable[str],
                         description: str | None = None, *, conn: Conn | None = None) -> int:
        """Define ``site`` (created if new) and map ``domains`` to it; returns domains mapped."""
        return self._run(sites.set_site_domains(site, domains, description), conn)

    def sites(self, *, conn: Conn | None = None) -> list[Site]:
        """Every destination site, with its number of mapped domains."""
        return self._run(sites.sites(), conn)

    def site_domains(self, site: str, *, conn: Conn | None = None) -> list[SiteDomain]:
        """The domains mapped to ``site`` (NotFound for an unknown site)."""
        return self._run(sites.site_domains(site), conn)

    def suspend_site(self, service_id: int, site: str, until: dt.datetime,
                     reason: str = "suspended by hand", *, conn: Conn | None = None) -> None:
        """Suspend the (service, site) pair until ``until`` (a time already past lifts it)."""
        self._run(sites.suspend_site(service_id, site, until, reason), conn)

    def set_service_warmup(self, service_id: int, ramp: list[int] | None,
                           started_on: dt.date | None = None, *,
                           conn: Conn | None = None) -> Warmup | None:
        """Put a service on a warm-up ramp (daily ceilings, day 1 first; see
        :func:`edm_sched.sites.warmup_ramp`) from ``started_on`` (default: today in its quota_tz).
        ``None`` or ``[]`` ends the warm-up. Returns where it stands (None: no warm-up)."""
        return self._run(sites.set_service_warmup(service_id, ramp, started_on), conn)

    def warmup(self, service_id: int, *, conn: Conn | None = None) -> Warmup | None:
        """Where a service's warm-up stands: day n of N, today's ceiling (None: no warm-up)."""
        return self._run(sites.warmup(service_id), conn)

    def resolve_sites(self, domains: Iterable[str], *, conn: Conn | None = None) -> int:
        """Ask the site resolver about those of ``domains`` no site maps yet and cache
        its answers; returns rows cached. The hook's errors propagate here (after a
        task is created they are logged instead)."""
        if self.site_resolver is None:
            raise errors.ConfigurationError("this Scheduler has no site_resolver")
        asked = self._run(sites.unmapped(domains), conn)
        return self._cache_sites(asked, self.site_resolver(asked) if asked else {}, conn)

    def _cache_sites(self, asked: list[str], answer: Any, conn: Conn | None) -> int:
        if inspect.isawaitable(answer):
            if inspect.iscoroutine(answer):
                answer.close()
            raise errors.ConfigurationError("site_resolver returned an awaitable: "
                                            "use AsyncScheduler for an async resolver")
        found, names = sites.clean_answers(asked, answer)
        return self._run(sites.cache(found, names), conn)

    def _resolve_task_sites(self, task_id: int, conn: Conn | None) -> None:
        if self.site_resolver is None:
            return
        try:
            asked = self._run(sites.unmapped_of_task(task_id), conn)
            if asked:
                self._cache_sites(asked, self.site_resolver(asked), conn)
        except Exception:  # the task stands; its unresolved domains just have no site yet
            sites.log.exception("site resolver failed for task %s; its unmapped domains "
                                "stay without a site", task_id)


class AsyncScheduler:
    """The methods of :class:`Scheduler`, awaited, on a psycopg ``AsyncConnectionPool``.

    ``async with AsyncScheduler(dsn) as s:`` opens the pool (or ``await
    s.open()``; ``await s.close()``). ``conn=`` takes a
    ``psycopg.AsyncConnection``. Long explicit lists are validated in a worker
    thread and copied with awaited writes, so the event loop keeps turning.
    """

    def __init__(self, dsn: str | None = None, *, pool: AsyncConnectionPool | None = None,
                 min_size: int = 1, max_size: int = 4, actor: str | None = None,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 site_resolver: SiteResolver | None = None) -> None:
        from psycopg_pool import AsyncConnectionPool

        self.actor = actor
        self.site_resolver = site_resolver
        self.connect_timeout = connect_timeout
        if pool is None:
            self._dsn, kwargs = _pool_settings(dsn, connect_timeout)
            pool = AsyncConnectionPool(self._dsn, min_size=min_size, max_size=max_size,
                                       open=False, kwargs=kwargs)
            self._own_pool = True
        else:
            self._own_pool = False
        self.pool = pool
        self._session = core.Session.for_actor(actor)
        self.jobs = AsyncJobs(self._runner, actor=actor)
        self.monitoring = AsyncMonitoring(self._runner, actor)

    async def open(self) -> AsyncScheduler:
        """Open the pool this scheduler created (DatabaseUnavailable within connect_timeout)."""
        from psycopg_pool import PoolTimeout

        if self._own_pool:
            await db.aprobe(self._dsn, self.connect_timeout)
            try:
                await self.pool.open(wait=True, timeout=self.connect_timeout)
            except PoolTimeout:
                await self.pool.close()
                raise db.unavailable(self._dsn, self.connect_timeout,
                                     "the pool did not fill") from None
        return self

    async def close(self) -> None:
        if self._own_pool:
            await self.pool.close()

    async def __aenter__(self) -> AsyncScheduler:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _runner(self, op: core.Op[T], conn: AConn | None, session: core.Session) -> T:
        return await core.run_async(op, pool=self.pool, conn=conn, session=session)

    async def _run(self, op: core.Op[T], conn: AConn | None) -> T:
        return await core.run_async(op, pool=self.pool, conn=conn, session=self._session)

    async def upsert_user(self, user_id: str, *, display_name: str | None = None,
                          quota_limit: int | None = None, conn: AConn | None = None) -> None:
        return await self._run(ops.upsert_user(user_id, display_name, quota_limit), conn)

    async def set_user_quota(self, user_id: str, quota_limit: int | None, *,
                             conn: AConn | None = None) -> None:
        return await self._run(ops.set_user_quota(user_id, quota_limit), conn)

    async def get_user(self, user_id: str, *, conn: AConn | None = None) -> UserInfo:
        return await self._run(ops.get_user(user_id), conn)

    async def create_service(self, spec: ServiceSpec | Mapping[str, Any], *,
                             conn: AConn | None = None) -> int:
        return await self._run(ops.create_service(spec), conn)

    async def update_service(self, service_id: int,
                             changes: ServiceUpdate | Mapping[str, Any], *,
                             conn: AConn | None = None) -> None:
        return await self._run(ops.update_service(service_id, changes), conn)

    async def disable_service(self, service_id: int, *, conn: AConn | None = None) -> None:
        return await self._run(ops.update_service(service_id, ServiceUpdate(enabled=False)),
                               conn)

    async def enable_service(self, service_id: int, *, conn: AConn | None = None) -> None:
        return await self._run(ops.update_service(service_id, ServiceUpdate(enabled=True)),
                               conn)

    async def get_service(self, service_id: int, *, conn: AConn | None = None) -> Service:
        return await self._run(ops.get_service(service_id), conn)

    async def set_service_limits(self, service_id: int,
                                 limits: Iterable[ServiceLimit | Mapping[str, Any]], *,
                                 conn: AConn | None = None) -> int:
        return await self._run(ops.set_service_limits(service_id, limits), conn)

    async def service_limits(self, service_id: int, *,
                             conn: AConn | None = None) -> list[LimitStatus]:
        return await self._run(ops.service_limits(service_id), conn)

    async def set_global_limits(self, limits: Iterable[ServiceLimit | Mapping[str, Any]], *,
                                conn: AConn | None = None) -> int:
        return await self._run(shaping.set_global_limits_op(limits), conn)

    async def set_site_limits(self, site: str,
                              limits: Iterable[ServiceLimit | Mapping[str, Any]], *,
                              service_id: int | None = None, conn: AConn | None = None) -> int:
        return await self._run(shaping.set_site_limits_op(site, limits, service_id), conn)

    async def set_user_limits(self, user_id: str,
                              limits: Iterable[ServiceLimit | Mapping[str, Any]], *,
                              conn: AConn | None = None) -> int:
        return await self._run(shaping.set_user_limits_op(user_id, limits), conn)

    async def set_task_limits(self, task_id: int,
                              limits: Iterable[ServiceLimit | Mapping[str, Any]], *,
                              conn: AConn | None = None) -> int:
        return await self._run(shaping.set_task_limits_op(task_id, limits), conn)

    async def set_task_transactional(self, task_id: int, transactional: bool = True, *,
                                     conn: AConn | None = None) -> bool:
        return await self._run(shaping.set_task_transactional_op(task_id, transactional), conn)

    async def shaping_limits(self, scope: str | None = None, *,
                             conn: AConn | None = None) -> list[ShapingLimitStatus]:
        return await self._run(shaping.shaping_limits_op(scope), conn)

    async def send_message(self, user_id: str, to: str,
                           template: Template | Mapping[str, Any], *,
                           vars: Mapping[str, Any] | None = None, name: str | None = None,
                           scheduled_at: dt.datetime | None = None,
                           conn: AConn | None = None) -> CreatedTask:
        return await self._run(shaping.send_message_op(user_id, to, template, vars=vars,
                                                       name=name, scheduled_at=scheduled_at),
                               conn)

    async def grant(self, service_id: int, user_id: str, *, priority: int = 0,
                    conn: AConn | None = None) -> None:
        return await self._run(ops.grant(service_id, user_id, priority), conn)

    async def revoke(self, service_id: int, user_id: str, *, conn: AConn | None = None) -> bool:
        return await self._run(ops.revoke(service_id, user_id), conn)

    async def upsert_contacts(self, user_id: str,
                              contacts: Iterable[Contact | Mapping[str, Any]], *,
                              conn: AConn | None = None) -> ContactImport:
        return await self._run(ops.upsert_contacts(user_id, contacts), conn)

    async def tag_contacts(self, user_id: str, emails: list[str], *,
                           add: list[str] | None = None, remove: list[str] | None = None,
                           conn: AConn | None = None) -> int:
        return await self._run(ops.tag_contacts(user_id, emails, add, remove), conn)

    async def delete_tag(self, user_id: str, tag: str, *, conn: AConn | None = None) -> int:
        return await self._run(ops.delete_tag(user_id, tag), conn)

    async def suppress(self, email: str, *, reason: str = "manual", user_id: str | None = None,
                       conn: AConn | None = None) -> None:
        return await self._run(ops.suppress(email, reason, user_id), conn)

    async def unsuppress(self, email: str, *, user_id: str | None = None,
                         conn: AConn | None = None) -> bool:
        return await self._run(ops.unsuppress(email, user_id), conn)

    async def create_task(self, spec: TaskSpec | Mapping[str, Any], *,
                          conn: AConn | None = None) -> CreatedTask:
        created = await self._run(ops.create_task(spec), conn)
        await self._resolve_task_sites(created.task_id, conn)
        return created

    async def expand(self, task_id: int, *, chunk: int = EXPANSION_CHUNK,
                     conn: AConn | None = None) -> int:
        return await self._run(ops.expand(task_id, chunk), conn)

    async def pause_task(self, task_id: int, *, user_id: str | None = None,
                         conn: AConn | None = None) -> str:
        return await self._run(ops.pause(task_id, user_id), conn)

    async def resume_task(self, task_id: int, *, user_id: str | None = None,
                          conn: AConn | None = None) -> str:
        return await self._run(ops.resume(task_id, user_id), conn)

    async def cancel_task(self, task_id: int, *, user_id: str | None = None,
                          conn: AConn | None = None) -> int:
        return await self._run(ops.cancel(task_id, user_id), conn)

    async def get_task(self, task_id: int, *, user_id: str | None = None,
                       conn: AConn | None = None) -> TaskStatus:
        return await self._run(ops.task(task_id, user_id), conn)

    # The older names of the task verbs, kept for a release (CHANGELOG: Deprecated).

    async def pause(self, task_id: int, *, user_id: str | None = None,
                    conn: AConn | None = None) -> str:
        _older_verb("pause", "pause_task")
        return await self.pause_task(task_id, user_id=user_id, conn=conn)

    async def resume(self, task_id: int, *, user_id: str | None = None,
                     conn: AConn | None = None) -> str:
        _older_verb("resume", "resume_task")
        return await self.resume_task(task_id, user_id=user_id, conn=conn)

    async def cancel(self, task_id: int, *, user_id: str | None = None,
                     conn: AConn | None = None) -> int:
        _older_verb("cancel", "cancel_task")
        return await self.cancel_task(task_id, user_id=user_id, conn=conn)

    async def task(self, task_id: int, *, user_id: str | None = None,
                   conn: AConn | None = None) -> TaskStatus:
        _older_verb("task", "get_task")
        return await self.get_task(task_id, user_id=user_id, conn=conn)

    async def tasks(self, user_id: str, *, limit: int = 100,
                    conn: AConn | None = None) -> list[TaskStatus]:
        return await self._run(ops.tasks(user_id, limit), conn)

    async def record_feedback(self, event: FeedbackEvent, *, now: dt.datetime | None = None,
                              conn: AConn | None = None) -> Recorded:
        return (await self._run(feedback.record_op([event], now), conn))[0]

    async def unsubscribe(self, config: UnsubscribeConfig, token: str, *,
                          conn: AConn | None = None) -> UnsubscribeResult:
        return await self._run(unsubscribe.unsubscribe_op(config, token), conn)

    # -- reply rules and (service, site) suspensions (edm_sched.reply_rules) ------------

    async def reply_rules(self, *, conn: AConn | None = None) -> list[ReplyRule]:
        return await self._run(reply_rules_op(), conn)

    async def set_reply_rule(self, spec: ReplyRuleSpec | Mapping[str, Any], *,
                             conn: AConn | None = None) -> int:
        return await self._run(set_reply_rule_op(spec), conn)

    async def enable_reply_rule(self, name: str, *, conn: AConn | None = None) -> None:
        await self._run(enable_reply_rule_op(name, True), conn)

    async def disable_reply_rule(self, name: str, *, conn: AConn | None = None) -> None:
        await self._run(enable_reply_rule_op(name, False), conn)

    async def delete_reply_rule(self, name: str, *, conn: AConn | None = None) -> None:
        await self._run(delete_reply_rule_op(name), conn)

    async def suspensions(self, service_id: int | None = None, *, in_force: bool = False,
                          conn: AConn | None = None) -> list[SiteSuspension]:
        return await self._run(suspensions_op(service_id, in_force=in_force), conn)

    async def lift_suspension(self, service_id: int, site: str, *,
                              conn: AConn | None = None) -> bool:
        return await self._run(lift_suspension_op(service_id, site), conn)

    async def shaping_actions(self, service_id: int | None = None, *, limit: int = 100,
                              conn: AConn | None = None) -> list[ShapingAction]:
        return await self._run(shaping_actions_op(service_id, limit=limit), conn)

    async def reputation(self, *, conn: AConn | None = None) -> list[ReputationRow]:
        return await self._run(reputation.status_op(), conn)

    async def resume_service_reputation(self, service_id: int, *,
                                        conn: AConn | None = None) -> bool:
        return await self._run(
            reputation.resume_service_op(check_id(service_id, "service_id")), conn)

    async def resume_user_reputation(self, user_id: str, *, conn: AConn | None = None) -> int:
        return await self._run(reputation.resume_user_op(user_id), conn)

    # ------------------------------------------- sites and warm-up (issue 15)

    async def set_site_domains(self, site: str, domains: Iterable[str],
                               description: str | None = None, *,
                               conn: AConn | None = None) -> int:
        return await self._run(sites.set_site_domains(site, domains, description), conn)

    async def sites(self, *, conn: AConn | None = None) -> list[Site]:
        return await self._run(sites.sites(), conn)

    async def site_domains(self, site: str, *, conn: AConn | None = None) -> list[SiteDomain]:
        return await self._run(sites.site_domains(site), conn)

    async def suspend_site(self, service_id: int, site: str, until: dt.datetime,
                           reason: str = "suspended by hand", *,
                           conn: AConn | None = None) -> None:
        await self._run(sites.suspend_site(service_id, site, until, reason), conn)

    async def set_service_warmup(self, service_id: int, ramp: list[int] | None,
                                 started_on: dt.date | None = None, *,
                                 conn: AConn | None = None) -> Warmup | None:
        return await self._run(sites.set_service_warmup(service_id, ramp, started_on), conn)

    async def warmup(self, service_id: int, *, conn: AConn | None = None) -> Warmup | None:
        return await self._run(sites.warmup(service_id), conn)

    async def resolve_sites(self, domains: Iterable[str], *, conn: AConn | None = None) -> int:
        """:meth:`Scheduler.resolve_sites`; the resolver may be async, and a plain
        function runs in a worker thread (a DNS lookup does not stall the event loop)."""
        if self.site_resolver is None:
            raise errors.ConfigurationError("this AsyncScheduler has no site_resolver")
        asked = await self._run(sites.unmapped(domains), conn)
        return await self._cache_sites(asked, await self._ask(asked) if asked else {}, conn)

    async def _ask(self, asked: list[str]) -> Any:
        hook = self.site_resolver
        assert hook is not None
        if inspect.iscoroutinefunction(hook):
            return await hook(asked)
        answer = await asyncio.to_thread(hook, asked)
        return await answer if inspect.isawaitable(answer) else answer

    async def _cache_sites(self, asked: list[str], answer: Any, conn: AConn | None) -> int:
        found, names = sites.clean_answers(asked, answer)
        return await self._run(sites.cache(found, names), conn)

    async def _resolve_task_sites(self, task_id: int, conn: AConn | None) -> None:
        if self.site_resolver is None:
            return
        try:
            asked = await self._run(sites.unmapped_of_task(task_id), conn)
            if asked:
                await self._cache_sites(asked, await self._ask(asked), conn)
        except Exception:  # the task stands; its unresolved domains just have no site yet
            sites.log.exception("site resolver failed for task %s; its unmapped domains "
                                "stay without a site", task_id)


__all__ = ["DEFAULT_CONNECT_TIMEOUT", "EXPANSION_CHUNK", "AsyncMonitoring", "AsyncScheduler",
           "InvalidRecipients", "Monitoring", "Scheduler", "check_id", "check_scope"]
