"""S4 expansion: one tag-rule task over 1,000,000 tagged contacts.

``python -m benchmarks expansion [--dsn DSN] [--json] [--contacts N] [--chunk N]``

Builds the contacts set-based (``INSERT ... SELECT generate_series``) with a
realistic tag mix, a few per cent unsubscribed and about 1 % of the addresses
suppressed, then times ``Scheduler.create_task(rule=...)`` for an
include/exclude rule: the reservation (count of matches), then the chunked
expansion, each chunk its own transaction. In the same run it times a bare
``INSERT ... SELECT`` of the same rows (same columns) into ``edm.subtasks`` for a
second task created directly: the cost of writing those rows and their index
entries with no rule, no dedupe, no suppression check. The ratio of the two is
the overhead of expansion; the goal is at most 10 s and at most 2x.

Diagnostics follow the headline: the time of each part of the expansion
(the reservation count, each chunk) and of the rule's SELECT with and
without the suppression check, so that a miss can be explained.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from benchmarks import common
from edm_sched.api import EXPANSION_CHUNK, Scheduler

USER = "bench"
RULE = {"include_any": ["newsletter", "customer"], "include_all": [], "exclude": ["inactive"]}
TEMPLATES = [{"subject": "Spring sale, {{ first_name }}", "body_text": "Hello {{ first_name }}"},
             {"subject": "Our spring sale", "body_text": "Hello!"}]

# Tag mix: each tag independently with its probability, plus one language and
# one of 20 regions per contact. Tags are drawn from random() after
# setseed(), so every run builds the same contacts.
TAG_MIX = (("newsletter", 0.60), ("customer", 0.30), ("vip", 0.05), ("inactive", 0.10),
           ("trial", 0.08), ("bounced_soft", 0.02), ("webinar_2025", 0.12), ("app_user", 0.25))
UNSUBSCRIBED = 0.03
SUPPRESSED_EVERY = 97  # every 97th address is suppressed (about 1 %), globally or per user

BUILD_CONTACTS = """
INSERT INTO edm.contacts (user_id, email, attributes, tags, unsubscribed)
SELECT %(user)s,
       'contact' || g || '@' || (ARRAY['gmail.com', 'yahoo.com', 'outlook.com', 'example.org',
                                      'corp-mail.example'])[1 + g %% 5],
       jsonb_build_object('first_name', 'Name' || g, 'plan', (ARRAY['free', 'pro'])[1 + g %% 2]),
       array_remove(ARRAY[{tag_cases},
                          (ARRAY['lang_en', 'lang_fr', 'lang_de', 'lang_es'])[1 + g %% 4],
                          'region_' || (g %% 20)], NULL),
       random() < %(unsub)s
FROM generate_series(1, %(n)s) AS g
"""

SUPPRESS = """
INSERT INTO edm.suppressions (user_id, email, reason)
SELECT CASE WHEN g %% 2 = 0 THEN NULL ELSE %(user)s END,
       'contact' || g || '@' || (ARRAY['gmail.com', 'yahoo.com', 'outlook.com', 'example.org',
                                      'corp-mail.example'])[1 + g %% 5],
       'hard_bounce'
FROM generate_series(%(every)s, %(n)s, %(every)s) AS g
"""

# The rule's SELECT as edm.expand_task runs it (one chunk, from the start).
RULE_SELECT = """
SELECT c.contact_id, c.email
FROM edm.contacts c
WHERE c.user_id = %(user)s AND c.contact_id > 0 AND NOT c.unsubscribed
  AND c.tags && %(any)s::text[]
  AND NOT c.tags && %(exc)s::text[]
  {suppression}
ORDER BY c.contact_id
LIMIT %(limit)s
"""


def build(conn: psycopg.Connection[Any], n: int) -> dict[str, Any]:
    """The user, its contacts and the suppressions; returns counts and build time."""
    tag_cases = ", ".join(f"CASE WHEN random() < {p} THEN '{tag}' END" for tag, p in TAG_MIX)
    with common.Stopwatch() as sw:
        conn.execute("SELECT edm.upsert_user(%s, 'benchmark user', NULL)", (USER,))
        conn.execute("SELECT setseed(0.42)")
        conn.execute(BUILD_CONTACTS.format(tag_cases=tag_cases),  # type: ignore[arg-type]
                     {"user": USER, "n": n, "unsub": UNSUBSCRIBED})
        conn.execute("INSERT INTO edm.tags (user_id, tag) SELECT DISTINCT %s, t"
                     " FROM edm.contacts, unnest(tags) t ON CONFLICT DO NOTHING", (USER,))
        conn.execute(SUPPRESS, {"user": USER, "n": n, "every": SUPPRESSED_EVERY})
        conn.execute("VACUUM ANALYZE edm.contacts")
        conn.execute("VACUUM ANALYZE edm.suppressions")
    row = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE unsubscribed),"
        " (SELECT count(*) FROM edm.suppressions) FROM edm.contacts").fetchone()
    assert row is not None
    return {"contacts": row[0], "unsubscribed": row[1], "suppressions": row[2],
            "build_seconds": sw.seconds}


def bare_insert(conn: psycopg.Connection[Any], source_task: int) -> tuple[int, float]:
    """Copy the expanded rows (same columns) into a second task created directly."""
    row = conn.execute(
        "INSERT INTO edm.tasks (user_id, name, status, recipient_rule)"
        " VALUES (%s, 'bare insert', 'draft', %s) RETURNING task_id",
        (USER, Jsonb(RULE))).fetchone()
    assert row is not None
    with common.Stopwatch() as sw:
        cur = conn.execute(
            "INSERT INTO edm.subtasks (task_id, email, contact_id, template_idx)"
            " SELECT %s, st.email, st.contact_id, st.template_idx FROM edm.subtasks st"
            " WHERE st.task_id = %s ORDER BY st.subtask_id", (row[0], source_task))
    return cur.rowcount, sw.seconds


def expand_by_parts(conn: psycopg.Connection[Any], chunk: int) -> dict[str, Any]:
    """The same expansion again, step by step, each step timed (diagnostics)."""
    with common.Stopwatch() as sw:
        row = conn.execute(
            "SELECT task_id, recipients FROM edm.create_task_from_rule(%s, 'by parts', %s, %s)",
            (USER, Jsonb(TEMPLATES), Jsonb(RULE))).fetchone()
    assert row is not None
    task_id, reserved = int(row[0]), int(row[1])
    chunks: list[float] = []
    while True:
        start = time.perf_counter()
        row = conn.execute("SELECT done FROM edm.expand_task(%s, %s)", (task_id, chunk)).fetchone()
        chunks.append(time.perf_counter() - start)
        if row is None or row[0]:
            break
    return {"task_id": task_id, "reserved": reserved, "reserve_seconds": sw.seconds,
            "chunk_seconds": chunks}


# The suppression check as edm.expand_task writes it (an anti-join), and as a
# call of edm.is_suppressed() per contact (what it did before: the planner
# cannot inline that function, its body being a sub-select).
ANTI_JOIN = ("AND NOT EXISTS (SELECT 1 FROM edm.suppressions s WHERE s.email = c.email"
             " AND (s.user_id IS NULL OR s.user_id = %(user)s))")
PER_ROW_CALL = "AND NOT edm.is_suppressed(%(user)s, c.email)"


def select_times(conn: psycopg.Connection[Any], limit: int) -> dict[str, float]:
    """The rule's SELECT alone: no suppression check, as an anti-join, as a call per row."""
    out: dict[str, float] = {}
    params = {"user": USER, "any": RULE["include_any"], "exc": RULE["exclude"], "limit": limit}
    for name, clause in (("select_without_suppression_check", ""),
                         ("select_with_anti_join", ANTI_JOIN),
                         ("select_with_is_suppressed_call", PER_ROW_CALL)):
        q = "SELECT count(*) FROM (" + RULE_SELECT.format(suppression=clause) + ") x"
        with common.Stopwatch() as sw:
            conn.execute(q, params)  # type: ignore[arg-type]
        out[name] = sw.seconds
    return out


def explain_chunk(conn: psycopg.Connection[Any], limit: int) -> list[str]:
    """EXPLAIN ANALYZE of the chunk statement's SELECT (the INSERT is timed above)."""
    q = "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + RULE_SELECT.format(suppression=ANTI_JOIN)
    rows = conn.execute(q, {"user": USER, "any": RULE["include_any"],  # type: ignore[arg-type]
                            "exc": RULE["exclude"], "limit": limit}).fetchall()
    return [r[0] for r in rows]


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--contacts", type=int, default=1_000_000,
                        help="contacts to build (default 1,000,000)")
    parser.add_argument("--chunk", type=int, default=EXPANSION_CHUNK,
                        help=f"expansion chunk size (default {EXPANSION_CHUNK:,}, the API's)")
    parser.add_argument("--explain", action="store_true",
                        help="print EXPLAIN ANALYZE of the chunk statement's SELECT")


def main(argv: Sequence[str]) -> int:
    args = common.parse_args("expansion", argv, "S4: expand one tag rule over 1M contacts",
                             _extra)
    result: dict[str, Any] = {"scenario": "expansion"}
    with common.bench_server(args.dsn, keep=args.keep) as server:
        dsn = server.fresh_database("bench_expansion")
        scale = {"contacts": args.contacts, "chunk": args.chunk, "rule": RULE}
        result.update(common.print_header("S4 expansion", server, scale))
        with psycopg.connect(dsn, autocommit=True) as conn, \
                Scheduler(dsn, min_size=1, max_size=2) as sched:
            common.say(f"building {args.contacts:,} contacts")
            world = build(conn, args.contacts)
            common.say(f"built in {world['build_seconds']:.1f} s; expanding the rule")
            with common.Stopwatch() as sw:
                created = sched.create_task({"user_id": USER, "name": "spring sale",
                                             "templates": TEMPLATES, "rule": RULE})
            expansion_s = sw.seconds
            # the API expands in chunks of its own size; --chunk applies to the diagnostics
            common.say(f"expanded {created.recipients:,} recipients in {expansion_s:.2f} s;"
                       " bare insert")
            bare_rows, bare_s = bare_insert(conn, created.task_id)
            assert bare_rows == created.recipients
            common.say("diagnostics")
            parts = expand_by_parts(conn, args.chunk)
            selects = select_times(conn, args.chunk)
            plan = explain_chunk(conn, args.chunk) if args.explain else []
        rows = [
            ["create_task(rule=...) (reserve + expand)", created.recipients, expansion_s, 1.0],
            ["bare INSERT ... SELECT, same rows", bare_rows, bare_s, bare_s / expansion_s],
        ]
        common.print_table(
            "expansion vs bare insert",
            ["what", "recipients", "seconds", "share of expansion"], rows,
            note=f"ratio expansion / bare insert = {common.ratio(expansion_s, bare_s):.2f} "
                 f"(goal <= 2); expansion {expansion_s:.2f} s (goal <= 10 s)")
        chunk_s = parts["chunk_seconds"]
        diag = [["reservation (count of matches)", parts["reserve_seconds"]],
                *[[f"chunk {i + 1}", s] for i, s in enumerate(chunk_s)],
                ["rule SELECT, no suppression check", selects["select_without_suppression_check"]],
                ["rule SELECT + NOT EXISTS (expand_task)", selects["select_with_anti_join"]],
                ["rule SELECT + edm.is_suppressed() per row",
                 selects["select_with_is_suppressed_call"]]]
        common.print_table(f"diagnostics (second expansion, chunk {args.chunk:,})",
                           ["step", "seconds"], diag)
        if plan:
            print("\nEXPLAIN ANALYZE (chunk SELECT):")
            print("\n".join(plan))
        result.update({
            "recipients": created.recipients,
            "seconds": expansion_s,
            "bare_insert_seconds": bare_s,
            "ratio_to_bare_insert": common.ratio(expansion_s, bare_s),
            "recipients_per_second": created.recipients / expansion_s if expansion_s else None,
            "world": world,
            "diagnostics": {"reserve_seconds": parts["reserve_seconds"],
                            "chunk_seconds": chunk_s, **selects},
        })
    return common.finish(args, result)
