"""Set-based builders of benchmark worlds (INSERT ... SELECT generate_series).

Every row respects the schema's CHECK constraints: users; services on the
``null`` transport; grants in one of three shapes; tasks inserted as
``scheduled`` (scheduled_at in the past) with ``total_count = pending_count``
and one ``edm.templates`` row each; ``pending`` subtasks. ``build_world``
then starts the due tasks (what ``edm.claim`` would do on its first calls),
and VACUUM ANALYZEs, so the first measured claim sees a steady state.

Grant shapes (the scenarios of docs/performance.md):

* ``shared`` (S1): every service granted to every user;
* ``dedicated`` (S2): each user has 1–3 services of its own;
* ``mixed`` (S3): users in groups, each group sharing a pool of services,
  plus a dedicated service (granted at a higher priority, so the pool is the
  overflow) for every ``dedicated_every``-th user.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import psycopg
from psycopg import sql


def say(message: str) -> None:
    """Progress line (stderr, so that stdout holds a benchmark's tables and JSON)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# Large enough never to bind in a benchmark. Kept below 2^31 / 100 (21.4M): the
# first benchmark runs used 2e9 and found edm.sweep_alerts computing
# sent_today * 100 and quota_alert_percent * daily_quota in int4 ("integer out of
# range"), which stopped every dispatcher; 0004 now computes in bigint.
BIG_QUOTA = 20_000_000


@dataclass
class WorldSpec:
    users: int
    services: int  # shared / mixed: pool services; dedicated: ignored (derived)
    tasks: int
    subtasks: int  # total, spread evenly over the tasks
    grants: str = "shared"  # shared | dedicated | mixed
    interval_ms: int = 0
    daily_quota: int = BIG_QUOTA
    group_size: int = 100  # mixed: users per group
    pool_per_group: int = 10  # mixed: services per group pool
    dedicated_every: int = 10  # mixed: every n-th user also has a dedicated service
    dedicated_priority: int = 10

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def design_spec(shape: str, scale: float = 1.0, *, services: int | None = None) -> WorldSpec:
    """The benchmark worlds (S1 shared, S2 dedicated, S3 mixed), ``scale`` times as big."""
    users = max(1, round(10_000 * scale))
    tasks = max(1, round(20_000 * scale))
    subtasks = max(1, round(1_000_000 * scale))
    if shape == "s1":
        return WorldSpec(users=users, services=services or 1000, tasks=tasks,
                         subtasks=subtasks, grants="shared")
    if shape == "s2":
        return WorldSpec(users=users, services=0, tasks=tasks, subtasks=subtasks,
                         grants="dedicated")
    if shape == "s3":
        return WorldSpec(users=users, services=0, tasks=tasks, subtasks=subtasks,
                         grants="mixed", group_size=100, pool_per_group=10,
                         dedicated_every=10, dedicated_priority=10)
    raise ValueError(f"unknown shape {shape!r}: s1, s2 or s3")


@dataclass
class BuildReport:
    seconds: float
    users: int
    services: int
    grants: int
    tasks: int
    subtasks: int
    steps: dict[str, float]


def _exec(conn: psycopg.Connection[Any], steps: dict[str, float], name: str,
          statement: Any, params: Any = None) -> int:
    t0 = time.perf_counter()
    cur = conn.execute(statement, params)
    steps[name] = steps.get(name, 0.0) + time.perf_counter() - t0
    return cur.rowcount


def build_world(dsn: str, spec: WorldSpec, *, chunk: int = 500_000) -> BuildReport:
    """Fill a freshly migrated database with ``spec``'s world; returns what it built."""
    if spec.grants not in {"shared", "dedicated", "mixed"}:
        raise ValueError(f"unknown grant shape {spec.grants!r}")
    steps: dict[str, float] = {}
    t_start = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '512MB'")
        conn.execute("SET synchronous_commit = off")  # bulk load only; runs use the default
        _exec(conn, steps, "users", """
            INSERT INTO edm.users (user_id, display_name)
            SELECT 'u' || g, 'bench user ' || g FROM generate_series(1, %s) g
            """, (spec.users,))
        say(f"  users: {spec.users:,}")
        _build_services_and_grants(conn, spec, steps)
        n_services = conn.execute("SELECT count(*) FROM edm.services").fetchone()[0]  # type: ignore[index]
        n_grants = conn.execute("SELECT count(*) FROM edm.grants").fetchone()[0]  # type: ignore[index]
        say(f"  services: {n_services:,}, grants: {n_grants:,}")
        _build_tasks(conn, spec, steps)
        say(f"  tasks: {spec.tasks:,}")
        with without_secondary_indexes(conn, "subtasks", steps):
            add_subtasks(conn, spec.tasks, spec.subtasks, steps=steps, chunk=chunk)
        say(f"  subtasks: {spec.subtasks:,}")
        start_all_tasks(conn, steps)
        t0 = time.perf_counter()
        vacuum_analyze(conn)
        steps["vacuum analyze"] = time.perf_counter() - t0
    return BuildReport(seconds=time.perf_counter() - t_start, users=spec.users,
                       services=int(n_services), grants=int(n_grants), tasks=spec.tasks,
                       subtasks=spec.subtasks, steps=steps)


def _build_services_and_grants(conn: psycopg.Connection[Any], spec: WorldSpec,
                               steps: dict[str, float]) -> None:
    insert_services = """
        INSERT INTO edm.services (name, transport, from_addresses, interval_ms, daily_quota,
                                  settings)
        SELECT x.name, 'null', ARRAY[x.name || '@sender.example'], %(interval)s, %(quota)s,
               jsonb_build_object('owner', x.owner)
        FROM ({source}) x
        ORDER BY x.ord
    """
    params = {"interval": spec.interval_ms, "quota": spec.daily_quota}
    if spec.grants == "shared":
        _exec(conn, steps, "services", insert_services.format(source="""
            SELECT 'svc-' || g AS name, 'pool' AS owner, g AS ord
            FROM generate_series(1, %(n)s) g"""), {**params, "n": spec.services})
        # Sorted by the primary key so that its btree grows by appending; the
        # secondary index is rebuilt afterwards (a sort beats 10M random inserts).
        with without_secondary_indexes(conn, "grants", steps), trusted_bulk_load(conn):
            _exec(conn, steps, "grants", """
                INSERT INTO edm.grants (service_id, user_id)
                SELECT s.service_id, u.user_id FROM edm.services s CROSS JOIN edm.users u
                ORDER BY s.service_id, u.user_id
                """)
    elif spec.grants == "dedicated":
        # user g owns 1 + (g * 7919) % 3 services: 1, 2 or 3, about 2 on average
        _exec(conn, steps, "services", insert_services.format(source="""
            SELECT 'svc-u' || g || '-' || j AS name, 'u' || g AS owner, g * 4 + j AS ord
            FROM generate_series(1, %(users)s) g, generate_series(1, 3) j
            WHERE j <= 1 + (g * 7919) %% 3"""), {**params, "users": spec.users})
        _exec(conn, steps, "grants", """
            INSERT INTO edm.grants (service_id, user_id)
            SELECT s.service_id, s.settings->>'owner' FROM edm.services s
            ORDER BY s.service_id
            """)
    else:  # mixed
        groups = max(1, -(-spec.users // spec.group_size))
        _exec(conn, steps, "services", insert_services.format(source="""
            SELECT 'svc-pool' || grp || '-' || j AS name, 'pool' || grp AS owner,
                   grp * 1000 + j AS ord
            FROM generate_series(1, %(groups)s::int) grp, generate_series(1, %(per)s::int) j"""),
              {**params, "groups": groups, "per": spec.pool_per_group})
        _exec(conn, steps, "services", insert_services.format(source="""
            SELECT 'svc-u' || g AS name, 'u' || g AS owner, g AS ord
            FROM generate_series(%(every)s::int, %(users)s::int, %(every)s::int) g"""),
              {**params, "every": spec.dedicated_every, "users": spec.users})
        _exec(conn, steps, "grants", """
            INSERT INTO edm.grants (service_id, user_id)
            SELECT s.service_id, 'u' || g
            FROM generate_series(1, %(users)s) g
            JOIN edm.services s ON s.settings->>'owner' = 'pool' || ((g - 1) / %(size)s + 1)
            ORDER BY 1, 2
            """, {"users": spec.users, "size": spec.group_size})
        _exec(conn, steps, "grants", """
            INSERT INTO edm.grants (service_id, user_id, priority)
            SELECT s.service_id, s.settings->>'owner', %(prio)s FROM edm.services s
            WHERE s.settings->>'owner' LIKE 'u%%'
            ORDER BY 1
            """, {"prio": spec.dedicated_priority})


@contextlib.contextmanager
def trusted_bulk_load(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """Skip foreign-key checks of rows that are consistent by construction (superuser only).

    ``session_replication_role = replica`` turns off the RI triggers: 10M grants
    otherwise cost 20M index probes through SPI. Without the privilege (a
    --dsn server with an ordinary role) the checks simply run.
    """
    try:
        conn.execute("SET session_replication_role = replica")
    except psycopg.errors.InsufficientPrivilege:
        yield
        return
    try:
        yield
    finally:
        conn.execute("SET session_replication_role = DEFAULT")


@contextlib.contextmanager
def without_secondary_indexes(conn: psycopg.Connection[Any], table: str,
                              steps: dict[str, float]) -> Iterator[None]:
    """Drop ``edm.<table>``'s indexes that back no constraint, then recreate them as they were.

    The classic bulk-load move: the definitions and comments are read from the
    catalog (pg_get_indexdef, obj_description), so the schema ends up identical.
    """
    rows = conn.execute("""
        SELECT c.relname, pg_get_indexdef(i.indexrelid), obj_description(i.indexrelid, 'pg_class')
        FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
        WHERE i.indrelid = %s::regclass
          AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)
        """, (f"edm.{table}",)).fetchall()
    for name, _, _ in rows:
        conn.execute(sql.SQL("DROP INDEX edm.{}").format(sql.Identifier(name)))
    try:
        yield
    finally:
        t0 = time.perf_counter()
        for name, definition, comment in rows:
            conn.execute(definition)
            if comment is not None:
                conn.execute(sql.SQL("COMMENT ON INDEX edm.{} IS {}").format(
                    sql.Identifier(name), sql.Literal(comment)))
        steps[f"{table} indexes"] = steps.get(f"{table} indexes", 0.0) + time.perf_counter() - t0


def _build_tasks(conn: psycopg.Connection[Any], spec: WorldSpec,
                 steps: dict[str, float]) -> None:
    # Task i belongs to user ((i - 1) % users) + 1: tasks spread evenly over users.
    _exec(conn, steps, "tasks", """
        INSERT INTO edm.tasks (user_id, name, status, scheduled_at, recipient_rule, template_count)
        SELECT 'u' || ((i - 1) %% %(users)s + 1), 'bench task ' || i, 'scheduled',
               now() - interval '1 minute', '{"list": 0}'::jsonb, 1
        FROM generate_series(1, %(tasks)s) i
        ORDER BY i
        """, {"users": spec.users, "tasks": spec.tasks})
    _exec(conn, steps, "templates", """
        INSERT INTO edm.templates (task_id, template_idx, subject, body_text)
        SELECT t.task_id, 0, 'Hello {{ email }}', 'Benchmark message for {{ email }}.'
        FROM edm.tasks t
        """)


def add_subtasks(conn: psycopg.Connection[Any], tasks: int, total: int, *,
                 steps: dict[str, float] | None = None, chunk: int = 500_000) -> None:
    """Add ``total`` pending subtasks spread evenly over the first ``tasks`` tasks.

    Appends after a task's existing recipients (their numbers continue), and
    keeps the task counters equal to the counts of their subtasks (I4).
    Inserted in task order, ``chunk`` rows per statement, so that the
    (task_id, ...) indexes grow mostly by appending.
    """
    steps = steps if steps is not None else {}
    ids = [r[0] for r in conn.execute(
        "SELECT task_id FROM edm.tasks ORDER BY task_id LIMIT %s", (tasks,)).fetchall()]
    if not ids or total <= 0:
        return
    per, extra = divmod(total, len(ids))
    tasks_per_chunk = max(1, chunk // max(1, per + 1))
    for i in range(0, len(ids), tasks_per_chunk):
        lo, hi = ids[i], ids[min(i + tasks_per_chunk, len(ids)) - 1]
        _exec(conn, steps, "subtasks", """
            WITH t AS (
              SELECT t.task_id, t.total_count AS base,
                     %(per)s + CASE WHEN row_number() OVER (ORDER BY t.task_id) + %(offset)s
                                         <= %(extra)s THEN 1 ELSE 0 END AS n
              FROM edm.tasks t WHERE t.task_id BETWEEN %(lo)s AND %(hi)s
            ),
            ins AS (
              INSERT INTO edm.subtasks (task_id, email, template_idx, status)
              SELECT t.task_id,
                     't' || t.task_id || '.' || lpad((t.base + k)::text, 8, '0')
                       || '@rcpt.example',
                     0, 'pending'
              FROM t, generate_series(1, t.n) k
              ORDER BY t.task_id, k
              RETURNING task_id
            )
            UPDATE edm.tasks t
            SET total_count = t.total_count + c.n, pending_count = t.pending_count + c.n,
                recipient_rule = jsonb_build_object('list', t.total_count + c.n)
            FROM (SELECT ins.task_id, count(*) AS n FROM ins GROUP BY ins.task_id) c
            WHERE t.task_id = c.task_id
            """, {"per": per, "extra": extra, "offset": i, "lo": lo, "hi": hi})


def start_all_tasks(conn: psycopg.Connection[Any], steps: dict[str, float] | None = None) -> int:
    """Promote every due scheduled task to sending (edm.start_due_tasks, 1,000 per call)."""
    steps = steps if steps is not None else {}
    t0 = time.perf_counter()
    started = 0
    while True:
        row = conn.execute("SELECT edm.start_due_tasks()").fetchone()
        n = int(row[0]) if row else 0
        started += n
        if n == 0:
            break
    steps["start tasks"] = steps.get("start tasks", 0.0) + time.perf_counter() - t0
    return started


def vacuum_analyze(conn: psycopg.Connection[Any]) -> None:
    for table in ("users", "services", "grants", "tasks", "templates", "subtasks"):
        conn.execute(f"VACUUM (ANALYZE) edm.{table}")


def counts(dsn: str) -> dict[str, int]:
    """Subtasks by status (exact, a full count: call outside timed sections)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT status, count(*) FROM edm.subtasks GROUP BY status").fetchall()
    return {str(s): int(n) for s, n in rows}
