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
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import conninfo
from pytest_postgresql import factories

from edm_sched.migrations import migrate

TEST_DSN_ENV = "EDM_SCHED_TEST_DSN"


@dataclass
class ServerInfo:
    """The attributes pytest-postgresql's ``depends_on`` reads from a base fixture."""

    host: str
    port: int
    user: str
    password: str | None
    options: str = ""
    maintenance_dbname: str = "postgres"
    template_dbname: str | None = None

    def dsn(self, dbname: str) -> str:
        return conninfo.make_conninfo(
            host=self.host, port=self.port, user=self.user, password=self.password or None,
            dbname=dbname,
        )


def _server_from_dsn(dsn: str) -> ServerInfo:
    params = conninfo.conninfo_to_dict(dsn)
    return ServerInfo(
        host=str(params.get("host") or "localhost"),
        port=int(params.get("port") or 5432),
        user=str(params.get("user") or os.environ.get("USER", "postgres")),
        password=str(params["password"]) if params.get("password") else None,
        maintenance_dbname=str(params.get("dbname") or "postgres"),
    )


@pytest.fixture(scope="session")
def edm_pg_server() -> Iterator[ServerInfo]:
    if os.environ.get(TEST_DSN_ENV):
        yield _server_from_dsn(os.environ[TEST_DSN_ENV])
        return
    from edm_sched.demo.embedded import EmbeddedPostgres

    data = Path(tempfile.mkdtemp(prefix="edm-sched-test-")) / "pgdata"
    with EmbeddedPostgres(data) as pg:
        yield _server_from_dsn(pg.dsn())


def _load_schema(host: str, port: int, user: str, dbname: str, password: str | None,
                 **_: Any) -> None:
    migrate(conninfo.make_conninfo(host=host, port=port, user=user, dbname=dbname,
                                   password=password or None))


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
