"""Write the current definition of schema ``edm`` as one readable SQL file.

    python -m edm_sched.schema_dump > sql/schema.sql

builds a scratch database from ``sql/migrations/`` (on the server named by
``--dsn``, ``$EDM_SCHED_TEST_DSN`` or ``$EDM_SCHED_DSN``; else on an embedded
server in a temporary directory, which needs the ``demo`` extra), reads its
catalog and prints every object of schema ``edm``: tables with their columns,
constraints, indexes and seed rows, sequences, views, functions, triggers,
each followed by its ``COMMENT ON`` and its grants, grouped by concept
(``CONCEPTS``) and ordered so that the file loads into an empty database
(an object comes after everything it depends on, per ``pg_depend``).
``--database DSN`` dumps an existing database instead, e.g. to compare a
production schema with the file.

The file is generated, never edited by hand: change the schema with a new
migration, then run the command above. ``tests/sql/test_schema_file.py``
builds one database from the migrations and one from the file and fails on
any difference in the catalog.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

COMMAND = "python -m edm_sched.schema_dump > sql/schema.sql"

# ---------------------------------------------------------------------------
# Concepts: (title, what it is, objects in reading order). Objects not listed
# land in a concept by name prefix (job_*...) or under UNSORTED.
# ---------------------------------------------------------------------------

UNSORTED = "Not yet sorted"

CONCEPTS: list[tuple[str, str, list[str]]] = [
    ("Migrations",
     "Which migrations built this schema (all of them, when loaded from this file), and the "
     "helpers migrations use to change a function or the roles' grants in place.",
     ["schema_migrations", "patch_function", "extend_roles"]),
    ("Validation helpers",
     "Pure functions used by CHECK constraints and by the functions below.",
     ["email_problem", "is_valid_email", "normalize_email", "is_valid_timezone",
      "rule_matches", "task_transition_ok", "ts_add_ms", "epoch_ms", "smtp_code_suppresses",
      "headers_problem"]),
    ("Audit trail",
     "The append-only record of administrative changes, written by triggers.",
     ["audit_log", "audit_log_append_only", "audit_fields", "audit_row"]),
    ("Configuration",
     "Typed, hot-reloaded settings; a refused value raises ED006 with the allowed range.",
     ["config_value_ok", "job_http_allow_ok", "job_user_list_ok", "config", "config_renamed",
      "config_key", "config_int", "config_num", "config_set"]),
    ("Users, services and grants",
     "Users (the host platform's tenants), sending accounts, and who may send through what.",
     ["users", "services", "services_check_settings", "grants", "upsert_user", "set_user_quota",
      "create_service", "update_service", "grant_service", "revoke_service"]),
    ("Contacts, tags and suppressions",
     "Recipients known to a user, their tags, and addresses never to send to.",
     ["contacts", "tags", "suppressions", "merge_staged_contacts", "set_contact_tags",
      "delete_tag", "add_suppression", "remove_suppression", "is_suppressed"]),
    ("Tasks and subtasks",
     "Campaigns, their templates and one subtask per recipient; creation and lifecycle.",
     ["tasks", "templates", "subtasks", "require_user", "reserve_quota", "new_task",
      "create_task_from_staged", "create_task_from_rule", "expand_task", "lock_task",
      "pause_task", "resume_task", "cancel_task", "is_bulk_task", "tasks_track_status",
      "tasks_sync_claimable", "tasks_notify_scheduled", "start_due_tasks", "task_drained",
      "tasks_complete_drained"]),
    ("Readiness and quotas",
     "When a service may send: the predicates the claim uses.",
     ["service_sent_today", "service_next_quota_day", "service_is_ready"]),
    ("Rate limits",
     "A service's limits (rate with burst, rolling window, calendar day) and how a claim "
     "takes them; see docs/explanation/rate-limits.md.",
     ["service_limits", "limit_bucket_ms", "limit_next", "limits_next", "limit_after",
      "limits_take", "rolling_buckets_add", "service_binding_limit", "service_limits_flag",
      "set_service_limits", "service_limit_status"]),
    ("Warm-up",
     "Ramps of daily ceilings a new IP or account follows (the limit warmup).",
     ["service_warmups", "warmup_ramp_problem", "warmup_ramp", "warmup_ceiling",
      "apply_warmups", "set_service_warmup", "service_limits_keep_warmup",
      "service_warmup_status"]),
    ("Sites",
     "Receiving mailbox providers: the domains that share their throttles, and suspensions "
     "of a (service, site).",
     ["sites", "site_domains", "site_suspensions", "email_domain", "site_of", "sites_of",
      "set_site_domains", "cache_site_domains", "unmapped_domains", "suspend_site",
      "suspended_sites", "lift_site_suspension", "service_site_rules_sync",
      "site_suspensions_sync"]),
    ("Traffic shaping",
     "Limits beyond a service's own — global, per site, per (service, site), per user, per "
     "task — held at once by the claim; see docs/explanation/traffic-shaping.md.",
     ["shaping_limits", "shaping_key", "shaping_as_limit", "shaping_load", "shaping_next",
      "shaping_free", "shaping_replace", "shaping_limits_flag", "service_free_for_tier",
      "set_global_limits", "set_site_limits", "set_user_limits", "set_task_limits",
      "set_task_transactional", "task_site_wait", "shaping_limit_status"]),
    ("Reply rules",
     "Patterns on a provider's answers and the actions they trigger (suspend, bounce, retry); "
     "what a DBA reads of each site's state.",
     ["reply_rules", "shaping_actions", "reply_pattern_ok", "reply_transport_code",
      "reply_enhanced_code", "match_reply_rule", "set_reply_rule", "enable_reply_rule",
      "delete_reply_rule", "trim_shaping_actions", "site_status", "site_suspension_status"]),
    ("Dispatch: claim, complete, leases",
     "What every dispatcher calls: the atomic claim, fenced completion, lease recovery.",
     ["dispatchers", "serve_seq", "send_events", "claim", "claim_v2", "claim_next_subtask",
      "task_sendable_outside",
      "subtask_next_status", "complete", "expire_leases", "renew_leases", "release_holds",
      "report_pace", "live_dispatcher_count", "next_wakeup", "next_wakeup_v2"]),
    ("Sweeps, alerts and metrics",
     "Periodic maintenance run by the elected dispatcher.",
     ["sweep_state", "alerts", "metrics_hourly", "run_sweeps", "roll_quota_days",
      "finish_tasks", "raise_alert", "sweep_alerts", "take_alerts", "trg_quota_day_alerts",
      "resolve_stale_quota_alerts", "roll_up_metrics", "ensure_partitions", "apply_retention"]),
    ("Deliverability: feedback and reputation",
     "What is learned after sending (bounces, complaints, unsubscribes) and the reputation "
     "breaker that pauses a user or service above the thresholds.",
     ["feedback_events", "parse_message_id", "record_feedback", "unsubscribe",
      "cancel_pending_to", "reputation_rates", "check_reputation", "reputation_resume_service",
      "reputation_resume_user", "tasks_reputation_hold", "reputation_status"]),
    ("Monitoring views",
     "What a DBA reads when something looks wrong.",
     ["task_progress", "service_status", "system_health", "task_wait_reason",
      "task_wait_reasons", "possible_duplicates"]),
    ("Recurring jobs",
     "Cron-scheduled jobs on the same database (see docs/jobs.md).",
     ["jobs", "job_executions", "jobs_overview", "lock_job"]),
    ("Security",
     "Least privilege: SECURITY DEFINER on every writing function, roles and their grants.",
     ["harden_functions", "share_staged", "install_roles"]),
    (UNSORTED,
     f"Objects not listed in CONCEPTS of edm_sched/schema_dump.py: add them there, then run "
     f"`{COMMAND}`.",
     []),
]

# Objects not listed above land in a concept by name prefix, else under UNSORTED
# (which tests/sql/test_schema_file.py refuses).
_PREFIXES = {"job_": "Recurring jobs", "jobs_": "Recurring jobs", "config_": "Configuration",
             "shaping_": "Traffic shaping", "site_": "Sites", "warmup_": "Warm-up",
             "reply_": "Reply rules", "reputation_": "Deliverability: feedback and reputation"}

# Kinds in reading order within a concept.
_KIND_RANK = {"table": 0, "sequence": 1, "function": 2, "view": 3, "trigger": 4}


@dataclass
class Node:
    key: tuple[str, int]  # (kind, oid)
    kind: str
    name: str
    text: str
    deps: set[tuple[str, int]] = field(default_factory=set)
    function: str = ""  # a trigger's function


def _concept_of(name: str) -> tuple[int, int]:
    """(concept index, position within the concept) of an object name."""
    for i, (_, _, names) in enumerate(CONCEPTS):
        if name in names:
            return i, names.index(name)
    for prefix, title in _PREFIXES.items():
        if name.startswith(prefix):
            return [c[0] for c in CONCEPTS].index(title), 10_000
    return len(CONCEPTS) - 1, 10_000


def _node_concept(n: Node) -> tuple[int, int]:
    """(concept, position) of a node. A trigger goes with its table, or with its function
    when that concept comes later (tasks_reputation_hold reads best with deliverability)."""
    table = _concept_of(n.name)
    if n.kind != "trigger" or not n.function:
        return table
    fn = _concept_of(n.function)
    return fn if table[0] < fn[0] < len(CONCEPTS) - 1 else table


def _rows(conn: psycopg.Connection[Any], query: str, *params: Any) -> list[tuple[Any, ...]]:
    return conn.execute(query.encode(), params or None).fetchall()


_KEYWORDS: set[str] = set()  # words quote_ident() quotes; filled by dump()
_PLAIN = re.compile(r"^[a-z_][a-z0-9_$]*$")


def _q(name: str) -> str:
    """``name`` quoted only when it must be, as PostgreSQL's quote_ident() does."""
    if _PLAIN.match(name) and name not in _KEYWORDS:
        return name
    return sql.Identifier(name).as_string(None)


def _lit(value: str) -> str:
    return sql.Literal(value).as_string(None)


def _comment(kind: str, target: str, text: str | None) -> str:
    return "" if text is None else f"COMMENT ON {kind} {target} IS {_lit(text)};\n"


def _grants(conn: psycopg.Connection[Any], kind: str, target: str, acl: Any,
            owner: str) -> str:
    """GRANT/REVOKE statements reproducing ``acl`` (None: the defaults)."""
    if acl is None:
        return ""
    out = [f"REVOKE ALL ON {kind} {target} FROM PUBLIC;\n"]
    rows = _rows(conn, """
        SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END,
               string_agg(a.privilege_type, ', ' ORDER BY a.privilege_type)
        FROM aclexplode(%s::aclitem[]) a
        GROUP BY 1 ORDER BY 1""", acl)
    for grantee, privs in rows:
        if grantee == owner:
            continue
        out.append(f"GRANT {privs} ON {kind} {target} TO {grantee};\n")
    return "".join(out)


# ---------------------------------------------------------------------------
# Reading the catalog
# ---------------------------------------------------------------------------


def _tables(conn: psycopg.Connection[Any]) -> list[Node]:
    nodes = []
    for oid, name, _relkind, persistence, options, acl, owner, partkey in _rows(conn, """
            SELECT c.oid, c.relname::text, c.relkind, c.relpersistence, c.reloptions,
                   c.relacl, c.relowner::regrole::text,
                   CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END
            FROM pg_class c
            WHERE c.relnamespace = 'edm'::regnamespace AND c.relkind IN ('r', 'p')
              AND NOT c.relispartition
            ORDER BY c.relname"""):
        target = f"edm.{_q(name)}"
        lines = [_column(conn, oid, col) for col in _rows(conn, """
            SELECT a.attnum, a.attname::text, format_type(a.atttypid, a.atttypmod),
                   a.attnotnull, a.attidentity, a.attgenerated,
                   pg_get_expr(d.adbin, d.adrelid),
                   CASE WHEN a.attcollation <> t.typcollation
                        THEN (SELECT collname::text FROM pg_collation
                              WHERE oid = a.attcollation) END
            FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
            LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
            WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
            ORDER BY a.attnum""", oid)]
        for conname, condef in _rows(conn, """
                SELECT conname::text, pg_get_constraintdef(oid)
                FROM pg_constraint WHERE conrelid = %s AND conislocal AND contype <> 'n'
                ORDER BY array_position(ARRAY['p', 'u', 'x', 'f', 'c'], contype::text),
                         conname""", oid):
            lines.append(f"CONSTRAINT {_q(conname)} {condef}")
        text = f"CREATE {'UNLOGGED ' if persistence == 'u' else ''}TABLE {target} (\n  "
        text += ",\n  ".join(lines) + "\n)"
        if partkey:
            text += f" PARTITION BY {partkey}"
        if options:
            text += f" WITH ({', '.join(options)})"
        text += ";\n"
        for child, bound, coptions, cdescr in _rows(conn, """
                SELECT c.relname::text, pg_get_expr(c.relpartbound, c.oid), c.reloptions,
                       obj_description(c.oid, 'pg_class')
                FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                WHERE i.inhparent = %s ORDER BY c.relname""", oid):
            text += f"CREATE TABLE edm.{_q(child)} PARTITION OF {target} {bound}"
            text += f" WITH ({', '.join(coptions)});\n" if coptions else ";\n"
            text += _comment("TABLE", f"edm.{_q(child)}", cdescr)
        text += _comment("TABLE", target, _one(conn, "SELECT obj_description(%s, 'pg_class')",
                                                 oid))
        for attname, descr in _rows(conn, """
                SELECT a.attname::text, col_description(a.attrelid, a.attnum)
                FROM pg_attribute a WHERE a.attrelid = %s AND a.attnum > 0
                  AND NOT a.attisdropped ORDER BY a.attnum""", oid):
            text += _comment("COLUMN", f"{target}.{_q(attname)}", descr)
        for conname, descr in _rows(conn, """
                SELECT conname::text, obj_description(oid, 'pg_constraint')
                FROM pg_constraint WHERE conrelid = %s AND conislocal
                  AND obj_description(oid, 'pg_constraint') IS NOT NULL
                ORDER BY conname""", oid):
            text += _comment("CONSTRAINT", f"{_q(conname)} ON {target}", descr)
        for idxname, idxdef, descr in _rows(conn, """
                SELECT c.relname::text, pg_get_indexdef(i.indexrelid),
                       obj_description(c.oid, 'pg_class')
                FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                WHERE i.indrelid = %s
                  AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = c.oid
                                  AND k.conrelid = i.indrelid)
                ORDER BY c.relname""", oid):
            # An index on a partitioned table reads "ON ONLY": created on the parent,
            # it cascades to the partitions, as it did when the migration created it.
            idxdef = idxdef.replace(" ON ONLY edm.", " ON edm.", 1)
            text += f"{idxdef};\n" + _comment("INDEX", f"edm.{_q(idxname)}", descr)
        for seqname, descr, seqacl in _rows(conn, """
                SELECT s.relname::text, obj_description(s.oid, 'pg_class'), s.relacl
                FROM pg_depend d JOIN pg_class s ON s.oid = d.objid
                WHERE d.classid = 'pg_class'::regclass AND d.refobjid = %s
                  AND d.deptype = 'i' AND s.relkind = 'S' ORDER BY 1""", oid):
            text += _comment("SEQUENCE", f"edm.{_q(seqname)}", descr)
            text += _grants(conn, "SEQUENCE", f"edm.{_q(seqname)}", seqacl, owner)
        text += _grants(conn, "TABLE", target, acl, owner)
        text += _seed_rows(conn, oid, target)
        nodes.append(Node(("table", oid), "table", name, text))
    return nodes


def _column(conn: psycopg.Connection[Any], rel: int, col: tuple[Any, ...]) -> str:
    _attnum, name, typ, notnull, identity, generated, default, collation = col
    out = f"{_q(name)} {typ}"
    if collation:
        out += f" COLLATE {_q(collation)}"
    if identity:
        out += f" GENERATED {'ALWAYS' if identity == 'a' else 'BY DEFAULT'} AS IDENTITY"
        seq = _rows(conn, """
            SELECT s.seqstart, s.seqincrement, s.seqmin, s.seqmax, s.seqcache, s.seqcycle,
                   format_type(s.seqtypid, NULL)
            FROM pg_sequence s WHERE s.seqrelid = pg_get_serial_sequence(
                format('%%I.%%I', 'edm', (SELECT relname FROM pg_class WHERE oid = %s)),
                %s)::regclass""", rel, name)[0]
        options = _sequence_options(seq, typ)
        if options:
            out += f" ({options})"
    elif generated == "s":
        out += f" GENERATED ALWAYS AS ({default}) STORED"
    elif default is not None:
        out += f" DEFAULT {default}"
    if notnull:
        out += " NOT NULL"
    return out


def _sequence_options(seq: tuple[Any, ...], column_type: str | None = None) -> str:
    start, increment, minv, maxv, cache, cycle, typ = seq
    bits = {"smallint": 15, "integer": 31, "bigint": 63}[typ]
    parts = []
    if column_type is None and typ != "bigint":
        parts.append(f"AS {typ}")
    if increment != 1:
        parts.append(f"INCREMENT BY {increment}")
    if minv != (1 if increment > 0 else -(2**bits)):
        parts.append(f"MINVALUE {minv}")
    if maxv != (2**bits - 1 if increment > 0 else -1):
        parts.append(f"MAXVALUE {maxv}")
    if start != (minv if increment > 0 else maxv):
        parts.append(f"START WITH {start}")
    if cache != 1:
        parts.append(f"CACHE {cache}")
    if cycle:
        parts.append("CYCLE")
    return " ".join(parts)


# The columns of seed rows worth writing: not generated, and not a timestamp
# filled by its default (when the row was loaded: it differs on every build).
SEED_COLUMNS = """
    SELECT a.attname::text FROM pg_attribute a
    WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
      AND NOT (a.atthasdef AND a.atttypid = 'timestamptz'::regtype)
    ORDER BY a.attnum"""


def _seed_rows(conn: psycopg.Connection[Any], oid: int, target: str) -> str:
    """INSERTs for the rows a migrated database holds (seed data such as edm.config)."""
    if not _one(conn, sql.SQL("SELECT EXISTS (SELECT FROM {})").format(
            sql.Identifier("edm", _relname(conn, oid)))):
        return ""
    cols = [r[0] for r in _rows(conn, SEED_COLUMNS, oid)]
    select = sql.SQL("SELECT format('(%s)', concat_ws(', ', {})) FROM {} ORDER BY 1").format(
        sql.SQL(", ").join(sql.SQL("quote_nullable({})").format(sql.Identifier(c))
                           for c in cols),
        sql.Identifier("edm", _relname(conn, oid)))
    values = [r[0] for r in conn.execute(select).fetchall()]
    identity = _one(conn, "SELECT bool_or(attidentity = 'a') FROM pg_attribute "
                          "WHERE attrelid = %s AND attnum > 0", oid)
    overriding = " OVERRIDING SYSTEM VALUE" if identity else ""
    return (f"INSERT INTO {target} ({', '.join(_q(c) for c in cols)}){overriding} VALUES\n  "
            + ",\n  ".join(values) + ";\n")


def _relname(conn: psycopg.Connection[Any], oid: int) -> str:
    return str(_one(conn, "SELECT relname::text FROM pg_class WHERE oid = %s", oid))


def _one(conn: psycopg.Connection[Any], query: str | sql.Composed, *params: Any) -> Any:
    q = query.encode() if isinstance(query, str) else query
    row = conn.execute(q, params or None).fetchone()
    return None if row is None else row[0]


def _sequences(conn: psycopg.Connection[Any]) -> list[Node]:
    nodes = []
    for oid, name, acl, owner, descr, *seq in _rows(conn, """
            SELECT c.oid, c.relname::text, c.relacl, c.relowner::regrole::text,
                   obj_description(c.oid, 'pg_class'),
                   s.seqstart, s.seqincrement, s.seqmin, s.seqmax, s.seqcache, s.seqcycle,
                   format_type(s.seqtypid, NULL)
            FROM pg_class c JOIN pg_sequence s ON s.seqrelid = c.oid
            WHERE c.relnamespace = 'edm'::regnamespace AND c.relkind = 'S'
              AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid
                              AND d.classid = 'pg_class'::regclass AND d.deptype IN ('i', 'a'))
            ORDER BY c.relname"""):
        target = f"edm.{_q(name)}"
        options = _sequence_options(tuple(seq))
        text = f"CREATE SEQUENCE {target}{' ' + options if options else ''};\n"
        text += _comment("SEQUENCE", target, descr) + _grants(conn, "SEQUENCE", target, acl,
                                                              owner)
        nodes.append(Node(("sequence", oid), "sequence", name, text))
    return nodes


def _views(conn: psycopg.Connection[Any]) -> list[Node]:
    nodes = []
    for oid, name, options, acl, owner, viewdef, descr in _rows(conn, """
            SELECT c.oid, c.relname::text, c.reloptions, c.relacl, c.relowner::regrole::text,
                   pg_get_viewdef(c.oid), obj_description(c.oid, 'pg_class')
            FROM pg_class c WHERE c.relnamespace = 'edm'::regnamespace AND c.relkind = 'v'
            ORDER BY c.relname"""):
        target = f"edm.{_q(name)}"
        with_ = f" WITH ({', '.join(options)})" if options else ""
        text = f"CREATE VIEW {target}{with_} AS\n{viewdef.rstrip().rstrip(';')};\n"
        text += _comment("VIEW", target, descr)
        for attname, cdescr in _rows(conn, """
                SELECT a.attname::text, col_description(a.attrelid, a.attnum)
                FROM pg_attribute a WHERE a.attrelid = %s AND a.attnum > 0
                ORDER BY a.attnum""", oid):
            text += _comment("COLUMN", f"{target}.{_q(attname)}", cdescr)
        text += _grants(conn, "TABLE", target, acl, owner)
        nodes.append(Node(("view", oid), "view", name, text))
    return nodes


def _functions(conn: psycopg.Connection[Any]) -> list[Node]:
    nodes = []
    for oid, name, ident, prokind, acl, owner, definition, descr in _rows(conn, """
            SELECT p.oid, p.proname::text, p.oid::regprocedure::text, p.prokind, p.proacl,
                   p.proowner::regrole::text, pg_get_functiondef(p.oid),
                   obj_description(p.oid, 'pg_proc')
            FROM pg_proc p WHERE p.pronamespace = 'edm'::regnamespace
            ORDER BY p.proname, p.oid::regprocedure::text"""):
        if prokind not in ("f", "p"):
            raise RuntimeError(f"schema_dump cannot dump {ident} (prokind {prokind})")
        kind = "PROCEDURE" if prokind == "p" else "FUNCTION"
        text = definition.replace("CREATE OR REPLACE ", "CREATE ", 1).rstrip() + ";\n"
        text += _comment(kind, ident, descr) + _grants(conn, kind, ident, acl, owner)
        nodes.append(Node(("function", oid), "function", name, text))
    return nodes


def _triggers(conn: psycopg.Connection[Any]) -> list[Node]:
    nodes = []
    for oid, name, relname, tgdef, descr, function in _rows(conn, """
            SELECT t.oid, t.tgname::text, c.relname::text, pg_get_triggerdef(t.oid),
                   obj_description(t.oid, 'pg_trigger'), t.tgfoid::regproc::text
            FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
            WHERE c.relnamespace = 'edm'::regnamespace AND NOT t.tgisinternal
              AND t.tgparentid = 0
            ORDER BY c.relname, t.tgname"""):
        text = f"{tgdef};\n" + _comment("TRIGGER", f"{_q(name)} ON edm.{_q(relname)}", descr)
        nodes.append(Node(("trigger", oid), "trigger", relname, text,
                          function=function.removeprefix("edm.")))
    return nodes


def _check_supported(conn: psycopg.Connection[Any]) -> None:
    """Fail loudly on kinds of objects this dumper does not write."""
    other = _rows(conn, """
        SELECT 'relation ' || relname || ' (relkind ' || relkind::text || ')' FROM pg_class
        WHERE relnamespace = 'edm'::regnamespace AND relkind NOT IN ('r', 'p', 'v', 'S', 'i', 'I')
        UNION ALL
        SELECT 'type ' || typname FROM pg_type t
        WHERE typnamespace = 'edm'::regnamespace AND typtype NOT IN ('b', 'c')
        UNION ALL
        SELECT 'policy ' || polname FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid
        WHERE c.relnamespace = 'edm'::regnamespace
        UNION ALL
        SELECT 'rule ' || rulename FROM pg_rules WHERE schemaname = 'edm'
        UNION ALL
        SELECT 'default privileges' FROM pg_default_acl
        WHERE defaclnamespace = 'edm'::regnamespace""")
    if other:
        raise RuntimeError("schema_dump does not know how to write: "
                           + ", ".join(r[0] for r in other) + " — teach it, then regenerate")


def _dependencies(conn: psycopg.Connection[Any],
                  nodes: dict[tuple[str, int], Node]) -> None:
    """Fill ``Node.deps`` from pg_depend, each end mapped to the node that writes it."""
    owner_of = """
        CASE %1$s
          WHEN 'pg_proc'::regclass THEN 'function:' || %2$s
          WHEN 'pg_trigger'::regclass THEN 'trigger:' || %2$s
          WHEN 'pg_attrdef'::regclass THEN
            (SELECT 'rel:' || adrelid FROM pg_attrdef WHERE oid = %2$s)
          WHEN 'pg_constraint'::regclass THEN
            (SELECT 'rel:' || conrelid FROM pg_constraint WHERE oid = %2$s AND conrelid <> 0)
          WHEN 'pg_rewrite'::regclass THEN
            (SELECT 'rel:' || ev_class FROM pg_rewrite WHERE oid = %2$s)
          WHEN 'pg_type'::regclass THEN
            (SELECT 'rel:' || coalesce(nullif(t.typrelid, 0), e.typrelid) FROM pg_type t
             LEFT JOIN pg_type e ON e.oid = t.typelem WHERE t.oid = %2$s)
          WHEN 'pg_class'::regclass THEN 'rel:' || %2$s
        END"""
    q = f"""
        SELECT DISTINCT {owner_of.replace('%1$s', 'd.classid').replace('%2$s', 'd.objid')},
               {owner_of.replace('%1$s', 'd.refclassid').replace('%2$s', 'd.refobjid')}
        FROM pg_depend d WHERE d.deptype IN ('n', 'a')"""
    by_ref = _node_index(conn, nodes)
    for a, b in _rows(conn, q):
        na, nb = by_ref.get(a), by_ref.get(b)
        if na is not None and nb is not None and na != nb:
            nodes[na].deps.add(nb)


def _node_index(conn: psycopg.Connection[Any],
                nodes: dict[tuple[str, int], Node]) -> dict[str, tuple[str, int]]:
    """'rel:OID' / 'function:OID' / 'trigger:OID' → the node that writes the object."""
    index: dict[str, tuple[str, int]] = {}
    for key in nodes:
        kind, oid = key
        prefix = {"table": "rel", "sequence": "rel", "view": "rel"}.get(kind, kind)
        index[f"{prefix}:{oid}"] = key
    # Partitions, indexes and owned sequences are written with their table.
    for child, parent in _rows(conn, """
            SELECT i.inhrelid, i.inhparent FROM pg_inherits i JOIN pg_class c
              ON c.oid = i.inhparent WHERE c.relnamespace = 'edm'::regnamespace
            UNION ALL
            SELECT x.indexrelid, coalesce((SELECT inhparent FROM pg_inherits
                                           WHERE inhrelid = x.indrelid), x.indrelid)
            FROM pg_index x JOIN pg_class c ON c.oid = x.indrelid
            WHERE c.relnamespace = 'edm'::regnamespace
            UNION ALL
            SELECT d.objid, d.refobjid FROM pg_depend d JOIN pg_class s ON s.oid = d.objid
            WHERE s.relnamespace = 'edm'::regnamespace AND s.relkind = 'S'
              AND d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
              AND d.deptype IN ('i', 'a')"""):
        if f"rel:{parent}" in index:
            index[f"rel:{child}"] = index[f"rel:{parent}"]
    return index


# ---------------------------------------------------------------------------
# Writing the file
# ---------------------------------------------------------------------------


def _nodes(conn: psycopg.Connection[Any]) -> list[Node]:
    """Every object of schema edm, as the file writes it."""
    conn.execute("SET search_path = pg_catalog")
    _KEYWORDS.update(r[0] for r in _rows(conn, "SELECT word FROM pg_get_keywords() "
                                               "WHERE catcode <> 'U'"))
    _check_supported(conn)
    return [*_tables(conn), *_sequences(conn), *_functions(conn), *_views(conn),
            *_triggers(conn)]


def unsorted(conn: psycopg.Connection[Any]) -> list[str]:
    """The objects of the database behind ``conn`` that no concept claims ("kind name")."""
    last = len(CONCEPTS) - 1
    return sorted({f"{n.kind} {n.name}" for n in _nodes(conn)
                   if _node_concept(n)[0] == last})


def dump(conn: psycopg.Connection[Any]) -> str:
    """The SQL text of sql/schema.sql for the database behind ``conn``."""
    nodes = {n.key: n for n in _nodes(conn)}
    _dependencies(conn, nodes)

    def rank(n: Node) -> tuple[int, int, int, str, int]:
        concept, pos = _node_concept(n)
        # Triggers read best right after the functions of their concept.
        return concept, _KIND_RANK[n.kind], pos, n.name, n.key[1]

    order: list[Node] = []
    state: dict[tuple[str, int], str] = {}

    def visit(n: Node, path: list[str]) -> None:
        if state.get(n.key) == "done":
            return
        if state.get(n.key) == "busy":
            raise RuntimeError("dependency cycle: " + " -> ".join([*path, n.name]))
        state[n.key] = "busy"
        for dep in sorted((nodes[d] for d in n.deps), key=rank):
            visit(dep, [*path, n.name])
        state[n.key] = "done"
        order.append(n)

    for n in sorted(nodes.values(), key=rank):
        visit(n, [])

    schema_comment = _one(conn, "SELECT obj_description('edm'::regnamespace, 'pg_namespace')")
    nsp = _rows(conn, """SELECT nspacl, nspowner::regrole::text FROM pg_namespace
                         WHERE nspname = 'edm'""")[0]
    out = [HEADER, "CREATE SCHEMA edm;\n", _comment("SCHEMA", "edm", schema_comment),
           _grants(conn, "SCHEMA", "edm", nsp[0], nsp[1])]
    current = -1
    for n in order:
        concept = _node_concept(n)[0]
        if concept != current:
            title, intro, _ = CONCEPTS[concept]
            out.append(f"\n-- {'=' * 74}\n-- {title}\n-- {intro}\n-- {'=' * 74}\n")
            current = concept
        out.append("\n" + n.text)
    out.append("\nRESET check_function_bodies;\nRESET search_path;\n")
    return "".join(out)


HEADER = f"""\
-- The current definition of every object of schema edm, grouped by concept.
--
-- GENERATED from a database built by sql/migrations/ with
--     {COMMAND}
-- Do not edit: change the schema with a new migration, then regenerate this
-- file. tests/sql/test_schema_file.py builds one database from the migrations
-- and one from this file and fails on any difference in the catalog.
--
-- Loading this file into an empty database (psql -f, or edm_sched.migrate(dsn,
-- from_schema=True)) gives the same schema as running every migration, with
-- every migration recorded as applied.

SET check_function_bodies = false;
SET search_path = pg_catalog;

"""


@contextlib.contextmanager
def scratch_database(server_dsn: str | None) -> Iterator[str]:
    """A new empty database, dropped afterwards; on an embedded server when no DSN."""
    from psycopg import conninfo

    name = f"edm_schema_dump_{os.getpid()}"
    with contextlib.ExitStack() as stack:
        if server_dsn is None:
            from edm_sched.demo.embedded import EmbeddedPostgres

            tmp = Path(tempfile.mkdtemp(prefix="edm-sched-schema-"))
            stack.callback(shutil.rmtree, tmp, True)
            server_dsn = stack.enter_context(EmbeddedPostgres(tmp / "pgdata")).dsn()
        admin = server_dsn
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
            c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield conninfo.make_conninfo(admin, dbname=name)
        finally:
            with psycopg.connect(admin, autocommit=True) as c:
                c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edm_sched.schema_dump",
        description="Print the current schema edm (sql/schema.sql) built from the migrations.")
    parser.add_argument("--dsn", help="a server where a scratch database may be created "
                        "(default: $EDM_SCHED_TEST_DSN, $EDM_SCHED_DSN, else an embedded server)")
    parser.add_argument("--database", metavar="DSN",
                        help="dump this already migrated database instead of a scratch one")
    args = parser.parse_args(argv)
    if args.database:
        with psycopg.connect(args.database) as conn:
            sys.stdout.write(dump(conn))
        return 0
    from edm_sched.migrations import migrate

    server = (args.dsn or os.environ.get("EDM_SCHED_TEST_DSN")
              or os.environ.get("EDM_SCHED_DSN") or None)
    with scratch_database(server) as dsn:
        migrate(dsn)
        with psycopg.connect(dsn) as conn:
            text = dump(conn)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
