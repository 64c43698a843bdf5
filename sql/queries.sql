-- Named statements issued by the Python package. Each block starts with
-- "-- name --" and a one-line description; edm_sched/sqlfiles.py loads them.
-- Rules that must hold across dispatchers live in the SQL functions of
-- sql/migrations/, never here.

-- migration_lock --
-- Serialise concurrent migration runners (session-level advisory lock).
SELECT pg_advisory_lock(%s)

-- migration_unlock --
-- Release the migration lock.
SELECT pg_advisory_unlock(%s)

-- migration_schema_owner --
-- Owner of schema edm, the current role, and whether the current role may act as the owner.
SELECT n.nspowner::regrole::text, current_user::text,
       pg_has_role(current_user, n.nspowner, 'USAGE')
FROM pg_namespace n WHERE n.nspname = 'edm'

-- migration_bootstrap --
-- Create the schema and the table of applied migrations when missing.
CREATE SCHEMA IF NOT EXISTS edm;
COMMENT ON SCHEMA edm IS 'edm-sched: fair, rate-limited, crash-safe scheduling of email sends. See docs/operations.md.';
CREATE TABLE IF NOT EXISTS edm.schema_migrations (
  version    integer PRIMARY KEY,
  name       text NOT NULL,
  checksum   text NOT NULL,
  applied_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE edm.schema_migrations IS 'Migrations applied to this database, with the SHA-256 of each file as applied.';
COMMENT ON COLUMN edm.schema_migrations.version IS 'Number of the migration file (sql/migrations/NNNN_name.sql).';
COMMENT ON COLUMN edm.schema_migrations.name IS 'Name part of the migration file.';
COMMENT ON COLUMN edm.schema_migrations.checksum IS 'SHA-256 of the file when applied; an edited file is refused.';
COMMENT ON COLUMN edm.schema_migrations.applied_at IS 'When the migration was applied.';

-- migration_applied --
-- Applied migrations and their checksums.
SELECT version, checksum FROM edm.schema_migrations ORDER BY version

-- migration_record --
-- Record one applied migration.
INSERT INTO edm.schema_migrations (version, name, checksum) VALUES (%s, %s, %s)

-- migration_current --
-- Highest applied migration, NULL when the schema is absent.
SELECT CASE WHEN to_regclass('edm.schema_migrations') IS NOT NULL
            THEN (xpath('/row/v/text()',
                  query_to_xml('SELECT max(version) AS v FROM edm.schema_migrations', false, true, '')))[1]::text::int
       END
