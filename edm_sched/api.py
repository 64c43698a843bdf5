"""The host-facing API: :class:`Scheduler`.

A thin, synchronous wrapper over the SQL functions of ``sql/migrations/0003``.
Inputs are validated by pydantic models first (a malformed call never reaches
the database), then by SQL (the authority); both kinds of refusal surface as
:class:`edm_sched.errors.InvalidInput` or a more specific typed error, and
nothing is half-written because each call is one transaction (tag-rule
expansion commits per chunk, with progress visible in the task's counters).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

import psycopg
import pydantic
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from edm_sched import db, errors
from edm_sched.models import (
    Contact,
    ContactImport,
    CreatedTask,
    Email,
    InvalidAddress,
    Name,
    Service,
    ServiceSpec,
    ServiceUpdate,
    Tag,
    TaskSpec,
    TaskStatus,
    UserId,
    UserInfo,
    validate,
)
from edm_sched.sqlfiles import query

EXPANSION_CHUNK = 200_000


def check_id(value: Any, what: str) -> int:
    """A database id: a positive 64-bit integer, else :class:`errors.InvalidInput`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**63:
        raise errors.InvalidInput(f"{what} must be a positive 64-bit integer, got {value!r}")
    return value


def check_scope(user_id: str | None) -> str | None:
    """An optional tenant scope, validated like a user id."""
    if user_id is not None:
        validate(_UserArgs, {"user_id": user_id})
    return user_id


class InvalidRecipients(errors.InvalidInput):
    """An explicit recipient list holds invalid addresses; ``report`` lists each one."""

    code = "INVALID_RECIPIENTS"

    def __init__(self, report: list[InvalidAddress]) -> None:
        first = report[0]
        super().__init__(
            f"{len(report)} invalid recipient address(es); first at position {first.position}: "
            f"{first.email!r}: {first.reason}"
        )
        self.report = report


class Scheduler:
    """Host API over a connection pool. Use as a context manager, or call :meth:`close`."""

    def __init__(self, dsn: str | None = None, *, pool: ConnectionPool | None = None,
                 min_size: int = 1, max_size: int = 4, actor: str | None = None) -> None:
        self.actor = actor  # recorded in edm.audit_log for administrative changes
        if pool is None:
            resolved = db.resolve_dsn(dsn)
            if not resolved:
                raise errors.ConfigurationError("no DSN given and EDM_SCHED_DSN is not set")
            db.check_dsn(resolved)
            pool = ConnectionPool(resolved, min_size=min_size, max_size=max_size, open=False,
                                  kwargs={"autocommit": True})
            try:
                pool.open(wait=True, timeout=10)
            except PoolTimeout as exc:
                pool.close()
                raise errors.DatabaseUnavailable(
                    f"cannot connect to {db.redact(resolved)}: {exc}") from None
            self._own_pool = True
        else:
            self._own_pool = False
        self.pool = pool

    def close(self) -> None:
        if self._own_pool:
            self.pool.close()

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[psycopg.Connection[Any]]:
        """One transaction on a pooled connection, errors translated."""
        with self.pool.connection() as conn, db.translate(), conn.transaction():
            if self.actor:
                conn.execute(query("set_actor"), (self.actor,))
            yield conn

    def _one(self, name: str, params: Any) -> Any:
        with self._tx() as conn:
            row = conn.execute(query(name), params).fetchone()
            return None if row is None else row[0]

    # ------------------------------------------------------------------ users

    def upsert_user(self, user_id: str, *, display_name: str | None = None,
                    quota_limit: int | None = None) -> None:
        """Create a user (the host's tenant id) or update its display name."""
        validate(_UserArgs, {"user_id": user_id, "display_name": display_name,
                             "quota_limit": quota_limit})
        self._one("upsert_user", (user_id, display_name, quota_limit))

    def set_user_quota(self, user_id: str, quota_limit: int | None) -> None:
        """Most recipients the user may have reserved (None = unlimited)."""
        validate(_UserArgs, {"user_id": user_id, "quota_limit": quota_limit})
        self._one("set_user_quota", (user_id, quota_limit))

    def get_user(self, user_id: str) -> UserInfo:
        with self.pool.connection() as conn, db.translate():
            cur = conn.cursor(row_factory=dict_row)
            row = cur.execute(query("get_user"), (user_id,)).fetchone()
        if row is None:
            raise errors.NotFound(f"unknown user {user_id}")
        return UserInfo.model_validate(row)

    # --------------------------------------------------------------- services

    def create_service(self, spec: ServiceSpec | Mapping[str, Any]) -> int:
        """Add a sending account; returns its id."""
        s = validate(ServiceSpec, spec)
        return int(self._one("create_service", {
            "name": s.name, "from_addresses": s.from_addresses,
            "interval_ms": round(s.interval_seconds * 1000), "daily_quota": s.daily_quota,
            "transport": s.transport, "settings": Jsonb(s.settings),
            "credential_ref": s.credential_ref, "quota_tz": s.quota_tz, "enabled": s.enabled,
        }))

    def update_service(self, service_id: int, changes: ServiceUpdate | Mapping[str, Any]) -> None:
        """Change some fields of a service (None = unchanged)."""
        c = validate(ServiceUpdate, changes)
        self._one("update_service", {
            "service_id": check_id(service_id, "service_id"), "name": c.name,
            "from_addresses": c.from_addresses,
            "interval_ms": None if c.interval_seconds is None else round(c.interval_seconds * 1000),
            "daily_quota": c.daily_quota,
            "settings": None if c.settings is None else Jsonb(c.settings),
            "credential_ref": c.credential_ref, "quota_tz": c.quota_tz, "enabled": c.enabled,
        })

    def disable_service(self, service_id: int) -> None:
        self.update_service(service_id, ServiceUpdate(enabled=False))

    def enable_service(self, service_id: int) -> None:
        self.update_service(service_id, ServiceUpdate(enabled=True))

    def get_service(self, service_id: int) -> Service:
        with self.pool.connection() as conn, db.translate():
            row = conn.cursor(row_factory=dict_row).execute(
                query("get_service"), (check_id(service_id, "service_id"),)).fetchone()
        if row is None:
            raise errors.NotFound(f"unknown service {service_id}")
        return Service.model_validate(row)

    def grant(self, service_id: int, user_id: str, *, priority: int = 0) -> None:
        """Let ``user_id`` send through ``service_id``; higher priority grants are used first."""
        validate(_GrantArgs, {"service_id": service_id, "user_id": user_id, "priority": priority})
        self._one("grant_service", (service_id, user_id, priority))

    def revoke(self, service_id: int, user_id: str) -> bool:
        validate(_GrantArgs, {"service_id": service_id, "user_id": user_id, "priority": 0})
        return bool(self._one("revoke_service", (service_id, user_id)))

    # --------------------------------------------------------------- contacts

    def upsert_contacts(self, user_id: str,
                        contacts: Iterable[Contact | Mapping[str, Any]]) -> ContactImport:
        """Insert or merge contacts in bulk (COPY), in one transaction."""
        validate(_UserArgs, {"user_id": user_id})
        with self._tx() as conn:
            conn.execute(query("stage_contacts_create"))
            conn.execute(query("stage_share"), ("edm_stage_contacts",))
            with conn.cursor().copy(query("stage_contacts_copy")) as copy:
                for i, raw in enumerate(contacts):
                    c = validate(Contact, raw)
                    copy.write_row((i, c.email, Jsonb(c.attributes), c.tags, c.unsubscribed))
            row = conn.execute(query("merge_staged_contacts"), (user_id,)).fetchone()
        assert row is not None
        return ContactImport(inserted=row[0], updated=row[1])

    def tag_contacts(self, user_id: str, emails: list[str], *, add: list[str] | None = None,
                     remove: list[str] | None = None) -> int:
        """Add and remove tags on some of the user's contacts; returns contacts changed."""
        a = validate(_TagArgs, {"user_id": user_id, "emails": emails, "add": add or [],
                                "remove": remove or []})
        return int(self._one("set_contact_tags", (a.user_id, a.emails, a.add, a.remove)))

    def delete_tag(self, user_id: str, tag: str) -> int:
        """Delete a tag of the user everywhere; returns how many contacts had it."""
        a = validate(_TagArgs, {"user_id": user_id, "add": [tag]})
        return int(self._one("delete_tag", (a.user_id, tag)))

    def suppress(self, email: str, *, reason: str = "manual", user_id: str | None = None) -> None:
        """Never send to ``email`` (for ``user_id``, or for everyone)."""
        a = validate(_SuppressionArgs, {"email": email, "reason": reason, "user_id": user_id})
        self._one("add_suppression", (a.email, a.reason, a.user_id))

    def unsuppress(self, email: str, *, user_id: str | None = None) -> bool:
        a = validate(_SuppressionArgs, {"email": email, "user_id": user_id})
        return bool(self._one("remove_suppression", (a.email, a.user_id)))

    # ------------------------------------------------------------------ tasks

    def create_task(self, spec: TaskSpec | Mapping[str, Any]) -> CreatedTask:
        """Create a campaign from an explicit list or a tag rule.

        Explicit lists: COPY, then one set-based statement (dedupe, suppressions,
        quota reservation); an invalid address refuses the task with a
        per-address report (:class:`InvalidRecipients`) unless
        ``on_invalid="skip"``. Tag rules: the quota is reserved for every match,
        then subtasks are created in chunks, each its own transaction.
        """
        t = validate(TaskSpec, spec)
        templates = Jsonb([tpl.model_dump() for tpl in t.templates])
        if t.rule is not None:
            return self._create_from_rule(t, templates)
        assert t.recipients is not None
        with self._tx() as conn:
            conn.execute(query("stage_recipients_create"))
            conn.execute(query("stage_share"), ("edm_stage_recipients",))
            with conn.cursor().copy(query("stage_recipients_copy")) as copy:
                for i, r in enumerate(t.recipients):
                    copy.write_row((i, r.email, None if r.vars is None else Jsonb(r.vars)))
            report = [InvalidAddress(position=p, email=e, reason=why) for p, e, why in
                      conn.execute(query("stage_recipients_report")).fetchall()]
            if report and t.on_invalid == "reject":
                raise InvalidRecipients(report)
            row = conn.execute(query("create_task_from_staged"), {
                "user_id": t.user_id, "name": t.name, "templates": templates,
                "priority": t.priority, "scheduled_at": t.scheduled_at,
                "skip_invalid": t.on_invalid == "skip",
            }).fetchone()
        assert row is not None
        return CreatedTask(task_id=row[0], recipients=row[1], invalid=report,
                           duplicates=row[3], suppressed=row[4])

    def _create_from_rule(self, t: TaskSpec, templates: Jsonb) -> CreatedTask:
        assert t.rule is not None
        with self._tx() as conn:
            row = conn.execute(query("create_task_from_rule"), {
                "user_id": t.user_id, "name": t.name, "templates": templates,
                "rule": Jsonb(t.rule.model_dump()), "priority": t.priority,
                "scheduled_at": t.scheduled_at,
            }).fetchone()
        assert row is not None
        task_id = int(row[0])
        total = self.expand(task_id)
        return CreatedTask(task_id=task_id, recipients=total)

    def expand(self, task_id: int, *, chunk: int = EXPANSION_CHUNK) -> int:
        """Run (or resume) the expansion of a tag-rule task; returns subtasks created."""
        check_id(task_id, "task_id")
        total = 0
        while True:
            with self._tx() as conn:
                row = conn.execute(query("expand_task"), (task_id, chunk)).fetchone()
            assert row is not None
            total += int(row[0])
            if row[1]:
                return total

    def pause(self, task_id: int, *, user_id: str | None = None) -> str:
        """Stop new claims for the task at once (in-flight sends complete)."""
        return str(self._one("pause_task", (check_id(task_id, "task_id"),
                                              check_scope(user_id))))

    def resume(self, task_id: int, *, user_id: str | None = None) -> str:
        """Continue a paused task where it stopped."""
        return str(self._one("resume_task", (check_id(task_id, "task_id"),
                                              check_scope(user_id))))

    def cancel(self, task_id: int, *, user_id: str | None = None) -> int:
        """End the task; unsent recipients are cancelled and their quota refunded."""
        return int(self._one("cancel_task", (check_id(task_id, "task_id"),
                                              check_scope(user_id))))

    def task(self, task_id: int, *, user_id: str | None = None) -> TaskStatus:
        """Status and counters of a task (scoped to ``user_id`` when given)."""
        with self.pool.connection() as conn, db.translate():
            row = conn.cursor(row_factory=dict_row).execute(
                query("get_task"), {"task_id": check_id(task_id, "task_id"),
                                    "user_id": check_scope(user_id)}).fetchone()
        if row is None:
            raise errors.NotFound(f"unknown task {task_id}")
        return TaskStatus.model_validate(row)

    def tasks(self, user_id: str, *, limit: int = 100) -> list[TaskStatus]:
        """The user's tasks, newest first (at most ``limit``, 1..10000)."""
        check_scope(user_id)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise errors.InvalidInput(f"limit must be an integer in 1..10000, got {limit!r}")
        with self.pool.connection() as conn, db.translate():
            rows = conn.cursor(row_factory=dict_row).execute(
                query("list_tasks"), (user_id, limit)).fetchall()
        return [TaskStatus.model_validate(r) for r in rows]

    # ------------------------------------ deliverability (edm_sched.feedback, .unsubscribe,
    # .reputation: functions of a connection; these delegate with a pooled one)

    def record_feedback(self, event: FeedbackEvent, *,
                        now: dt.datetime | None = None) -> Recorded:
        """Record a bounce, complaint, unsubscribe or delivery (``feedback.record``)."""
        from edm_sched import feedback
        with self.pool.connection() as conn:
            return feedback.record(conn, event, now=now)

    def unsubscribe(self, config: UnsubscribeConfig, token: str) -> UnsubscribeResult:
        """Verify an unsubscribe token and unsubscribe (``unsubscribe.unsubscribe``)."""
        from edm_sched import unsubscribe
        with self.pool.connection() as conn:
            return unsubscribe.unsubscribe(conn, config, token)

    def reputation(self) -> list[ReputationRow]:
        """Bounce and complaint rates per service and user (``reputation.status``)."""
        from edm_sched import reputation
        with self.pool.connection() as conn:
            return reputation.status(conn)

    def resume_service_reputation(self, service_id: int) -> bool:
        """Re-enable a service the reputation breaker disabled."""
        from edm_sched import reputation
        with self.pool.connection() as conn:
            return reputation.resume_service(conn, check_id(service_id, "service_id"))

    def resume_user_reputation(self, user_id: str) -> int:
        """Resume a user the reputation breaker paused; returns tasks resumed."""
        from edm_sched import reputation
        with self.pool.connection() as conn:
            return reputation.resume_user(conn, user_id)


class _UserArgs(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    user_id: UserId
    display_name: Name | None = None
    quota_limit: int | None = pydantic.Field(default=None, ge=0, le=2**62)


class _GrantArgs(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(strict=True)
    service_id: int = pydantic.Field(ge=1, le=2**62)
    user_id: UserId
    priority: int = pydantic.Field(ge=-1000, le=1000)


class _TagArgs(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(strict=True)
    user_id: UserId
    emails: list[Email] = pydantic.Field(default_factory=list, max_length=1_000_000)
    add: list[Tag] = pydantic.Field(default_factory=list, max_length=1000)
    remove: list[Tag] = pydantic.Field(default_factory=list, max_length=1000)


class _SuppressionArgs(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(strict=True)
    email: Email
    reason: Literal["hard_bounce", "complaint", "unsubscribe", "manual"] = "manual"
    user_id: UserId | None = None


if TYPE_CHECKING:  # the deliverability modules are imported when first used
    import datetime as dt

    from edm_sched.feedback import FeedbackEvent, Recorded
    from edm_sched.reputation import ReputationRow
    from edm_sched.unsubscribe import UnsubscribeConfig, UnsubscribeResult
