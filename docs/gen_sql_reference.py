"""Generate docs/reference/sql.md from the database catalog.

    python docs/gen_sql_reference.py --dsn DSN > docs/reference/sql.md

DSN names a database migrated to the current version (``edm-sched migrate``),
best a scratch one; the role must be able to run ``edm.install_roles()``
(superuser, or the schema owner with CREATEROLE): the privileges shown for
each object are those ``edm.install_roles()`` grants, computed inside a
transaction that is rolled back, so nothing is left behind.

What comes from the catalog: every function of schema ``edm`` (signature from
``pg_get_function_arguments`` / ``pg_get_function_result``, parameters and
defaults, language, volatility, SECURITY DEFINER and search_path, the
``COMMENT ON FUNCTION`` text, the triggers that use trigger functions), every
view (``COMMENT ON VIEW`` and each column's ``col_description``), the tables,
sequences, indexes and triggers with their comments, and the migrations
applied. What comes from this script: the grouping into sections and one psql
example per function or view (``EXAMPLES``; a generic one where none is
written). The examples build on each other from top to bottom on a freshly
migrated database; ``tests/project/test_docs.py`` runs them in that order, and
``tests/project/test_docs.py::test_sql_reference_is_current`` regenerates this file on
the test database and compares it with the committed one.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

import psycopg

OUTPUT = "docs/reference/sql.md"

# ---------------------------------------------------------------------------
# Sections: (title, introduction, functions and views in reading order)
# ---------------------------------------------------------------------------

SECTIONS: list[tuple[str, str, list[str]]] = [
    ("Host API: users, services and grants",
     "What the host backend calls to describe its tenants and sending accounts "
     "(`edm_sched.Scheduler` wraps these). Every writing function records an "
     "`edm.audit_log` row; set `edm.actor` in the transaction to name the person.",
     ["upsert_user", "set_user_quota", "create_service", "update_service", "grant_service",
      "revoke_service"]),
    ("Host API: contacts, tags and suppressions",
     "Contacts arrive by COPY into a session temporary table, then one function "
     "merges them. From psql, `INSERT` into the staging table works the same way.",
     ["merge_staged_contacts", "set_contact_tags", "delete_tag", "add_suppression",
      "remove_suppression", "is_suppressed"]),
    ("Host API: tasks",
     "Creating a campaign (from an explicit list or a tag rule) and its lifecycle. "
     "Task ids in the examples are looked up by name.",
     ["create_task_from_staged", "create_task_from_rule", "expand_task", "pause_task",
      "resume_task", "cancel_task", "new_task", "reserve_quota", "require_user",
      "lock_task"]),
    ("Dispatch: claim, complete, leases",
     "What every dispatcher calls. The claim never waits on a lock (SKIP LOCKED); "
     "completion is fenced by the lease. See [fairness](../explanation/fairness.md) and "
     "[delivery guarantees](../explanation/delivery-guarantees.md).",
     ["claim", "complete", "expire_leases", "next_wakeup", "start_due_tasks"]),
    ("Readiness and quotas",
     "The predicates the claim uses, callable on their own. See "
     "[rate limits and quota days](../explanation/rate-limits.md).",
     ["service_is_ready", "service_sent_today", "service_next_quota_day", "ts_add_ms",
      "smtp_code_suppresses"]),
    ("Sweeps and maintenance",
     "Run every `sweep.interval` seconds by the elected dispatcher (or by "
     "`edm-sched sweep`); each is also safe to call by hand.",
     ["run_sweeps", "roll_quota_days", "finish_tasks", "sweep_alerts", "raise_alert",
      "take_alerts", "roll_up_metrics", "ensure_partitions", "apply_retention"]),
    ("Monitoring views",
     "The views a DBA reads when something looks wrong; the "
     "[operations guide](../operations.md#when-something-is-stuck) says which one answers "
     "which question.",
     ["task_progress", "service_status", "system_health", "task_wait_reasons",
      "task_wait_reason"]),
    ("Configuration",
     "Typed settings in `edm.config`; a refused value raises ED006 with the allowed range.",
     ["config_set", "config_int", "config_value_ok"]),
    ("Security and audit",
     "Least privilege ([roles and grants](../operations.md#roles-and-grants)) and the "
     "audit trail.",
     ["install_roles", "harden_functions", "share_staged", "audit_fields"]),
    ("Validation helpers",
     "Pure functions used by CHECK constraints and by the functions above.",
     ["email_problem", "is_valid_email", "normalize_email", "is_valid_timezone",
      "rule_matches", "task_transition_ok"]),
    ("Recurring jobs",
     "The SQL side of recurring jobs; the concepts, the Python API and the CLI are "
     "in [jobs.md](../jobs.md).",
     ["job_next_wakeup", "job_claim", "job_expire_runs", "job_purge_executions",
      "job_retry_delay", "job_tags_ok", "job_retry_on_ok", "jobs_overview"]),
    ("Trigger functions",
     "Functions run by triggers, never called directly; each entry lists its triggers.",
     []),
    ("Other functions", "", []),
]
JOBS_SECTION = "Recurring jobs"
TRIGGER_SECTION = "Trigger functions"
OTHER_SECTION = "Other functions"

SETUP = """\
-- Run on a freshly migrated scratch database: the examples below build on
-- each other from top to bottom. Nothing here needs a running dispatcher.
SET TIME ZONE 'UTC';"""

# ---------------------------------------------------------------------------
# One psql example per function or view (executed by tests/project/test_docs.py)
# ---------------------------------------------------------------------------

_TEMPLATES = ("""'[{"subject": "Hello {{ first_name | default(''there'') }}", """
              """"body_text": "Spring is here."}]'""")

EXAMPLES: dict[str, str] = {
    # -- users, services, grants
    "upsert_user": """\
SELECT edm.upsert_user('acme', 'Acme Corp', 100000);
SELECT edm.upsert_user('globex', 'Globex');  -- no quota: unlimited""",
    "set_user_quota": """\
SELECT edm.set_user_quota('acme', 250000);
SELECT user_id, quota_limit, quota_used FROM edm.users ORDER BY user_id;""",
    "create_service": """\
-- 'pool-1': one send every 0 ms, 10000 a day; transport 'null' sends nothing.
SELECT edm.create_service('pool-1', ARRAY['news@pool.example'], 0, 10000, 'null');
-- An SMTP account: settings hold no secret, credential_ref names it for the resolver.
SELECT edm.create_service('acme-smtp', ARRAY['news@acme.example'], 2000, 5000, 'smtp',
                          '{"host": "smtp.acme.example", "port": 587, "security": "starttls",
                            "username": "news"}', 'ACME_SMTP_PASSWORD', 'Europe/Paris', false);""",
    "update_service": """\
SELECT edm.update_service(service_id, p_daily_quota => 20000)
FROM edm.services WHERE name = 'pool-1';""",
    "grant_service": """\
SELECT edm.grant_service(s.service_id, u.user_id)
FROM edm.services s CROSS JOIN edm.users u WHERE s.name = 'pool-1';
SELECT service_id, user_id, priority FROM edm.grants ORDER BY service_id, user_id;""",
    "revoke_service": """\
SELECT edm.grant_service(service_id, 'globex', -1) FROM edm.services WHERE name = 'acme-smtp';
SELECT edm.revoke_service(service_id, 'globex') FROM edm.services WHERE name = 'acme-smtp';""",
    # -- contacts
    "merge_staged_contacts": """\
BEGIN;
CREATE TEMP TABLE edm_stage_contacts
  (ord bigint, email text, attributes jsonb, tags text[], unsubscribed boolean) ON COMMIT DROP;
SELECT edm.share_staged('edm_stage_contacts');
INSERT INTO edm_stage_contacts VALUES
  (1, 'Ann@Example.com', '{"first_name": "Ann"}', ARRAY['vip', 'fr'], false),
  (2, 'bob@example.com', '{"first_name": "Bob"}', ARRAY['vip'], false),
  (3, 'cy@example.com', '{}', ARRAY['fr'], true);
SELECT inserted, updated FROM edm.merge_staged_contacts('acme');
COMMIT;""",
    "set_contact_tags": """\
SELECT edm.set_contact_tags('acme', ARRAY['cy@example.com'], ARRAY['vip', 'old'], ARRAY['fr']);""",
    "delete_tag": "SELECT edm.delete_tag('acme', 'old');",
    "add_suppression": """\
SELECT edm.add_suppression('complainer@example.com', 'complaint', 'acme');
SELECT edm.add_suppression('bounced@example.com', 'hard_bounce');  -- everyone""",
    "remove_suppression": "SELECT edm.remove_suppression('bounced@example.com');",
    "is_suppressed": "SELECT edm.is_suppressed('acme', 'complainer@example.com');",
    # -- tasks
    "create_task_from_staged": """\
BEGIN;
CREATE TEMP TABLE edm_stage_recipients (ord bigint, email text, vars jsonb) ON COMMIT DROP;
SELECT edm.share_staged('edm_stage_recipients');
INSERT INTO edm_stage_recipients VALUES
  (1, 'ann@example.com', '{"first_name": "Ann"}'),
  (2, 'ANN@example.com', NULL),                 -- duplicate: merged
  (3, 'complainer@example.com', NULL),          -- suppressed for acme: dropped
  (4, 'dan@example.com', '{"first_name": "Dan"}');
SELECT task_id, recipients, invalid, duplicates, suppressed
FROM edm.create_task_from_staged('acme', 'spring-sale', """ + _TEMPLATES + """);
COMMIT;""",
    "create_task_from_rule": """\
SELECT task_id, recipients
FROM edm.create_task_from_rule('acme', 'vip-offer', """ + _TEMPLATES + """,
                               '{"include_any": ["vip"], "exclude": ["fr"]}');""",
    "expand_task": """\
SELECT e.added, e.done
FROM edm.tasks t, edm.expand_task(t.task_id, 1000) e WHERE t.name = 'vip-offer';""",
    "pause_task": """\
SELECT edm.pause_task(task_id, 'acme') FROM edm.tasks WHERE name = 'spring-sale';""",
    "resume_task": """\
SELECT edm.resume_task(task_id, 'acme') FROM edm.tasks WHERE name = 'spring-sale';""",
    "cancel_task": """\
SELECT edm.cancel_task(task_id, 'acme') FROM edm.tasks WHERE name = 'vip-offer';
SELECT name, status, total_count, cancelled_count FROM edm.tasks ORDER BY task_id;""",
    "new_task": """\
-- Internal to the create_task_* functions; shown in a transaction that is rolled back.
BEGIN;
SELECT edm.new_task('acme', 'draft', """ + _TEMPLATES + """, 'draft', 0, now(), NULL);
ROLLBACK;""",
    "reserve_quota": """\
-- Internal: reserves or raises ED002 (quota exceeded) without writing anything.
BEGIN;
SELECT edm.reserve_quota('acme', 10);
ROLLBACK;""",
    "require_user": "SELECT edm.require_user('acme');",
    "lock_task": """\
BEGIN;
SELECT task_id, status, pending_count FROM edm.lock_task(
  (SELECT task_id FROM edm.tasks WHERE name = 'spring-sale'), 'acme');
ROLLBACK;""",
    # -- dispatch
    "claim": """\
-- At most one subtask per ready service; 'psql-example' is the lease owner.
SELECT subtask_id, task_id, user_id, service_id, email, attempt, lease_expires_at
FROM edm.claim('psql-example', 10);""",
    "complete": """\
-- Report every subtask 'psql-example' holds as sent.
SELECT c.subtask_id, c.accepted, c.status, c.reason
FROM (SELECT coalesce(array_agg(subtask_id ORDER BY subtask_id), '{}') AS ids
      FROM edm.subtasks WHERE status = 'leased' AND lease_owner = 'psql-example') held,
     edm.complete('psql-example', held.ids,
                  array_fill('sent'::text, ARRAY[cardinality(held.ids)])) c;""",
    "expire_leases": """\
-- A dispatcher claims with a 1-second lease and crashes; a sweep 2 s later recovers it.
SELECT subtask_id FROM edm.claim('crashed-dispatcher', 1, 1);
SELECT edm.expire_leases(now() + interval '2 seconds');
SELECT kind, subtask_id, dispatcher, detail FROM edm.send_events WHERE kind = 'lease_expired';""",
    "next_wakeup": "SELECT edm.next_wakeup();",
    "start_due_tasks": "SELECT edm.start_due_tasks();",
    # -- readiness
    "service_is_ready": "SELECT name, edm.service_is_ready(s) FROM edm.services s ORDER BY name;",
    "service_sent_today": """\
SELECT name, edm.service_sent_today(s) AS sent_today, daily_quota
FROM edm.services s ORDER BY name;""",
    "service_next_quota_day": """\
-- New York's clocks go forward on 2026-03-08: the next midnight is still exact.
SELECT edm.service_next_quota_day('America/New_York', '2026-03-08 12:00+00');""",
    "ts_add_ms": "SELECT edm.ts_add_ms('2026-01-01 00:00:00+00', 1500);",
    "smtp_code_suppresses": """\
SELECT code, edm.smtp_code_suppresses(code) FROM unnest(ARRAY[450, 550, 552, 553]) AS code;""",
    # -- sweeps
    "run_sweeps": "SELECT jsonb_pretty(edm.run_sweeps());",
    "roll_quota_days": "SELECT edm.roll_quota_days();",
    "finish_tasks": "SELECT edm.finish_tasks();",
    "sweep_alerts": """\
-- As if an hour had passed: tasks still waiting for a first send raise wait alerts.
SELECT edm.sweep_alerts(now() + interval '1 hour');""",
    "raise_alert": """\
SELECT edm.raise_alert('service', 'warning', 'pool-1: provider maintenance tonight',
                       p_service_id => service_id)
FROM edm.services WHERE name = 'pool-1';""",
    "take_alerts": "SELECT alert_id, kind, severity, message FROM edm.take_alerts(10);",
    "roll_up_metrics": """\
SELECT edm.roll_up_metrics(now() + interval '1 minute');
SELECT hour, service_id, user_id, sent, lease_expired FROM edm.metrics_hourly;""",
    "ensure_partitions": """\
SELECT edm.ensure_partitions(p_days_ahead => 7);
SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'edm.send_events'::regclass ORDER BY 1;""",
    "apply_retention": "SELECT edm.apply_retention();",
    # -- monitoring
    "task_progress": """\
SELECT task_id, name, status, total, sent, pending, failed, progress_pct, first_send_wait_s
FROM edm.task_progress ORDER BY task_id;""",
    "service_status": """\
SELECT name, state, next_available_at, sent_today, daily_quota, success_rate, last_error
FROM edm.service_status ORDER BY name;""",
    "system_health": """\
SELECT services_available, pending_subtasks, leased_subtasks, sent_last_minute,
       error_rate_last_hour, open_alerts, dispatchers_alive
FROM edm.system_health;""",
    "task_wait_reasons": "SELECT task_id, name, status, reason, until FROM edm.task_wait_reasons;",
    "task_wait_reason": """\
SELECT reason, until FROM edm.task_wait_reason(
  (SELECT task_id FROM edm.tasks WHERE name = 'spring-sale'));""",
    # -- config
    "config_set": """\
SELECT edm.config_set('queue.central_batch_size', '100', 'dba@example.com');
SELECT key, value, min_value, max_value, updated_by FROM edm.config
WHERE key = 'queue.central_batch_size';""",
    "config_int": "SELECT edm.config_int('queue.service_reservation_timeout');",
    "config_value_ok": """\
SELECT edm.config_value_ok('integer', '500', 10, 200, NULL) AS in_range;""",
    # -- security
    "install_roles": """\
SELECT edm.install_roles();  -- edm_dispatcher, edm_app, edm_monitor (NOLOGIN groups)
SELECT r.rolname, has_function_privilege(r.rolname, 'edm.claim(text,integer,integer,timestamptz)',
                                         'EXECUTE') AS may_claim
FROM pg_roles r WHERE r.rolname IN ('edm_dispatcher', 'edm_app', 'edm_monitor') ORDER BY 1;""",
    "harden_functions": """\
-- Idempotent: re-run after adding functions in a migration of your own.
SELECT edm.harden_functions();""",
    "share_staged": """\
BEGIN;
CREATE TEMP TABLE edm_stage_recipients (ord bigint, email text, vars jsonb) ON COMMIT DROP;
SELECT edm.share_staged('edm_stage_recipients');
ROLLBACK;""",
    "audit_fields": """\
SELECT edm.audit_fields('user', '{"user_id": "acme", "quota_limit": 5, "quota_used": 3}');""",
    # -- validation helpers
    "email_problem": """\
SELECT e, edm.email_problem(e)
FROM unnest(ARRAY['ann@example.com', 'no-at-sign', E'evil@example.com\\r\\nBcc: x@y.z']) AS e;""",
    "is_valid_email": "SELECT edm.is_valid_email('ann@example.com'), edm.is_valid_email('ann@');",
    "normalize_email": "SELECT edm.normalize_email('  Ann@Example.COM ');",
    "is_valid_timezone": """\
SELECT edm.is_valid_timezone('Europe/Paris'), edm.is_valid_timezone('Mars/Olympus');""",
    "rule_matches": """\
SELECT edm.rule_matches('{"include_any": ["vip"], "exclude": ["fr"]}', ARRAY['vip', 'de']);""",
    "task_transition_ok": """\
SELECT edm.task_transition_ok('paused', 'sending') AS resume_ok,
       edm.task_transition_ok('completed', 'sending') AS restart_ok;""",
    # -- jobs (the rest get the generic example)
    "job_next_wakeup": "SELECT edm.job_next_wakeup();",
    "job_claim": """\
SELECT execution_id, job_id, job_name, kind, lease_expires_at
FROM edm.job_claim('psql-example', 1);""",
    "job_expire_runs": "SELECT edm.job_expire_runs();",
    "job_purge_executions": "SELECT edm.job_purge_executions();",
    "job_retry_delay": """\
-- 60 s, doubling, capped at 1 h: the delays before retries 1 to 4.
SELECT n, edm.job_retry_delay(60, 2, 3600, n) FROM generate_series(1, 4) AS n;""",
    "job_tags_ok": "SELECT edm.job_tags_ok(ARRAY['billing', 'nightly']);",
    "job_retry_on_ok": "SELECT edm.job_retry_on_ok(ARRAY['timeout', 'ConnectionError']);",
}

# ---------------------------------------------------------------------------
# The catalog
# ---------------------------------------------------------------------------

ROLE_LABELS = ("edm_dispatcher", "edm_app", "edm_monitor")

FUNCTIONS_SQL = """
SELECT p.oid::bigint, p.proname::text, p.oid::regprocedure::text,
       pg_get_function_arguments(p.oid), pg_get_function_result(p.oid),
       l.lanname::text, p.provolatile::text, p.prosecdef, p.proconfig,
       p.prorettype = 'trigger'::regtype, obj_description(p.oid, 'pg_proc')
FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
WHERE p.pronamespace = 'edm'::regnamespace AND p.prokind = 'f'
ORDER BY p.proname, pg_get_function_identity_arguments(p.oid)
"""

PARAMS_SQL = """
SELECT a.n::int, coalesce(p.proargnames[a.n], ''), coalesce(p.proargmodes[a.n], 'i')::text,
       format_type(a.t, NULL), pg_get_function_arg_default(p.oid, a.n::int)
FROM pg_proc p,
     unnest(coalesce(p.proallargtypes, p.proargtypes::oid[])) WITH ORDINALITY AS a(t, n)
WHERE p.oid = %s::oid
ORDER BY a.n
"""

RELATIONS_SQL = """
SELECT c.oid::bigint, c.relname::text, c.relkind::text, obj_description(c.oid, 'pg_class')
FROM pg_class c
WHERE c.relnamespace = 'edm'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
  AND NOT c.relispartition
  AND NOT EXISTS (SELECT 1 FROM pg_depend d
                  WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'i')
ORDER BY c.relname
"""

COLUMNS_SQL = """
SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull,
       CASE WHEN a.attidentity <> '' THEN 'identity'
            WHEN a.attgenerated = 's' THEN 'generated: ' || pg_get_expr(d.adbin, d.adrelid)
            ELSE pg_get_expr(d.adbin, d.adrelid) END,
       col_description(a.attrelid, a.attnum)
FROM pg_attribute a
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = %s::oid AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

INDEXES_SQL = """
SELECT i.relname::text, t.relname::text, pg_get_indexdef(i.oid),
       obj_description(i.oid, 'pg_class')
FROM pg_index x
JOIN pg_class i ON i.oid = x.indexrelid
JOIN pg_class t ON t.oid = x.indrelid
WHERE t.relnamespace = 'edm'::regnamespace AND NOT t.relispartition AND NOT i.relispartition
  AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.oid)
ORDER BY t.relname, i.relname
"""

TRIGGERS_SQL = """
SELECT t.relname::text, g.tgname::text, g.tgfoid::regprocedure::text, pg_get_triggerdef(g.oid)
FROM pg_trigger g JOIN pg_class t ON t.oid = g.tgrelid
WHERE t.relnamespace = 'edm'::regnamespace AND NOT g.tgisinternal AND NOT t.relispartition
ORDER BY t.relname, g.tgname
"""

MIGRATIONS_SQL = "SELECT version, name FROM edm.schema_migrations ORDER BY version"
SCHEMA_COMMENT_SQL = "SELECT obj_description('edm'::regnamespace, 'pg_namespace')"

FUNCTION_PRIVS_SQL = """
SELECT p.oid::bigint, r.label
FROM pg_proc p, unnest(%s::text[], %s::text[]) AS r(role, label)
WHERE p.pronamespace = 'edm'::regnamespace AND p.prokind = 'f'
  AND has_function_privilege(r.role, p.oid, 'EXECUTE')
ORDER BY p.oid, r.label
"""

TABLE_PRIVS_SQL = """
SELECT c.oid::bigint, r.label, string_agg(k.priv, ', ' ORDER BY k.ord)
FROM pg_class c, unnest(%s::text[], %s::text[]) AS r(role, label),
     unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE']) WITH ORDINALITY AS k(priv, ord)
WHERE c.relnamespace = 'edm'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm')
  AND has_table_privilege(r.role, c.oid, k.priv)
GROUP BY c.oid, r.label
ORDER BY c.oid, r.label
"""


@dataclass
class Param:
    name: str
    mode: str
    type: str
    default: str | None


@dataclass
class Function:
    oid: int
    name: str
    ident: str
    arguments: str
    result: str
    language: str
    volatility: str
    security_definer: bool
    config: list[str]
    is_trigger: bool
    comment: str
    params: list[Param] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    triggers: list[str] = field(default_factory=list)


@dataclass
class Column:
    name: str
    type: str
    not_null: bool
    default: str | None
    comment: str


@dataclass
class Relation:
    oid: int
    name: str
    kind: str
    comment: str
    columns: list[Column] = field(default_factory=list)
    privileges: list[str] = field(default_factory=list)


@dataclass
class Catalog:
    schema_comment: str
    migrations: list[tuple[int, str]]
    functions: list[Function]
    relations: list[Relation]
    indexes: list[tuple[str, str, str, str]]
    triggers: list[tuple[str, str, str, str]]


def read_catalog(conn: psycopg.Connection[Any]) -> Catalog:
    """Everything the reference shows, read from the catalog of schema edm."""
    functions = [
        Function(oid, name, ident, args, result, lang, vol, secdef, list(cfg or []), trig,
                 _one_line(comment))
        for oid, name, ident, args, result, lang, vol, secdef, cfg, trig, comment
        in conn.execute(FUNCTIONS_SQL).fetchall()
    ]
    for f in functions:
        f.params = [Param(name, mode, typ, default) for _n, name, mode, typ, default
                    in conn.execute(PARAMS_SQL, (f.oid,)).fetchall()]
    relations = [Relation(oid, name, kind, _one_line(comment))
                 for oid, name, kind, comment in conn.execute(RELATIONS_SQL).fetchall()]
    for r in relations:
        if r.kind != "S":
            r.columns = [Column(n, t, nn, d, _one_line(c))
                         for n, t, nn, d, c in conn.execute(COLUMNS_SQL, (r.oid,)).fetchall()]
    triggers = [tuple(row) for row in conn.execute(TRIGGERS_SQL).fetchall()]
    by_ident = {f.ident: f for f in functions}
    for table, name, func, _definition in triggers:
        if func in by_ident:
            by_ident[func].triggers.append(f"`{name}` on `edm.{table}`")
    _read_privileges(conn, functions, relations)
    (schema_comment,) = conn.execute(SCHEMA_COMMENT_SQL).fetchone() or ("",)
    return Catalog(
        schema_comment=_one_line(schema_comment),
        migrations=[(int(v), str(n)) for v, n in conn.execute(MIGRATIONS_SQL).fetchall()],
        functions=functions,
        relations=relations,
        indexes=[tuple(row) for row in conn.execute(INDEXES_SQL).fetchall()],
        triggers=triggers,
    )


def _read_privileges(conn: psycopg.Connection[Any], functions: list[Function],
                     relations: list[Relation]) -> None:
    """What edm.install_roles() grants, measured on throw-away roles and rolled back."""
    suffix = f"{os.getpid()}_{id(conn) % 100000}"
    roles = [f"edm_refgen_{suffix}_{label.removeprefix('edm_')}" for label in ROLE_LABELS]
    labels = list(ROLE_LABELS)
    with conn.transaction(force_rollback=True):
        try:
            conn.execute("SELECT edm.install_roles(%s, %s, %s)", roles)
        except psycopg.errors.InsufficientPrivilege as exc:
            raise SystemExit(
                "gen_sql_reference: this role cannot run edm.install_roles() "
                f"({exc.diag.message_primary}); run as a superuser or the schema owner "
                "with CREATEROLE, on a scratch database") from None
        fn_roles: dict[int, list[str]] = {}
        for oid, label in conn.execute(FUNCTION_PRIVS_SQL, (roles, labels)).fetchall():
            fn_roles.setdefault(oid, []).append(label)
        rel_privs: dict[int, list[str]] = {}
        for oid, label, privs in conn.execute(TABLE_PRIVS_SQL, (roles, labels)).fetchall():
            rel_privs.setdefault(oid, []).append(f"{label}: {privs}")
    for f in functions:
        f.roles = fn_roles.get(f.oid, [])
    for r in relations:
        r.privileges = rel_privs.get(r.oid, [])


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------

VOLATILITY = {"i": "immutable", "s": "stable", "v": "volatile"}
KINDS = {"r": "table", "p": "partitioned table", "v": "view", "m": "materialized view",
         "S": "sequence"}


def anchor(title: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[^\w\- ]", "", title.strip().lower())
    return text.replace(" ", "-")


def cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def generic_example(f: Function) -> str:
    if f.is_trigger:
        return (f"SELECT tgrelid::regclass AS on_table, tgname\n"
                f"FROM pg_trigger WHERE tgfoid = '{f.ident}'::regprocedure ORDER BY 1, 2;")
    ins = [p.name for p in f.params if p.mode in ("i", "b", "v")]
    where = " (see docs/jobs.md)" if f.name.startswith("job") else ""
    return "\n".join([
        f"-- No worked example yet{where}. Named arguments:",
        f"--   SELECT * FROM edm.{f.name}(" + ", ".join(f"{n} => ..." for n in ins) + ");",
        f"SELECT pg_get_function_arguments('{f.ident}'::regprocedure);",
    ])


def generic_view_example(r: Relation) -> str:
    cols = ", ".join(c.name for c in r.columns)
    return f"SELECT {cols}\nFROM edm.{r.name} LIMIT 10;"


def render_function_entry(name: str, overloads: list[Function]) -> list[str]:
    out = [f"### edm.{name}", ""]
    for f in overloads:
        ins = [p for p in f.params if p.mode in ("i", "b", "v")]
        out += ["```text", f"edm.{f.name}(" + ", ".join(p.name for p in ins) + ")",
                f"  RETURNS {f.result}", "```", ""]
        if f.comment:
            out += [f.comment, ""]
        if ins:
            out += ["| parameter | type | default |", "| --- | --- | --- |"]
            out += [f"| `{p.name or '(unnamed)'}` | {cell(p.type)} | "
                    f"{'`' + cell(p.default) + '`' if p.default else ''} |" for p in ins]
            out.append("")
        facts = [f"Language {f.language}, {VOLATILITY.get(f.volatility, f.volatility)}"]
        if f.security_definer:
            path = next((c.split("=", 1)[1] for c in f.config if c.startswith("search_path=")),
                        None)
            facts.append("SECURITY DEFINER" + (f" with search_path `{path}`" if path else ""))
        if f.is_trigger:
            facts.append("used by " + (", ".join(f.triggers) if f.triggers else "no trigger"))
        else:
            facts.append("EXECUTE granted by `edm.install_roles()` to "
                         + (", ".join(f"`{r}`" for r in f.roles) if f.roles
                            else "no role (internal, or the schema owner's alone)"))
        out += ["; ".join(facts) + ".", ""]
    example = EXAMPLES.get(name) or generic_example(overloads[0])
    out += ["```sql", example, "```", ""]
    return out


def render_view_entry(r: Relation) -> list[str]:
    out = [f"### edm.{r.name}", "", f"View. {r.comment}", ""]
    out += ["| column | type | meaning |", "| --- | --- | --- |"]
    out += [f"| `{c.name}` | {cell(c.type)} | {cell(c.comment)} |" for c in r.columns]
    out.append("")
    if r.privileges:
        out += ["SELECT granted by `edm.install_roles()`: "
                + "; ".join(f"`{p}`" for p in r.privileges) + ".", ""]
    out += ["```sql", EXAMPLES.get(r.name) or generic_view_example(r), "```", ""]
    return out


def render(cat: Catalog) -> str:
    by_name: dict[str, list[Function]] = {}
    for f in cat.functions:
        by_name.setdefault(f.name, []).append(f)
    views = {r.name: r for r in cat.relations if r.kind in ("v", "m")}
    placed: dict[str, list[str]] = {title: [] for title, _i, _n in SECTIONS}
    seen: set[str] = set()
    for title, _intro, names in SECTIONS:
        for n in names:
            if (n in by_name or n in views) and n not in seen:
                placed[title].append(n)
                seen.add(n)
    for n in sorted({*by_name, *views} - seen):
        fs = by_name.get(n)
        if fs and fs[0].is_trigger:
            placed[TRIGGER_SECTION].append(n)
        elif n.startswith("job"):
            placed[JOBS_SECTION].append(n)
        else:
            placed[OTHER_SECTION].append(n)

    out = [
        "# SQL reference: schema `edm`",
        "",
        "<!-- Generated by docs/gen_sql_reference.py from the database catalog. Do not edit:",
        "     change the COMMENT ON in sql/migrations/ (or the examples in the script) and run",
        "       python docs/gen_sql_reference.py --dsn DSN > docs/reference/sql.md",
        "     tests/project/test_docs.py::test_sql_reference_is_current fails while this is"
        " stale. -->",
        "",
        cat.schema_comment,
        "",
        "Every function and view of schema `edm`, with its signature, its parameters, its",
        "`COMMENT ON` text and a psql example, followed by the tables, sequences, indexes and",
        "triggers. Generated from the catalog of a database migrated with "
        + ", ".join(f"`{v:04d}_{n}`" for v, n in cat.migrations) + ".",
        "",
        "Conventions: a `p_now` parameter is an injectable clock (NULL means `now()`), used by",
        "tests and by the examples below. Errors use SQLSTATEs of class `ED`: ED001 not found,",
        "ED002 quota exceeded, ED003 invalid transition, ED004 lease lost, ED005 invalid",
        "argument, ED006 config value rejected, ED010–ED015 recurring jobs; the Python error",
        "classes are in [python.md](python.md#errors). \"EXECUTE granted to\" lists the",
        "group roles `edm.install_roles()` creates",
        "([operations guide](../operations.md#roles-and-grants)).",
        "",
        "The examples build on each other from top to bottom, starting from an empty, freshly",
        "migrated database; the test suite runs them exactly so. Paste them into `psql` in order.",
        "",
        "## Contents",
        "",
    ]
    for title, _intro, _names in SECTIONS:
        if placed[title]:
            out.append(f"- [{title}](#{anchor(title)}): "
                       + ", ".join(f"[{n}](#{anchor('edm.' + n)})" for n in placed[title]))
    out += ["- [Tables and sequences](#tables-and-sequences)", "- [Indexes](#indexes)",
            "- [Triggers](#triggers)", "", "## Setup", "", "```sql", SETUP, "```", ""]
    for title, intro, _names in SECTIONS:
        if not placed[title]:
            continue
        out += [f"## {title}", ""]
        if intro:
            out += [intro, ""]
        for n in placed[title]:
            if n in views:
                out += render_view_entry(views[n])
            else:
                out += render_function_entry(n, by_name[n])

    out += ["## Tables and sequences", ""]
    for r in cat.relations:
        if r.kind in ("v", "m"):
            continue
        out += [f"### edm.{r.name}", "", f"{KINDS[r.kind].capitalize()}. {r.comment}", ""]
        if r.columns:
            out += ["| column | type | null | default | meaning |",
                    "| --- | --- | --- | --- | --- |"]
            out += [f"| `{c.name}` | {cell(c.type)} | {'' if c.not_null else 'yes'} | "
                    f"{'`' + cell(c.default) + '`' if c.default else ''} | {cell(c.comment)} |"
                    for c in r.columns]
            out.append("")
        if r.privileges:
            out += ["Granted by `edm.install_roles()`: "
                    + "; ".join(f"`{p}`" for p in r.privileges) + ".", ""]

    out += ["## Indexes", "",
            "Indexes other than those of primary keys and unique constraints; "
            "[operations.md](../operations.md#indexes) says why each one exists.", "",
            "| index | table | definition | why |", "| --- | --- | --- | --- |"]
    for name, table, definition, comment in cat.indexes:
        short = re.sub(r"^CREATE (UNIQUE )?INDEX \S+ ON (ONLY )?\S+ (USING btree )?", r"\1",
                       definition)
        out.append(f"| `{name}` | `{table}` | `{cell(short)}` | {cell(_one_line(comment))} |")
    out += ["", "## Triggers", "", "| table | trigger | function |", "| --- | --- | --- |"]
    for table, name, func, _definition in cat.triggers:
        out.append(f"| `{table}` | `{name}` | `{func}` |")
    out.append("")
    return "\n".join(out)


def generate(dsn: str) -> str:
    """The text of docs/reference/sql.md for the database at ``dsn``."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Fixed search_path: regprocedure and format_type then always qualify edm names.
        conn.execute("SET search_path = pg_catalog, public")
        return render(read_catalog(conn))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=os.environ.get("EDM_SCHED_DSN"),
                        help="migrated database (default: $EDM_SCHED_DSN)")
    args = parser.parse_args(argv)
    if not args.dsn:
        parser.error("give --dsn or set EDM_SCHED_DSN")
    sys.stdout.write(generate(args.dsn))
    return 0


if __name__ == "__main__":
    sys.exit(main())
