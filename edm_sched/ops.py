"""The operations of the host API, once: validated arguments -> named SQL -> result.

Each function is an operation of :mod:`edm_sched.core`: its body checks the
arguments (before any connection is taken), then yields the named statements of
``sql/queries.sql`` and maps their rows onto the models. ``Scheduler`` and
``AsyncScheduler`` (:mod:`edm_sched.api`) run them; nothing here does I/O.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import pydantic
from psycopg.types.json import Jsonb

from edm_sched import errors
from edm_sched.core import Commit, Compute, Copy, Fetch, Op
from edm_sched.models import (
    Contact,
    ContactImport,
    CreatedTask,
    Email,
    InvalidAddress,
    LimitStatus,
    Name,
    Recipient,
    Service,
    ServiceLimit,
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
from edm_sched.views import (
    Alert,
    ConfigEntry,
    ServiceState,
    Status,
    SystemHealth,
    TaskProgress,
    WaitReason,
)

EXPANSION_CHUNK = 200_000
# Explicit lists longer than this are validated in a worker thread by AsyncScheduler.
_HEAVY = 1000


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


def check_id(value: Any, what: str) -> int:
    """A database id: a positive 64-bit integer, else :class:`errors.InvalidInput`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**63:
        raise errors.InvalidInput(f"{what} must be a positive 64-bit integer, got {value!r}")
    return value


def check_scope(user_id: str | None) -> str | None:
    """An optional tenant scope, validated like a user id."""
    if user_id is not None:
        validate(UserArgs, {"user_id": user_id})
    return user_id


def check_limit(limit: Any, top: int = 10_000) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= top:
        raise errors.InvalidInput(f"limit must be an integer in 1..{top}, got {limit!r}")
    return limit


def _scalar(sql: Any, params: Any) -> Op[Any]:
    row = yield Fetch(sql, params)
    return None if row is None else row[0]


# ---------------------------------------------------------------------- users


def upsert_user(user_id: str, display_name: str | None, quota_limit: int | None) -> Op[None]:
    validate(UserArgs, {"user_id": user_id, "display_name": display_name,
                        "quota_limit": quota_limit})
    yield from _scalar(query("upsert_user"), (user_id, display_name, quota_limit))


def set_user_quota(user_id: str, quota_limit: int | None) -> Op[None]:
    validate(UserArgs, {"user_id": user_id, "quota_limit": quota_limit})
    yield from _scalar(query("set_user_quota"), (user_id, quota_limit))


def get_user(user_id: str) -> Op[UserInfo]:
    row = yield Fetch(query("get_user"), (user_id,), dicts=True)
    if row is None:
        raise errors.NotFound(f"unknown user {user_id}")
    return UserInfo.model_validate(row)


# ------------------------------------------------------------------- services


def create_service(spec: ServiceSpec | Mapping[str, Any]) -> Op[int]:
    s = validate(ServiceSpec, spec)
    sid = yield from _scalar(query("create_service"), {
        "name": s.name, "from_addresses": s.from_addresses,
        "interval_ms": round(s.interval_seconds * 1000), "daily_quota": s.daily_quota,
        "transport": s.transport, "settings": Jsonb(s.settings),
        "credential_ref": s.credential_ref, "quota_tz": s.quota_tz, "enabled": s.enabled,
    })
    if s.limits:
        yield from _scalar(query("set_service_limits"),
                           (int(sid), Jsonb([lim.as_sql() for lim in s.limits])))
    return int(sid)


def set_service_limits(service_id: int,
                       limits: Iterable[ServiceLimit | Mapping[str, Any]]) -> Op[int]:
    # The shape of each limit is checked here for a clear message; uniqueness of the
    # names, like every rule across limits, is edm.set_service_limits' (ED005).
    checked = [validate(ServiceLimit, lim) for lim in limits]
    return int((yield from _scalar(query("set_service_limits"), (
        check_id(service_id, "service_id"), Jsonb([lim.as_sql() for lim in checked])))))


def service_limits(service_id: int) -> Op[list[LimitStatus]]:
    rows = yield Fetch(query("service_limits"), (check_id(service_id, "service_id"),),
                       rows="all", dicts=True)
    if not rows:
        raise errors.NotFound(f"unknown service {service_id}")
    return [LimitStatus.model_validate(r) for r in rows]


def update_service(service_id: int, changes: ServiceUpdate | Mapping[str, Any]) -> Op[None]:
    c = validate(ServiceUpdate, changes)
    yield from _scalar(query("update_service"), {
        "service_id": check_id(service_id, "service_id"), "name": c.name,
        "from_addresses": c.from_addresses,
        "interval_ms": None if c.interval_seconds is None else round(c.interval_seconds * 1000),
        "daily_quota": c.daily_quota,
        "settings": None if c.settings is None else Jsonb(c.settings),
        "credential_ref": c.credential_ref, "quota_tz": c.quota_tz, "enabled": c.enabled,
    })


def get_service(service_id: int) -> Op[Service]:
    row = yield Fetch(query("get_service"), (check_id(service_id, "service_id"),), dicts=True)
    if row is None:
        raise errors.NotFound(f"unknown service {service_id}")
    return Service.model_validate(row)


def grant(service_id: int, user_id: str, priority: int) -> Op[None]:
    validate(GrantArgs, {"service_id": service_id, "user_id": user_id, "priority": priority})
    yield from _scalar(query("grant_service"), (service_id, user_id, priority))


def revoke(service_id: int, user_id: str) -> Op[bool]:
    validate(GrantArgs, {"service_id": service_id, "user_id": user_id, "priority": 0})
    return bool((yield from _scalar(query("revoke_service"), (service_id, user_id))))


# ------------------------------------------------------------------- contacts


def _contact_rows(contacts: Iterable[Contact | Mapping[str, Any]]) -> Iterator[tuple[Any, ...]]:
    for i, raw in enumerate(contacts):
        c = validate(Contact, raw)
        yield (i, c.email, Jsonb(c.attributes), c.tags, c.unsubscribed)


def upsert_contacts(user_id: str,
                    contacts: Iterable[Contact | Mapping[str, Any]]) -> Op[ContactImport]:
    validate(UserArgs, {"user_id": user_id})
    yield Fetch(query("stage_contacts_create"), rows="none")
    yield Fetch(query("stage_contacts_clear"), rows="none")
    yield Fetch(query("stage_share"), ("edm_stage_contacts",))
    yield Copy(query("stage_contacts_copy"), _contact_rows(contacts))
    row = yield Fetch(query("merge_staged_contacts"), (user_id,))
    yield Fetch(query("stage_contacts_clear"), rows="none")
    assert row is not None
    return ContactImport(inserted=row[0], updated=row[1])


def tag_contacts(user_id: str, emails: list[str], add: list[str] | None,
                 remove: list[str] | None) -> Op[int]:
    a = validate(TagArgs, {"user_id": user_id, "emails": emails, "add": add or [],
                           "remove": remove or []})
    return int((yield from _scalar(query("set_contact_tags"), (a.user_id, a.emails, a.add,
                                                                a.remove))))


def delete_tag(user_id: str, tag: str) -> Op[int]:
    a = validate(TagArgs, {"user_id": user_id, "add": [tag]})
    return int((yield from _scalar(query("delete_tag"), (a.user_id, tag))))


def suppress(email: str, reason: str, user_id: str | None) -> Op[None]:
    a = validate(SuppressionArgs, {"email": email, "reason": reason, "user_id": user_id})
    yield from _scalar(query("add_suppression"), (a.email, a.reason, a.user_id))


def unsuppress(email: str, user_id: str | None) -> Op[bool]:
    a = validate(SuppressionArgs, {"email": email, "user_id": user_id})
    return bool((yield from _scalar(query("remove_suppression"), (a.email, a.user_id))))


# ---------------------------------------------------------------------- tasks


_RECIPIENTS = pydantic.TypeAdapter(list[Recipient])
_CHUNK = 250


def _is_heavy(spec: Any) -> bool:
    return (isinstance(spec, Mapping) and isinstance(spec.get("recipients"), list)
            and len(spec["recipients"]) > _HEAVY)


def _problems(exc: pydantic.ValidationError, offset: int = 0) -> list[str]:
    out = []
    for e in exc.errors():
        loc = list(e["loc"])
        if offset and loc:
            loc = ["recipients", int(loc[0]) + offset, *loc[1:]]
        out.append(f"{'.'.join(str(p) for p in loc) or 'value'}: {e['msg']}")
    return out


def validate_task(spec: TaskSpec | Mapping[str, Any]) -> TaskSpec:
    """``spec`` as a TaskSpec. A long explicit list is validated 250 recipients at a
    time, so a thread running this lets the event loop's thread take the GIL between
    chunks (one call over 20,000 recipients holds it for about 0.1 s)."""
    if not _is_heavy(spec):
        return validate(TaskSpec, spec)
    assert isinstance(spec, Mapping)
    raw = spec["recipients"]
    done: list[Recipient] = []
    problems: list[str] = []
    for start in range(0, len(raw), _CHUNK):
        try:
            done.extend(_RECIPIENTS.validate_python(raw[start:start + _CHUNK]))
        except pydantic.ValidationError as exc:
            problems += _problems(exc, start)
    try:
        task = TaskSpec.model_validate({**spec, "recipients": done})
    except pydantic.ValidationError as exc:
        problems += _problems(exc)
    if problems:
        raise errors.InvalidInput(f"invalid TaskSpec: {'; '.join(problems)}")
    return task


def create_task(spec: TaskSpec | Mapping[str, Any]) -> Op[CreatedTask]:
    """Explicit lists: COPY into a staging table, then one set-based statement.

    Tag rules: the task and its quota reservation, then the expansion in
    chunks, each chunk one unit of work (a Commit step).
    """
    if _is_heavy(spec):  # a long list: validated off the event loop (AsyncScheduler)
        t: TaskSpec = yield Compute(lambda: validate_task(spec))
    else:
        t = validate(TaskSpec, spec)
    templates = Jsonb([tpl.model_dump() for tpl in t.templates])
    if t.rule is not None:
        row = yield Fetch(query("create_task_from_rule"), {
            "user_id": t.user_id, "name": t.name, "templates": templates,
            "rule": Jsonb(t.rule.model_dump()), "priority": t.priority,
            "scheduled_at": t.scheduled_at,
        })
        assert row is not None
        task_id = int(row[0])
        if t.transactional:  # before the first Commit: never claimed as bulk
            yield Fetch(query("set_task_transactional"), (task_id, True))
        yield Commit()
        total = yield from _expand(task_id, EXPANSION_CHUNK)
        return CreatedTask(task_id=task_id, recipients=total)
    assert t.recipients is not None
    yield Fetch(query("stage_recipients_create"), rows="none")
    yield Fetch(query("stage_recipients_clear"), rows="none")
    yield Fetch(query("stage_share"), ("edm_stage_recipients",))
    yield Copy(query("stage_recipients_copy"),
               ((i, r.email, None if r.vars is None else Jsonb(r.vars))
                for i, r in enumerate(t.recipients)))
    rows = yield Fetch(query("stage_recipients_report"), rows="all")
    report = [InvalidAddress(position=p, email=e, reason=why) for p, e, why in rows]
    if report and t.on_invalid == "reject":
        raise InvalidRecipients(report)
    row = yield Fetch(query("create_task_from_staged"), {
        "user_id": t.user_id, "name": t.name, "templates": templates,
        "priority": t.priority, "scheduled_at": t.scheduled_at,
        "skip_invalid": t.on_invalid == "skip",
    })
    yield Fetch(query("stage_recipients_clear"), rows="none")
    assert row is not None
    if t.transactional and row[1]:  # same transaction: never claimed as bulk
        yield Fetch(query("set_task_transactional"), (row[0], True))
    return CreatedTask(task_id=row[0], recipients=row[1], invalid=report,
                       duplicates=row[3], suppressed=row[4])


def _expand(task_id: int, chunk: int) -> Op[int]:
    total = 0
    while True:
        row = yield Fetch(query("expand_task"), (task_id, chunk))
        assert row is not None
        total += int(row[0])
        if row[1]:
            return total
        yield Commit()


def expand(task_id: int, chunk: int) -> Op[int]:
    check_id(task_id, "task_id")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise errors.InvalidInput(f"chunk must be a positive integer, got {chunk!r}")
    return (yield from _expand(task_id, chunk))


def pause(task_id: int, user_id: str | None) -> Op[str]:
    params = (check_id(task_id, "task_id"), check_scope(user_id))
    return str((yield from _scalar(query("pause_task"), params)))


def resume(task_id: int, user_id: str | None) -> Op[str]:
    params = (check_id(task_id, "task_id"), check_scope(user_id))
    return str((yield from _scalar(query("resume_task"), params)))


def cancel(task_id: int, user_id: str | None) -> Op[int]:
    params = (check_id(task_id, "task_id"), check_scope(user_id))
    return int((yield from _scalar(query("cancel_task"), params)))


def task(task_id: int, user_id: str | None) -> Op[TaskStatus]:
    params = {"task_id": check_id(task_id, "task_id"), "user_id": check_scope(user_id)}
    row = yield Fetch(query("get_task"), params, dicts=True)
    if row is None:
        raise errors.NotFound(f"unknown task {task_id}")
    return TaskStatus.model_validate(row)


def tasks(user_id: str, limit: int) -> Op[list[TaskStatus]]:
    check_scope(user_id)
    check_limit(limit)
    rows = yield Fetch(query("list_tasks"), (user_id, limit), rows="all", dicts=True)
    return [TaskStatus.model_validate(r) for r in rows]


# ----------------------------------------------------------------- monitoring


def status(limit: int) -> Op[Status]:
    check_limit(limit)
    health = yield Fetch(query("system_health"), dicts=True)
    progress = yield Fetch(query("task_progress"), (limit,), rows="all", dicts=True)
    services = yield Fetch(query("service_status"), (limit,), rows="all", dicts=True)
    waiting = yield Fetch(query("task_wait_reasons"), (limit,), rows="all", dicts=True)
    alerts = yield Fetch(query("open_alerts"), (limit,), rows="all", dicts=True)
    return Status(
        health=SystemHealth.model_validate(health),
        tasks=[TaskProgress.model_validate(r) for r in progress],
        services=[ServiceState.model_validate(r) for r in services],
        waiting=[WaitReason.model_validate(r) for r in waiting],
        alerts=[Alert.model_validate(r) for r in alerts],
    )


def config_list() -> Op[list[ConfigEntry]]:
    rows = yield Fetch(query("config_list"), rows="all", dicts=True)
    return [ConfigEntry.model_validate(r) for r in rows]


def config_get(key: str) -> Op[ConfigEntry]:
    row = yield Fetch(query("config_get"), (key,), dicts=True)
    if row is None:
        new_key = yield from _renamed_key(key)
        if new_key is not None:
            row = yield Fetch(query("config_get"), (new_key,), dicts=True)
    if row is None:
        raise errors.NotFound(f"unknown config key {key!r}")
    return ConfigEntry.model_validate(row)


def config_set(key: str, value: Any, actor: str | None) -> Op[Any]:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = json.loads(value)
    row = yield Fetch(query("config_set"), (key, Jsonb(value), actor, key))
    assert row is not None
    if not row[1]:  # set through the name it had before a rename (edm.config_set maps it)
        yield from _renamed_key(key)
    return row[0]


def _renamed_key(key: str) -> Op[str | None]:
    """The name now of a setting renamed by a migration (edm.config_renamed), with a
    DeprecationWarning; None for a name that was never a setting's."""
    new_key = yield from _scalar(query("config_renamed"), (key,))
    if new_key is not None:
        warnings.warn(f"config key {key!r} is deprecated: it is called {new_key!r} now",
                      DeprecationWarning, stacklevel=5)
    return None if new_key is None else str(new_key)


# ------------------------------------------------- argument models (internal)
# Their titles are what error messages name ("invalid user arguments: ...").


class UserArgs(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True, title="user arguments")
    user_id: UserId
    display_name: Name | None = None
    quota_limit: int | None = pydantic.Field(default=None, ge=0, le=2**62)


class GrantArgs(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(strict=True, title="grant arguments")
    service_id: int = pydantic.Field(ge=1, le=2**62)
    user_id: UserId
    priority: int = pydantic.Field(ge=-1000, le=1000)


class TagArgs(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(strict=True, title="tag arguments")
    user_id: UserId
    emails: list[Email] = pydantic.Field(default_factory=list, max_length=1_000_000)
    add: list[Tag] = pydantic.Field(default_factory=list, max_length=1000)
    remove: list[Tag] = pydantic.Field(default_factory=list, max_length=1000)


class SuppressionArgs(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(strict=True, title="suppression arguments")
    email: Email
    reason: Literal["hard_bounce", "complaint", "unsubscribe", "manual"] = "manual"
    user_id: UserId | None = None
