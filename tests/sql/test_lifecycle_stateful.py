"""A hypothesis state machine over the task lifecycle, against the real database.

It interleaves task creation (explicit lists with duplicates and suppressed
addresses; tag rules over contacts, expanded in chunks), claims by two
dispatchers under a controlled clock, completions with every outcome, pause,
resume, cancel, lease expiry, new contacts and new suppressions, and checks
after every step:

* I4: task counters equal the counts of their subtasks, ``total_count`` is
  the number of subtasks, ``users.claimable_tasks`` is right, and each user's
  ``quota_used`` is exactly what the SQL reserves and does not refund (see
  :func:`quota_problems` for the accounting);
* I6: a paused or cancelled task never gets a claim and never changes status
  except through resume or cancel; resume keeps the same subtasks in the same
  states; cancel leaves nothing pending and refunds exactly the unsent part;
* no subtask is leased by two owners (the database's leases are exactly the
  ones the model handed out), no subtask is sent twice;
* tenant isolation: every claimed service is granted to the task's user.

One database serves the whole run; each example starts from a TRUNCATE of the
edm tables (everything but ``edm.config`` and ``edm.schema_migrations``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from psycopg.types.json import Jsonb

from edm_sched import db, errors
from edm_sched.api import Scheduler
from tests.support.helpers import TEMPLATE, at, counters_match, reset_database
from tests.support.helpers import claim as claim_rows
from tests.support.helpers import complete as complete_rows

# Property-based runs of the claim on many generated worlds: the slow lane.
pytestmark = pytest.mark.slow

LEASE = 30  # seconds
MAX_ATTEMPTS = 5  # queue.max_attempts default
USERS = ("u1", "u2", "u3")
OWNERS = ("d1", "d2")
TAGS = ("a", "b", "c")
POOL = tuple(f"p{i}@pool.example" for i in range(6))  # addresses shared by list tasks
OUTCOMES = (("sent", None), ("transient", 421), ("permanent", 550), ("permanent", 554),
            ("service", 421), ("released", None), ("uncertain", None), ("render_error", None))
# The rate limit a service may carry (0008): at most 2 per 3 s, in bursts of 2.
RATE_LIMIT = {"name": "r", "kind": "rate", "max_count": 2, "window_ms": 3000, "burst": 2}


def variants(address: str) -> st.SearchStrategy[str]:
    """The address as given by a sloppy host: other case, surrounding spaces."""
    return st.sampled_from([address, address.upper(), f"  {address} ", address.capitalize()])


def normalize(address: str) -> str:
    return address.strip().lower()


def matches(rule: dict[str, list[str]], tags: set[str]) -> bool:
    return ((not rule["include_any"] or bool(tags & set(rule["include_any"])))
            and set(rule["include_all"]) <= tags
            and not tags & set(rule["exclude"]))


RULES = st.fixed_dictionaries({
    "include_any": st.lists(st.sampled_from(TAGS), max_size=2, unique=True),
    "include_all": st.lists(st.sampled_from(TAGS), max_size=2, unique=True),
    "exclude": st.lists(st.sampled_from((*TAGS, "d")), max_size=1, unique=True),
}).filter(lambda r: bool(r["include_any"] or r["include_all"]))


@dataclasses.dataclass
class Lease:
    subtask_id: int
    task_id: int
    owner: str
    expires: float  # seconds after T0
    attempt: int
    email: str


QUOTA_SQL = """
SELECT u.user_id, u.quota_used,
       coalesce(sum(t.total_count - t.cancelled_count), 0)
       + coalesce(sum(t.quota_reserved - t.total_count) FILTER (WHERE t.status = 'expanding'), 0)
FROM edm.users u LEFT JOIN edm.tasks t ON t.user_id = u.user_id
GROUP BY u.user_id, u.quota_used
ORDER BY u.user_id
"""


def quota_problems(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    """Users and tasks whose quota accounting is off; [] when it is exact.

    The accounting of the SQL: creation reserves every recipient (a list task
    its subtasks; a rule task every contact matching at creation); the end of
    an expansion refunds the reservation it did not use; cancel refunds the
    pending subtasks (and an unfinished expansion's unused reservation); a
    subtask that ends cancelled after a lease (a retry, release or expiry
    after cancel) was never sent and is refunded when it ends. Sent and failed
    subtasks keep their quota. So a user's quota_used is, over its tasks,
    total - cancelled, plus the not-yet-expanded reservation of expanding
    tasks; and a task that is not expanding keeps reserved exactly its
    pending and leased subtasks.
    """
    users = [r for r in conn.execute(QUOTA_SQL).fetchall() if r[1] != r[2]]
    tasks = conn.execute(
        "SELECT task_id, status, quota_reserved, pending_count, leased_count FROM edm.tasks"
        " WHERE status <> 'expanding' AND quota_reserved <> pending_count + leased_count"
    ).fetchall()
    return users + tasks


class LifecycleMachine(RuleBasedStateMachine):
    conn: psycopg.Connection[Any]
    sched: Scheduler

    def __init__(self) -> None:
        super().__init__()
        reset_database(self.conn)
        self.now = 0.0
        self.grants: set[tuple[int, str]] = set()
        self.services: list[int] = []
        self.quota_limit: dict[str, int | None] = {}
        self.contacts: dict[str, dict[str, tuple[set[str], bool]]] = {u: {} for u in USERS}
        self.suppressed: set[str] = set()
        self.status: dict[int, str] = {}
        self.owner_of: dict[int, str] = {}
        self.held: dict[int, Lease] = {}
        self.sent: set[int] = set()
        self.slots: dict[int, list[dt.datetime]] = {}
        self.interval: dict[int, float] = {}
        self.rate_limited: set[int] = set()

    # ----------------------------------------------------------------- world

    @initialize(
        limits=st.tuples(st.sampled_from([None, 6, 12]), st.sampled_from([None, 10]), st.none()),
        intervals=st.lists(st.sampled_from([0.0, 1.0]), min_size=2, max_size=3),
        rate_limited=st.sets(st.integers(0, 2), max_size=2),
        grant_bits=st.lists(st.sampled_from([True, True, False]), min_size=9, max_size=9),
        contacts=st.lists(
            st.tuples(st.sampled_from(USERS), st.integers(0, 5),
                      st.sets(st.sampled_from(TAGS), min_size=1, max_size=3),
                      st.sampled_from([False, False, True])),
            min_size=4, max_size=12),
        suppressed=st.sets(st.sampled_from(POOL), max_size=2),
        first_tasks=st.lists(st.integers(1, 4), min_size=3, max_size=3),
    )
    def world(self, limits: tuple[int | None, ...], intervals: list[float], rate_limited: set[int],
              grant_bits: list[bool], contacts: list[tuple[str, int, set[str], bool]],
              suppressed: set[str], first_tasks: list[int]) -> None:
        s = self.sched
        for user, limit in zip(USERS, limits, strict=True):
            s.upsert_user(user, quota_limit=limit)
            self.quota_limit[user] = limit
        for i, interval in enumerate(intervals):
            sid = s.create_service({"name": f"s{i}", "from_addresses": [f"s{i}@sender.example"],
                                    "interval_seconds": interval, "daily_quota": 1_000_000,
                                    "transport": "null"})
            self.services.append(sid)
            self.interval[sid] = interval
            if i in rate_limited:
                self.conn.execute("SELECT edm.set_service_limits(%s, %s)",
                                  (sid, json.dumps([RATE_LIMIT])))
                self.rate_limited.add(sid)
            for j, user in enumerate(USERS):
                if grant_bits[i * 3 + j]:
                    s.grant(sid, user)
                    self.grants.add((sid, user))
        for user, n, tags, unsub in contacts:
            self._add_contact(user, f"c{n}@{user}.example", tags, unsub)
        for address in suppressed:
            s.suppress(address)
            self.suppressed.add(address)
        # every user starts with a small campaign, so that claims find work early
        for user, n in zip(USERS, first_tasks, strict=True):
            created = s.create_task({"user_id": user, "name": "first", "templates": [TEMPLATE],
                                     "scheduled_at": at(0),
                                     "recipients": [{"email": f"w{i}@{user}.example"}
                                                    for i in range(n)]})
            self.owner_of[created.task_id] = user
        self._sync()

    def _add_contact(self, user: str, email: str, tags: set[str], unsub: bool) -> None:
        self.sched.upsert_contacts(user, [{"email": email, "tags": sorted(tags),
                                           "unsubscribed": unsub}])
        old_tags, old_unsub = self.contacts[user].get(email, (set(), False))
        self.contacts[user][email] = (old_tags | tags, old_unsub or unsub)

    def _quota_used(self, user: str) -> int:
        row = self.conn.execute("SELECT quota_used FROM edm.users WHERE user_id = %s",
                                (user,)).fetchone()
        assert row is not None
        return int(row[0])

    def _task_count(self) -> int:
        row = self.conn.execute("SELECT count(*) FROM edm.tasks").fetchone()
        assert row is not None
        return int(row[0])

    def _db_status(self) -> dict[int, str]:
        return dict(self.conn.execute("SELECT task_id, status FROM edm.tasks").fetchall())

    def _sync(self, allowed: dict[int, set[str]] | None = None) -> None:
        """Adopt the database's task statuses after checking each change was allowed.

        A paused task only leaves paused through resume or cancel; cancelled,
        completed and failed are final. ``allowed`` lists, per task, the
        statuses the current step may move it to from those.
        """
        for task_id, new in self._db_status().items():
            old = self.status.get(task_id)
            if old is not None and old != new and old in ("paused", "cancelled", "completed",
                                                            "failed"):
                assert new in (allowed or {}).get(task_id, set()), (
                    f"task {task_id} went from {old} to {new} outside resume/cancel")
            self.status[task_id] = new

    def _tasks(self, *statuses: str) -> list[int]:
        return sorted(t for t, s in self.status.items() if not statuses or s in statuses)

    def _busy_first(self) -> list[int]:
        """Every task; live ones with subtasks in flight, and expanding ones, more often."""
        busy = sorted({lease.task_id for lease in self.held.values()
                       if self.status[lease.task_id] in ("scheduled", "sending", "paused")})
        live = self._tasks("expanding", "scheduled", "sending", "paused")
        return busy * 3 + self._tasks("expanding") * 2 + live + self._tasks()

    # ---------------------------------------------------------------- create

    @rule(user=st.sampled_from(USERS), data=st.data(), n_templates=st.integers(1, 3),
          priority=st.sampled_from([0, 0, 5]))
    def create_list_task(self, user: str, data: st.DataObject, n_templates: int,
                         priority: int) -> None:
        own = tuple(f"c{i}@{user}.example" for i in range(3))  # may be unsubscribed contacts
        picks = data.draw(st.lists(st.sampled_from(POOL + own), max_size=6), label="addresses")
        given = [data.draw(variants(a), label="as given") for a in picks]
        unsubscribed = {e for e, (_, u) in self.contacts[user].items() if u}
        distinct = {normalize(a) for a in given}
        expected = len(distinct - self.suppressed - unsubscribed)
        used = self._quota_used(user)
        limit = self.quota_limit[user]
        tasks_before = self._task_count()
        spec = {"user_id": user, "name": "list", "templates": [TEMPLATE] * n_templates,
                "priority": priority, "scheduled_at": at(0),
                "recipients": [{"email": a} for a in given]}
        if not given:  # an empty list is refused at the door (issue 16)
            with pytest.raises(errors.NoRecipients):
                self.sched.create_task(spec)
            assert self._task_count() == tasks_before
            return
        if limit is not None and used + expected > limit:
            with pytest.raises(errors.QuotaExceeded):
                self.sched.create_task(spec)
            assert self._task_count() == tasks_before  # nothing written (I8)
            assert self._quota_used(user) == used
            return
        created = self.sched.create_task(spec)
        assert created.recipients == expected
        assert created.duplicates == len(given) - len(distinct)
        assert self._quota_used(user) == used + expected
        self.owner_of[created.task_id] = user
        emails = [r[0] for r in self.conn.execute(
            "SELECT email FROM edm.subtasks WHERE task_id = %s", (created.task_id,))]
        assert len(emails) == len(set(emails)) == expected  # deduplicated
        assert not set(emails) & self.suppressed
        self._sync()
        assert self.status[created.task_id] == ("completed" if expected == 0 else "scheduled")

    @rule(user=st.sampled_from(USERS), rule_=RULES, via_api=st.booleans(),
          n_templates=st.integers(1, 3))
    def create_rule_task(self, user: str, rule_: dict[str, list[str]], via_api: bool,
                         n_templates: int) -> None:
        expected = sum(1 for email, (tags, unsub) in self.contacts[user].items()
                       if not unsub and matches(rule_, tags) and email not in self.suppressed)
        used = self._quota_used(user)
        limit = self.quota_limit[user]
        tasks_before = self._task_count()
        templates = [TEMPLATE] * n_templates
        spec = {"user_id": user, "name": "rule", "templates": templates,
                "scheduled_at": at(0), "rule": rule_}
        if limit is not None and used + expected > limit:
            with pytest.raises(errors.QuotaExceeded):
                if via_api:
                    self.sched.create_task(spec)
                else:
                    self._create_rule_sql(user, rule_, templates)
            assert self._task_count() == tasks_before
            assert self._quota_used(user) == used
            return
        if via_api:
            created = self.sched.create_task(spec)
            task_id, recipients = created.task_id, created.recipients
        else:
            task_id, recipients = self._create_rule_sql(user, rule_, templates)
        assert recipients == expected
        assert self._quota_used(user) == used + expected
        self.owner_of[task_id] = user
        self._sync()
        if via_api:
            assert self.status[task_id] == ("completed" if expected == 0 else "scheduled")
        else:
            assert self.status[task_id] == "expanding"

    def _create_rule_sql(self, user: str, rule_: dict[str, list[str]],
                         templates: list[dict[str, str]]) -> tuple[int, int]:
        """Create a rule task without expanding it (the expansion is a step of its own)."""
        with db.translate():
            row = self.conn.execute(
                "SELECT task_id, recipients FROM edm.create_task_from_rule(%s, 'rule', %s, %s,"
                " 0, %s)", (user, Jsonb(templates), Jsonb(rule_), at(0))).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    @precondition(lambda self: bool(self._tasks("expanding")))
    @rule(data=st.data(), chunk=st.integers(1, 3), finish=st.booleans())
    def expand(self, data: st.DataObject, chunk: int, finish: bool) -> None:
        task_id = data.draw(st.sampled_from(self._tasks("expanding")), label="task")
        user = self.owner_of[task_id]
        if finish:
            self.sched.expand(task_id, chunk=chunk)
            done = True
        else:
            row = self.conn.execute("SELECT added, done FROM edm.expand_task(%s, %s)",
                                    (task_id, chunk)).fetchone()
            assert row is not None
            assert row[0] <= chunk
            done = bool(row[1])
        self._sync()
        if done:
            assert self.status[task_id] in ("scheduled", "completed")
        rows = self.conn.execute(
            "SELECT st.email, c.user_id FROM edm.subtasks st"
            " LEFT JOIN edm.contacts c ON c.contact_id = st.contact_id WHERE st.task_id = %s",
            (task_id,)).fetchall()
        assert all(owner == user for _, owner in rows)  # only the owner's contacts
        assert len({e for e, _ in rows}) == len(rows)

    # ------------------------------------------------------------- dispatch

    @rule(owner=st.sampled_from(OWNERS), batch=st.integers(1, 3))
    def tick_and_claim(self, owner: str, batch: int) -> None:
        """The common case, so that claims are frequent: a second passes, then a claim."""
        self.now += 1.0
        self.claim(owner, batch)

    @rule(owner=st.sampled_from(OWNERS), batch=st.integers(1, 3))
    def claim(self, owner: str, batch: int) -> None:
        before = dict(self.status)
        rows = claim_rows(self.conn, at(self.now), owner=owner, batch=batch, lease=LEASE)
        assert len(rows) <= batch
        assert len({r["service_id"] for r in rows}) == len(rows)  # one per service
        for r in rows:
            sid, tid = r["subtask_id"], r["task_id"]
            assert r["user_id"] == self.owner_of[tid]
            # tenant isolation: the service is granted to the task's user
            assert (r["service_id"], r["user_id"]) in self.grants, r
            # I6: no claim for a paused, cancelled, expanding or finished task
            assert before[tid] in ("scheduled", "sending"), (tid, before[tid])
            # never leased twice: the subtask was not held by anyone
            assert sid not in self.held, (sid, self.held.get(sid))
            assert sid not in self.sent
            self.held[sid] = Lease(sid, tid, owner, self.now + LEASE, r["attempt"], r["email"])
            self.slots.setdefault(r["service_id"], []).append(at(self.now))
        self._sync()

    @rule(owner=st.sampled_from(OWNERS), batch=st.integers(1, 4), per_service=st.integers(1, 3),
          lookahead_ms=st.sampled_from([0, 250, 1500]))
    def claim_slots(self, owner: str, batch: int, per_service: int, lookahead_ms: int) -> None:
        """edm.claim_v2: several slots per service, within a lookahead, held services."""
        before = dict(self.status)
        rows = self.conn.execute(
            "SELECT subtask_id, task_id, user_id, service_id, email, attempt, send_at,"
            " lease_expires_at FROM edm.claim_v2(%s, %s, %s, %s, %s, %s, '{}')",
            (owner, batch, LEASE, at(self.now), per_service, lookahead_ms)).fetchall()
        assert len(rows) <= batch
        for sid, tid, user, service, email, attempt, send_at, expires in rows:
            assert user == self.owner_of[tid] and (service, user) in self.grants
            assert before[tid] in ("scheduled", "sending"), (tid, before[tid])
            assert sid not in self.held and sid not in self.sent
            # the slot lies within the lookahead; the lease starts at the slot
            assert at(self.now) <= send_at <= at(self.now + lookahead_ms / 1000)
            assert expires - send_at == dt.timedelta(seconds=LEASE)
            # the lease runs from the slot (an idle paced service's is after a lead)
            self.held[sid] = Lease(sid, tid, owner, (expires - at(0)).total_seconds(), attempt,
                                   email)
            self.slots.setdefault(service, []).append(send_at)
        self._sync()

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data(), outcome=st.sampled_from(OUTCOMES), wrong_owner=st.booleans())
    def complete(self, data: st.DataObject, outcome: tuple[str, int | None],
                 wrong_owner: bool) -> None:
        lease = data.draw(st.sampled_from(sorted(self.held.values(),
                                                 key=lambda x: x.subtask_id)), label="lease")
        kind, code = outcome
        task_status = self.status[lease.task_id]
        if wrong_owner:
            other = next(o for o in OWNERS if o != lease.owner)
            [(_, accepted, status, reason)] = complete_rows(
                self.conn, at(self.now), [lease.subtask_id], kind, owner=other, code=code)
            assert (accepted, status) == (False, "leased") and reason
            self._sync()
            return
        [(_, accepted, status, reason)] = complete_rows(
            self.conn, at(self.now), [lease.subtask_id], kind, owner=lease.owner, code=code)
        if lease.expires <= self.now:
            # fenced: a completion after the lease expired is rejected and recorded
            assert (accepted, status) == (False, "leased"), reason
            self._sync()
            return
        assert accepted, reason
        if kind == "sent":
            want = "sent"
        elif kind in ("permanent", "render_error") or (
                kind in ("transient", "uncertain") and lease.attempt >= MAX_ATTEMPTS):
            want = "failed"
        else:
            want = "cancelled" if task_status == "cancelled" else "pending"
        assert status == want, (kind, lease, task_status)
        del self.held[lease.subtask_id]
        if want == "sent":
            assert lease.subtask_id not in self.sent  # never sent twice
            self.sent.add(lease.subtask_id)
        if kind == "permanent" and code == 550:
            self.suppressed.add(lease.email)
        suppressed = self.conn.execute(
            "SELECT edm.is_suppressed(%s, %s)", (self.owner_of[lease.task_id], lease.email)
        ).fetchone()
        assert suppressed is not None and suppressed[0] == (lease.email in self.suppressed)
        self._sync()

    @rule(seconds=st.sampled_from([0.5, 1.0, 1.0, 5.0, 61.0, 250.0, 2000.0]))
    def tick(self, seconds: float) -> None:
        self.now += seconds

    @rule(advance=st.booleans())
    def expire_leases(self, advance: bool) -> None:
        if advance:
            self.now += LEASE + 1
        due = {sid: lease for sid, lease in self.held.items() if lease.expires <= self.now}
        statuses = dict(self.status)
        row = self.conn.execute("SELECT edm.expire_leases(%s)", (at(self.now),)).fetchone()
        assert row is not None and row[0] == len(due)
        for sid, lease in due.items():
            got = self.conn.execute("SELECT status FROM edm.subtasks WHERE subtask_id = %s",
                                    (sid,)).fetchone()
            if statuses[lease.task_id] == "cancelled":
                want = "cancelled"
            elif lease.attempt >= MAX_ATTEMPTS:
                want = "failed"
            else:
                want = "pending"
            assert got is not None and got[0] == want, (lease, statuses[lease.task_id])
            del self.held[sid]
        self._sync()

    # ------------------------------------------------------------- lifecycle

    @precondition(lambda self: bool(self.status))
    @rule(data=st.data())
    def pause(self, data: st.DataObject) -> None:
        task_id = data.draw(st.sampled_from(self._busy_first()), label="task")
        before = self.status[task_id]
        if before in ("scheduled", "sending", "paused"):
            assert self.sched.pause_task(task_id) == "paused"
            self._sync()
            assert self.status[task_id] == "paused"
        else:
            with pytest.raises(errors.InvalidTransition):
                self.sched.pause_task(task_id)
            self._sync()

    @precondition(lambda self: bool(self.status))
    @rule(data=st.data())
    def resume(self, data: st.DataObject) -> None:
        task_id = data.draw(st.sampled_from(self._busy_first()), label="task")
        before = self.status[task_id]
        snapshot = self._subtasks(task_id)
        if before not in ("scheduled", "sending", "paused"):
            with pytest.raises(errors.InvalidTransition):
                self._resume(task_id)
            self._sync()
            return
        new = self._resume(task_id)
        counts = self.conn.execute(
            "SELECT pending_count + leased_count FROM edm.tasks WHERE task_id = %s",
            (task_id,)).fetchone()
        assert counts is not None
        if before == "paused":
            assert new == ("sending" if counts[0] else "completed")
        else:
            assert new == before
        self._sync({task_id: {new}})
        assert self.status[task_id] == new
        # resume continues where it stopped: the same subtasks, in the same states,
        # retries keeping their back-off, leases untouched
        assert self._subtasks(task_id) == snapshot

    def _resume(self, task_id: int) -> str:
        """edm.resume_task on the controlled clock (Scheduler.resume uses the real one)."""
        with db.translate():
            row = self.conn.execute("SELECT edm.resume_task(%s, NULL, %s)",
                                    (task_id, at(self.now))).fetchone()
        assert row is not None
        return str(row[0])

    def _subtasks(self, task_id: int) -> list[tuple[Any, ...]]:
        return self.conn.execute(
            "SELECT subtask_id, status, attempts, not_before::text, lease_owner FROM edm.subtasks"
            " WHERE task_id = %s ORDER BY subtask_id", (task_id,)).fetchall()

    @precondition(lambda self: bool(self.status))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        task_id = data.draw(st.sampled_from(self._busy_first()), label="task")
        before = self.status[task_id]
        user = self.owner_of[task_id]
        used = self._quota_used(user)
        row = self.conn.execute(
            "SELECT pending_count, quota_reserved - total_count FROM edm.tasks"
            " WHERE task_id = %s", (task_id,)).fetchone()
        assert row is not None
        pending, unexpanded = row
        if before in ("completed", "failed"):
            with pytest.raises(errors.InvalidTransition):
                self.sched.cancel_task(task_id)
            self._sync()
            return
        n = self.sched.cancel_task(task_id)
        self._sync({task_id: {"cancelled"}})
        assert self.status[task_id] == "cancelled"
        if before == "cancelled":
            assert n == 0 and self._quota_used(user) == used
            return
        assert n == pending
        # cancel refunds exactly the unsent, unleased part of the reservation
        refund = pending + (unexpanded if before == "expanding" else 0)
        assert self._quota_used(user) == used - refund
        left = self.conn.execute(
            "SELECT count(*) FROM edm.subtasks WHERE task_id = %s AND status = 'pending'",
            (task_id,)).fetchone()
        assert left is not None and left[0] == 0

    # ------------------------------------------------------ outside changes

    @rule(user=st.sampled_from(USERS), n=st.integers(0, 7),
          tags=st.sets(st.sampled_from(TAGS), max_size=2), unsub=st.booleans())
    def add_contact(self, user: str, n: int, tags: set[str], unsub: bool) -> None:
        self._add_contact(user, f"c{n}@{user}.example", tags, unsub)

    @rule(address=st.sampled_from(POOL + tuple(f"c{i}@u1.example" for i in range(3))))
    def suppress(self, address: str) -> None:
        self.sched.suppress(address)
        self.suppressed.add(address)

    # ------------------------------------------------------------ invariants

    @invariant()
    def counters_add_up(self) -> None:
        assert counters_match(self.conn) == []
        assert self.conn.execute(
            "SELECT t.task_id FROM edm.tasks t WHERE t.total_count <>"
            " (SELECT count(*) FROM edm.subtasks st WHERE st.task_id = t.task_id)"
            " OR t.claimable <> (t.status = 'sending' AND t.pending_count > 0)").fetchall() == []

    @invariant()
    def quota_exact(self) -> None:
        assert quota_problems(self.conn) == []
        for user, limit in self.quota_limit.items():
            assert limit is None or self._quota_used(user) <= limit

    @invariant()
    def slots_keep_every_limit(self) -> None:
        """I2: per service, the slots handed out keep its interval and its rate limit."""
        for sid, slots in self.slots.items():
            ordered = sorted(slots)
            gap = dt.timedelta(seconds=self.interval[sid])
            assert all(b - a >= gap for a, b in itertools.pairwise(ordered)), (
                sid, ordered)
            if sid in self.rate_limited:  # GCRA: T = 1.5 s, tolerance (2 - 1) T
                period = dt.timedelta(seconds=1.5)
                tat: dt.datetime | None = None
                for slot in ordered:
                    assert tat is None or slot >= tat - period, (sid, ordered)
                    tat = max(tat or slot, slot) + period

    @invariant()
    def leases_are_the_models(self) -> None:
        rows = self.conn.execute(
            "SELECT subtask_id, lease_owner FROM edm.subtasks WHERE status = 'leased'").fetchall()
        assert dict(rows) == {sid: lease.owner for sid, lease in self.held.items()}

    @invariant()
    def sent_once(self) -> None:
        sent = {r[0] for r in self.conn.execute(
            "SELECT subtask_id FROM edm.subtasks WHERE status = 'sent'")}
        assert sent == self.sent
        assert self.conn.execute(
            "SELECT subtask_id FROM edm.send_events WHERE kind = 'sent'"
            " GROUP BY subtask_id HAVING count(*) > 1").fetchall() == []


def test_lifecycle_state_machine(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn, Scheduler(dsn) as sched:
        machine = type("Lifecycle", (LifecycleMachine,), {"conn": conn, "sched": sched})
        run_state_machine_as_test(machine, settings=settings(
            max_examples=60, stateful_step_count=30, deadline=None,
            suppress_health_check=[HealthCheck.too_slow]))


@pytest.mark.parametrize("ending", ["released", "transient", "service", "expired"])
def test_cancel_refunds_subtasks_that_end_unsent_after_a_lease(
        dsn: str, ending: str) -> None:
    """The case the state machine found: a subtask leased when its task is cancelled.

    It ends cancelled (released, retried, service failure, or lease expiry) and
    was never sent, so its quota goes back to the user like the pending ones'.
    Before the fix the user kept it reserved forever (quota_used 1, task
    quota_reserved 1 on a cancelled task with nothing left).
    """
    with psycopg.connect(dsn, autocommit=True) as conn, Scheduler(dsn) as s:
        s.upsert_user("u", quota_limit=3)
        sid = s.create_service({"name": "svc", "from_addresses": ["svc@sender.example"],
                                "interval_seconds": 0, "daily_quota": 100,
                                "transport": "null"})
        s.grant(sid, "u")
        task = s.create_task({"user_id": "u", "name": "t", "templates": [TEMPLATE],
                              "scheduled_at": at(0),
                              "recipients": [{"email": f"r{i}@x.example"} for i in range(3)]})
        [row] = claim_rows(conn, at(0), batch=1, lease=LEASE)
        assert s.cancel_task(task.task_id) == 2
        assert s.get_user("u").quota_used == 1  # the leased one is still in flight
        if ending == "expired":
            assert conn.execute("SELECT edm.expire_leases(%s)",
                                (at(LEASE + 1),)).fetchone() == (1,)
        else:
            [(_, ok, status, _)] = complete_rows(conn, at(1), [row["subtask_id"]], ending,
                                                 code=421)
            assert (ok, status) == (True, "cancelled")
        assert s.get_user("u").quota_used == 0
        assert s.get_task(task.task_id).cancelled_count == 3
        assert quota_problems(conn) == [] and counters_match(conn) == []
