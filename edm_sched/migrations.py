"""The migration runner: ``edm_sched.migrate(dsn)`` and ``edm-sched migrate``.

* applied versions are recorded in ``edm.schema_migrations`` with a SHA-256 of
  the file, and an edited already-applied file is refused;
* concurrent runners are serialised by a session advisory lock;
* each migration runs in its own transaction, so a failure leaves the schema
  at the last good version;
* a version in the database that this code does not know is refused (the
  database was migrated by a newer edm-sched);
* after every migration, in its transaction, ``edm.harden_functions()`` runs
  (once a migration has created it): ``CREATE OR REPLACE FUNCTION`` silently
  drops ``SECURITY DEFINER`` and the pinned ``search_path``, so hardening is
  the runner's job, not something each migration must remember.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import psycopg

from edm_sched import db, errors
from edm_sched.sqlfiles import Migration, migrations, query, schema_sql

log = logging.getLogger("edm_sched.migrate")

# pg_advisory_lock key: the bytes "edm_migr" read as a signed 64-bit integer.
MIGRATION_LOCK_KEY = int.from_bytes(b"edm_migr", "big", signed=True)


@dataclass(frozen=True)
class MigrationStatus:
    applied: list[int]
    newly_applied: list[int]


def migrate(dsn: str, *, target: int | None = None,
            from_schema: bool = False) -> MigrationStatus:
    """Bring the ``edm`` schema of ``dsn`` up to date (or up to ``target``).

    With ``from_schema=True`` a database without schema ``edm`` is built in one
    transaction from ``sql/schema.sql`` (the current schema, which a test keeps
    identical to the result of every migration) and every migration is
    recorded as applied; a database that has the schema is migrated as usual.
    """
    with db.connect(dsn) as conn:
        with db.translate():
            conn.execute(query("migration_lock"), (MIGRATION_LOCK_KEY,))
        try:
            if from_schema and target is None:
                built = _build_from_schema(conn)
                if built is not None:
                    return built
            return _migrate_locked(conn, target)
        finally:
            conn.execute(query("migration_unlock"), (MIGRATION_LOCK_KEY,))


def _migrate_locked(conn: psycopg.Connection[Any], target: int | None) -> MigrationStatus:
    _check_schema_owner(conn)
    try:
        with conn.transaction():
            conn.execute(query("migration_bootstrap"))
    except psycopg.errors.InsufficientPrivilege as exc:
        raise errors.PermissionDenied(
            "cannot create schema edm or its migration table: "
            f"{exc.diag.message_primary}. Run migrate as the schema owner, or "
            "GRANT CREATE ON DATABASE to this role."
        ) from None
    applied = {
        int(v): str(c) for v, c in conn.execute(query("migration_applied")).fetchall()
    }
    known = {m.version: m for m in migrations()}
    unknown = sorted(set(applied) - set(known))
    if unknown:
        raise errors.MigrationError(
            f"the database has migration(s) {unknown} that this edm-sched does not know; "
            "it was migrated by a newer version. Upgrade edm-sched before running it here."
        )
    for version, checksum in applied.items():
        if known[version].checksum != checksum:
            m = known[version]
            raise errors.MigrationError(
                f"migration {m.version:04d}_{m.name}.sql was edited after it was applied "
                f"(checksum {checksum[:12]} in the database, {m.checksum[:12]} on disk). "
                "Never edit an applied migration: add a new one."
            )
    newly: list[int] = []
    for m in migrations():
        if m.version in applied or (target is not None and m.version > target):
            continue
        _apply(conn, m)
        newly.append(m.version)
    return MigrationStatus(applied=sorted([*applied, *newly]), newly_applied=newly)


def _apply(conn: psycopg.Connection[Any], m: Migration) -> None:
    log.info("applying migration %04d_%s", m.version, m.name)
    try:
        with conn.transaction():
            conn.execute(m.sql.encode("utf-8"))
            can_harden = conn.execute(query("migration_can_harden")).fetchone()
            if can_harden and can_harden[0]:
                conn.execute(query("migration_harden"))
            conn.execute(query("migration_record"), (m.version, m.name, m.checksum))
    except psycopg.errors.InsufficientPrivilege as exc:
        raise errors.PermissionDenied(
            f"migration {m.version:04d}_{m.name} needs a privilege this role lacks: "
            f"{exc.diag.message_primary}"
        ) from None
    except psycopg.Error as exc:
        raise errors.MigrationError(
            f"migration {m.version:04d}_{m.name} failed and was rolled back: "
            f"{exc.diag.message_primary or exc}"
        ) from exc


def _build_from_schema(conn: psycopg.Connection[Any]) -> MigrationStatus | None:
    exists = conn.execute(query("migration_schema_owner")).fetchone()
    if exists is not None:
        return None
    log.info("building schema edm from schema.sql")
    try:
        with conn.transaction():
            conn.execute(schema_sql().encode("utf-8"))
    except psycopg.errors.InsufficientPrivilege as exc:
        raise errors.PermissionDenied(
            f"cannot build schema edm: {exc.diag.message_primary}") from None
    except psycopg.Error as exc:
        raise errors.MigrationError(
            f"building from schema.sql failed and was rolled back: "
            f"{exc.diag.message_primary or exc}") from exc
    versions = [m.version for m in migrations()]
    return MigrationStatus(applied=versions, newly_applied=versions)


def _check_schema_owner(conn: psycopg.Connection[Any]) -> None:
    row = conn.execute(query("migration_schema_owner")).fetchone()
    if row is None:
        return
    owner, me, can_act_as_owner = row
    if not can_act_as_owner:
        raise errors.MigrationError(
            f"schema edm is owned by role {owner!r}, not by {me!r}; run migrate as "
            f"{owner!r} (or a member of it)."
        )


def current_version(dsn: str) -> int | None:
    """Highest applied migration, or None when the schema is not installed."""
    with db.connect(dsn) as conn, db.translate():
        exists = conn.execute(query("migration_table_exists")).fetchone()
        if not (exists and exists[0]):
            return None
        row = conn.execute(query("migration_current")).fetchone()
        return None if row is None or row[0] is None else int(row[0])
