"""sql/schema.sql and the migrations build the same database.

The catalog is read here independently of ``edm_sched.schema_dump`` (which
writes the file), so a bug in the dumper shows as a difference too.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

import psycopg
from psycopg import sql

from edm_sched import schema_dump, sqlfiles
from edm_sched.migrations import migrate

REGENERATE = f"regenerate it: {schema_dump.COMMAND}"

# Each query returns rows of text describing one kind of catalog object of schema edm.
CATALOG: dict[str, str] = {
    "schema": """
        SELECT nspname, obj_description(oid, 'pg_namespace'), nspacl::text
        FROM pg_namespace WHERE nspname = 'edm'""",
    "relations": """
        SELECT c.relname, c.relkind, c.relpersistence, c.reloptions::text, c.relacl::text,
               c.relispartition, pg_get_expr(c.relpartbound, c.oid),
               CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END,
               obj_description(c.oid, 'pg_class')
        FROM pg_class c WHERE c.relnamespace = 'edm'::regnamespace ORDER BY 1""",
    "columns": """
        SELECT c.relname, row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum), a.attname,
               format_type(a.atttypid, a.atttypmod), a.attnotnull, a.attidentity,
               a.attgenerated, pg_get_expr(d.adbin, d.adrelid), a.attcollation, a.attacl::text,
               col_description(c.oid, a.attnum)
        FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE c.relnamespace = 'edm'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY 1, 2""",
    "constraints": """
        SELECT c.relname, k.conname, k.contype, pg_get_constraintdef(k.oid), k.condeferrable,
               k.convalidated, k.conislocal, obj_description(k.oid, 'pg_constraint')
        FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
        WHERE k.connamespace = 'edm'::regnamespace ORDER BY 1, 2""",
    "indexes": """
        SELECT c.relname, pg_get_indexdef(i.indexrelid), obj_description(i.indexrelid, 'pg_class')
        FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
        WHERE c.relnamespace = 'edm'::regnamespace ORDER BY 1""",
    "sequences": """
        SELECT c.relname, s.seqtypid::regtype::text, s.seqstart, s.seqincrement, s.seqmax,
               s.seqmin, s.seqcache, s.seqcycle
        FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid
        WHERE c.relnamespace = 'edm'::regnamespace ORDER BY 1""",
    "functions": """
        SELECT p.oid::regprocedure::text, p.prosecdef, p.proconfig::text, p.provolatile,
               p.proleakproof, p.proisstrict, p.proparallel, p.proacl::text,
               pg_get_functiondef(p.oid), obj_description(p.oid, 'pg_proc')
        FROM pg_proc p WHERE p.pronamespace = 'edm'::regnamespace ORDER BY 1""",
    "views": """
        SELECT c.relname, pg_get_viewdef(c.oid) FROM pg_class c
        WHERE c.relnamespace = 'edm'::regnamespace AND c.relkind IN ('v', 'm') ORDER BY 1""",
    "triggers": """
        SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid), t.tgenabled,
               obj_description(t.oid, 'pg_trigger')
        FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
        WHERE c.relnamespace = 'edm'::regnamespace AND NOT t.tgisinternal ORDER BY 1, 2""",
    "types": """
        SELECT t.typname, t.typtype, t.typrelid <> 0, obj_description(t.oid, 'pg_type')
        FROM pg_type t WHERE t.typnamespace = 'edm'::regnamespace ORDER BY 1""",
    "policies_rules": """
        SELECT 'policy', polname::text FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid
        WHERE c.relnamespace = 'edm'::regnamespace
        UNION ALL SELECT 'rule', rulename::text FROM pg_rules WHERE schemaname = 'edm'
        ORDER BY 1, 2""",
}


def catalog(conn: psycopg.Connection[Any]) -> dict[str, list[str]]:
    conn.execute("SET search_path = pg_catalog")
    out = {kind: [" | ".join(map(str, row)) for row in conn.execute(q.encode()).fetchall()]
           for kind, q in CATALOG.items()}
    out["rows"] = _seed_rows(conn)
    return out


def _seed_rows(conn: psycopg.Connection[Any]) -> list[str]:
    """Every row of every table (a freshly built database holds only seed rows)."""
    rows: list[str] = []
    tables = conn.execute("""SELECT c.oid, c.relname::text FROM pg_class c
                             WHERE c.relnamespace = 'edm'::regnamespace AND c.relkind = 'r'
                             ORDER BY 2""").fetchall()
    for oid, name in tables:
        cols = [r[0] for r in conn.execute(schema_dump.SEED_COLUMNS.encode(), (oid,))]
        q = sql.SQL("SELECT {} FROM {} ORDER BY 1").format(
            sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in cols),
            sql.Identifier("edm", name))
        rows += [f"{name}: {row}" for row in conn.execute(q).fetchall()]
    return rows


def _loose(row: str) -> str:
    """A catalog row without parentheses and spaces.

    PostgreSQL deparses an expression with every grouping parenthesised, and
    parsing that text back can nest it differently (``x BETWEEN 1 AND 9 AND y``
    is stored as ``(a AND b) AND y``, its deparsed text as ``a AND b AND y``):
    the same expression, other text.
    """
    return re.sub(r"[()\s]", "", row)


def test_schema_file_builds_the_same_database_as_the_migrations(
        conn: psycopg.Connection[Any], empty_dsn: str) -> None:
    text = (sqlfiles.sql_dir() / "schema.sql").read_text("utf-8")
    with psycopg.connect(empty_dsn, autocommit=True) as fresh:
        fresh.execute(text.encode())
        from_file = catalog(fresh)
    from_migrations = catalog(conn)
    problems = []
    for kind in from_migrations:
        if list(map(_loose, from_migrations[kind])) == list(map(_loose, from_file[kind])):
            continue
        diff = difflib.unified_diff(from_migrations[kind], from_file[kind],
                                    "migrations", "sql/schema.sql", lineterm="", n=0)
        problems.append(f"[{kind}]\n" + "\n".join(list(diff)[:30]))
    assert not problems, (f"sql/schema.sql differs from the migrations; {REGENERATE}\n"
                          + "\n".join(problems))
    # Loaded from the file, every migration counts as applied: migrate has nothing to do.
    assert migrate(empty_dsn).newly_applied == []


def test_schema_file_is_what_the_dumper_writes(conn: psycopg.Connection[Any]) -> None:
    committed = (sqlfiles.sql_dir() / "schema.sql").read_text("utf-8")
    current = schema_dump.dump(conn)
    diff = list(difflib.unified_diff(committed.splitlines(), current.splitlines(),
                                     "sql/schema.sql", "generated", lineterm="", n=1))
    assert not diff, f"sql/schema.sql is stale; {REGENERATE}\n" + "\n".join(diff[:60])


def test_every_object_is_sorted_into_a_concept(conn: psycopg.Connection[Any]) -> None:
    """sql/schema.sql reads by concept: nothing lands under "Not yet sorted"."""
    left = schema_dump.unsorted(conn)
    assert not left, ("objects no concept of edm_sched/schema_dump.py claims (add them to "
                      f"CONCEPTS, then {schema_dump.COMMAND}): " + ", ".join(left))
    committed = (sqlfiles.sql_dir() / "schema.sql").read_text("utf-8")
    assert f"-- {schema_dump.UNSORTED}\n" not in committed


def test_migrate_can_build_a_fresh_database_from_the_schema_file(
        empty_dsn: str, conn: psycopg.Connection[Any]) -> None:
    status = migrate(empty_dsn, from_schema=True)
    assert status.newly_applied == [m.version for m in sqlfiles.migrations()]
    with psycopg.connect(empty_dsn) as fresh:
        built, expected = catalog(fresh), catalog(conn)
    for kind in expected:
        assert list(map(_loose, built[kind])) == list(map(_loose, expected[kind])), kind
    assert migrate(empty_dsn, from_schema=True).newly_applied == []
