"""The schema: every object documented, migrations idempotent and tamper-proof."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from edm_sched import errors, sqlfiles
from edm_sched.migrations import migrate


def test_every_object_in_schema_has_a_comment(conn: psycopg.Connection[Any]) -> None:
    missing = conn.execute(
        """
        SELECT kind, name FROM (
          SELECT CASE c.relkind WHEN 'r' THEN 'table' WHEN 'p' THEN 'table' WHEN 'v' THEN 'view'
                   WHEN 'm' THEN 'materialized view' WHEN 'S' THEN 'sequence'
                   WHEN 'i' THEN 'index' WHEN 'I' THEN 'index' END AS kind,
                 c.relname::text AS name, obj_description(c.oid, 'pg_class') AS d
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = 'edm' AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'i', 'I')
            AND NOT (c.relkind = 'i'
                     AND EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = c.oid))
            AND NOT c.relispartition
            AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'i')
          UNION ALL
          SELECT 'column', c.relname || '.' || a.attname, col_description(c.oid, a.attnum)
          FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = 'edm' AND c.relkind IN ('r', 'p', 'v', 'm') AND a.attnum > 0
            AND NOT a.attisdropped AND NOT c.relispartition
          UNION ALL
          SELECT 'function', p.oid::regprocedure::text, obj_description(p.oid, 'pg_proc')
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'edm'
          UNION ALL
          SELECT 'schema', 'edm', obj_description(n.oid, 'pg_namespace')
          FROM pg_namespace n WHERE n.nspname = 'edm'
        ) x WHERE d IS NULL OR d = '' ORDER BY 1, 2
        """
    ).fetchall()
    assert missing == []


def test_migrating_twice_changes_nothing(dsn: str, conn: psycopg.Connection[Any]) -> None:
    def snapshot() -> list[tuple[Any, ...]]:
        return conn.execute(
            """SELECT c.relname::text, a.attname::text, format_type(a.atttypid, a.atttypmod)
               FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = 'edm' AND a.attnum > 0 ORDER BY 1, 2"""
        ).fetchall()

    before = snapshot()
    status = migrate(dsn)
    assert status.newly_applied == []
    assert status.applied == [m.version for m in sqlfiles.migrations()]
    assert snapshot() == before


def test_fresh_database_is_migrated_step_by_step(empty_dsn: str) -> None:
    versions = [m.version for m in sqlfiles.migrations()]
    first = migrate(empty_dsn, target=versions[0])
    assert first.newly_applied == [versions[0]]
    rest = migrate(empty_dsn)
    assert rest.newly_applied == versions[1:]


def test_edited_applied_migration_is_refused(conn: psycopg.Connection[Any], dsn: str) -> None:
    conn.execute("UPDATE edm.schema_migrations SET checksum = 'deadbeef' WHERE version = 1")
    with pytest.raises(errors.MigrationError, match="edited after it was applied"):
        migrate(dsn)


def test_unknown_migration_in_database_is_refused(conn: psycopg.Connection[Any], dsn: str) -> None:
    conn.execute("INSERT INTO edm.schema_migrations VALUES (9999, 'future', 'x')")
    with pytest.raises(errors.MigrationError, match=r"\[9999\].*newer"):
        migrate(dsn)


def test_concurrent_migrations_are_serialised(empty_dsn: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: migrate(empty_dsn), range(4)))
    applied = sorted(v for r in results for v in r.newly_applied)
    assert applied == [m.version for m in sqlfiles.migrations()]


def test_malformed_dsn_is_a_configuration_error() -> None:
    with pytest.raises(errors.ConfigurationError, match="malformed DSN"):
        migrate("host=localhost port=5432 this is not a dsn")


def test_unreachable_server_is_reported() -> None:
    with pytest.raises(errors.DatabaseUnavailable, match="cannot connect"):
        migrate("postgresql://nobody:secret@127.0.0.1:1/none?connect_timeout=2")


def test_password_never_shown_in_errors() -> None:
    with pytest.raises(errors.DatabaseUnavailable) as info:
        migrate("postgresql://nobody:hunter2@127.0.0.1:1/none?connect_timeout=2")
    assert "hunter2" not in str(info.value)


def test_missing_privileges_and_foreign_owner(empty_dsn: str) -> None:
    from psycopg import conninfo

    with psycopg.connect(empty_dsn, autocommit=True) as c:
        c.execute("DROP ROLE IF EXISTS edm_weak")
        c.execute("CREATE ROLE edm_weak LOGIN")
        c.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        c.execute("REVOKE CREATE ON DATABASE " + c.info.dbname + " FROM PUBLIC")
    weak = conninfo.make_conninfo(empty_dsn, user="edm_weak")
    try:
        with pytest.raises(errors.PermissionDenied, match="cannot create schema edm"):
            migrate(weak)
        migrate(empty_dsn)  # the owner installs it
        with pytest.raises(errors.MigrationError, match="owned by role"):
            migrate(weak)
    finally:
        with psycopg.connect(empty_dsn, autocommit=True) as c:
            c.execute("DROP OWNED BY edm_weak")
            c.execute("DROP ROLE edm_weak")


def test_runner_hardens_functions_a_migration_forgot(dsn: str,
                                                     conn: psycopg.Connection[Any]) -> None:
    """A migration that CREATE OR REPLACEs a writing function without calling
    edm.harden_functions() still leaves it SECURITY DEFINER, pinned, not PUBLIC."""
    from edm_sched.migrations import _apply

    careless = sqlfiles.Migration(9000, "careless", """
        CREATE OR REPLACE FUNCTION edm.careless_write(p_key text) RETURNS void
        LANGUAGE sql VOLATILE AS $$ UPDATE edm.config SET value = value WHERE key = p_key $$;
        COMMENT ON FUNCTION edm.careless_write(text) IS 'Test function.';
        CREATE OR REPLACE FUNCTION edm.upsert_user(p_user_id text,
                                                   p_display_name text DEFAULT NULL,
                                                   p_quota_limit bigint DEFAULT NULL)
        RETURNS void LANGUAGE sql VOLATILE AS $$ SELECT NULL $$;
        """)
    with psycopg.connect(dsn) as c:
        _apply(c, careless)
    rows = conn.execute("""
        SELECT p.oid::regprocedure::text, p.prosecdef, p.proconfig,
               has_function_privilege('public', p.oid, 'EXECUTE')
        FROM pg_proc p WHERE p.pronamespace = 'edm'::regnamespace
          AND p.proname IN ('careless_write', 'upsert_user') ORDER BY 1""").fetchall()
    assert rows and all(r[1] and r[2] == ["search_path=pg_catalog, pg_temp"] and not r[3]
                        for r in rows), rows


def test_0029_raises_the_claim_batch_default_and_keeps_an_operators_value(
        empty_dsn: str) -> None:
    """0029 moves queue.central_batch_size from 50 to 200 (and its maximum to 1000);
    a value an operator set before it is kept."""
    migrate(empty_dsn, target=28)
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        c.execute("SELECT edm.config_set('queue.central_batch_size', '120', 'dba')")
    migrate(empty_dsn)
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        row = c.execute("SELECT value, default_value, max_value FROM edm.config"
                        " WHERE key = 'queue.central_batch_size'").fetchone()
        assert row == (120, 200, 1000)
        # a database that kept the old default moves to the new one
        c.execute("SELECT edm.config_set('queue.central_batch_size', '50', 'dba')")
        c.execute("DELETE FROM edm.schema_migrations WHERE version = 29")
    migrate(empty_dsn)
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        row = c.execute("SELECT value FROM edm.config"
                        " WHERE key = 'queue.central_batch_size'").fetchone()
        assert row == (200,)
