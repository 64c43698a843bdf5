"""Test harness: a real PostgreSQL, a migrated template database, one clone per test.

* With ``EDM_SCHED_TEST_DSN`` set, tests run against that server (its role
  must be allowed to create databases).
* Otherwise an embedded server is started from the ``pgserver`` wheel, which
  also works as root (it runs the server binaries as an unprivileged user).

pytest-postgresql's no-process fixtures build ``edm_test_tmpl`` once, migrated
by ``edm_sched.migrate``, and clone it for every test, so a test costs a
``CREATE DATABASE ... TEMPLATE`` (tens of milliseconds) rather than a migration.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import conninfo, sql
from pytest_postgresql import factories

from edm_sched.migrations import migrate
from tests.support.server import ServerInfo, server_from_dsn

TEST_DSN_ENV = "EDM_SCHED_TEST_DSN"


# The run leaves nothing in the temp dir: pytest's tmp_path directories, the
# embedded server's data and pgserver's lock files (in $XDG_RUNTIME_DIR, which
# falls back to the temp dir) all live in one directory removed at the end.
def pytest_configure(config: pytest.Config) -> None:
    if getattr(config, "workerinput", None) is not None:
        return
    scratch = Path(tempfile.mkdtemp(prefix="edm-sched-test-run-"))
    config.stash[_SCRATCH] = scratch
    if not config.option.basetemp:
        config.option.basetemp = str(scratch / "pytest")
    os.environ.setdefault("XDG_RUNTIME_DIR", str(scratch / "runtime"))
    (scratch / "runtime").mkdir(mode=0o700, exist_ok=True)


def pytest_unconfigure(config: pytest.Config) -> None:
    scratch = config.stash.get(_SCRATCH, None)
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)


_SCRATCH = pytest.StashKey[Path]()


@pytest.fixture(scope="session")
def edm_pg_server() -> Iterator[ServerInfo]:
    if os.environ.get(TEST_DSN_ENV):
        yield server_from_dsn(os.environ[TEST_DSN_ENV])
        return
    from edm_sched.demo.embedded import EmbeddedPostgres

    tmp = Path(tempfile.mkdtemp(prefix="edm-sched-test-"))
    try:
        with EmbeddedPostgres(tmp / "pgdata") as pg:
            _throwaway(pg.dsn())
            yield server_from_dsn(pg.dsn())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the run leaves nothing in the temp dir


def _throwaway(dsn: str) -> None:
    """This server's data is removed after the run: no need to make it durable.

    Without fsync and synchronous commits every test statement, and the
    ``CREATE DATABASE ... TEMPLATE`` / ``DROP DATABASE`` around each test, stop
    waiting for the disk (a large part of the fast lane's time on a busy
    machine). A crash of a server process loses nothing (the data is in the
    OS's cache); only a crash of the machine could, and then the run is lost
    anyway. A server given by EDM_SCHED_TEST_DSN is left as it is.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        for setting in ("fsync", "synchronous_commit", "full_page_writes"):
            conn.execute(sql.SQL("ALTER SYSTEM SET {} = off").format(sql.Identifier(setting)))
        conn.execute("SELECT pg_reload_conf()")


def _load_schema(host: str, port: int, user: str, dbname: str, password: str | None,
                 **_: Any) -> None:
    dsn = conninfo.make_conninfo(host=host, port=port, user=user, dbname=dbname,
                                 password=password or None)
    migrate(dsn)
    # The migrations replace functions many times over: half of the template is
    # dead rows of pg_proc. Every test clones the template, so compact it once
    # (about a fifth less time per clone, measured on 2026-12-06).
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM FULL")


# One name per pytest process: two suites sharing a server never touch each
# other's template or test databases.
edm_noproc = factories.postgresql_noproc(
    depends_on="edm_pg_server", dbname=f"edm_test_{os.getpid()}", load=[_load_schema]
)
edm_db = factories.postgresql("edm_noproc")


@pytest.fixture
def dsn(edm_db: psycopg.Connection[Any], edm_pg_server: ServerInfo) -> str:
    """DSN of a freshly migrated database private to this test."""
    return edm_pg_server.dsn(edm_db.info.dbname)


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to the test database."""
    with psycopg.connect(dsn, autocommit=True) as c:
        yield c


@pytest.fixture(scope="module")
def module_dsn(edm_noproc: Any, edm_pg_server: ServerInfo) -> Iterator[str]:
    """DSN of a migrated database shared by the tests of one module, dropped afterwards.

    One clone of the template instead of one per test: for tests that only read
    the catalog, or whose checks do not depend on what the module's other tests
    wrote (a refused call compared with the state just before it, say).
    """
    name = f"edm_mod_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = edm_pg_server.dsn(edm_pg_server.maintenance_dbname)
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(edm_noproc.template_dbname)))
    yield edm_pg_server.dsn(name)
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def empty_dsn(edm_pg_server: ServerInfo) -> Iterator[str]:
    """DSN of an empty database (no schema), dropped afterwards."""
    from psycopg import sql

    name = f"edm_empty_{os.getpid()}"
    admin = edm_pg_server.dsn(edm_pg_server.maintenance_dbname)
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield edm_pg_server.dsn(name)
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def roles(conn: psycopg.Connection[Any], dsn: str) -> Iterator[dict[str, str]]:
    """Login roles that are members of the three edm group roles; DSNs by job."""
    conn.execute("SELECT edm.install_roles()")
    tag = uuid.uuid4().hex[:8]
    logins = {"dispatcher": f"t_disp_{tag}", "app": f"t_app_{tag}", "monitor": f"t_mon_{tag}"}
    for job, login in logins.items():
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
            sql.Identifier(login), sql.Identifier(f"edm_{job}")))
    yield {job: conninfo.make_conninfo(dsn, user=login) for job, login in logins.items()}
    for login in logins.values():
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(login)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(login)))
