"""Test harness: a real PostgreSQL, a migrated template database, one clone per test.

* With ``EDM_SCHED_TEST_DSN`` set, tests run against that server (its role
  must be allowed to create databases).
* Otherwise an embedded server is started from the ``pgserver`` wheel, which
  also works as root (it runs the server binaries as an unprivileged user). Its
  data lives on a memory-backed file system when the machine has one, and it
  neither fsyncs nor waits for commits to reach the disk: it is thrown away
  after the run.

pytest-postgresql's no-process fixtures build the template once, migrated by
``edm_sched.migrate``. Each test taking ``dsn`` (or ``conn``) gets its own clone
of it, made ahead and dropped behind the tests by a background thread, so a
test waits neither for a migration nor, mostly, for a ``CREATE DATABASE``.

The fast lane, ``pytest -m "not slow"``, also runs each property test on fewer
generated examples (tests/support/fast_lane.py); the full run keeps them all.
"""

from __future__ import annotations

import collections
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import conninfo, sql
from pytest_postgresql import factories

from edm_sched.migrations import migrate
from tests.support import fast_lane
from tests.support.server import ServerInfo, server_from_dsn

TEST_DSN_ENV = "EDM_SCHED_TEST_DSN"


# The run leaves nothing in the temp dir: pytest's tmp_path directories and
# pgserver's lock files (in $XDG_RUNTIME_DIR, which falls back to the temp dir)
# live in one directory removed at the end; the embedded server's data in
# another (see _server_scratch_parent), removed when the server stops.
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


# The fast lane (`pytest -m "not slow"`) also runs each property test on fewer
# generated examples (tests/support/fast_lane.py); the full run keeps them all.
# Last, so that `-m` has already deselected the slow tests.
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if fast_lane.is_fast_lane(config, items):
        fast_lane.use_fast_lane_examples(items)


@pytest.fixture(scope="session")
def edm_pg_server() -> Iterator[ServerInfo]:
    if os.environ.get(TEST_DSN_ENV):
        yield server_from_dsn(os.environ[TEST_DSN_ENV])
        return
    from edm_sched.demo.embedded import EmbeddedPostgres

    tmp = Path(tempfile.mkdtemp(prefix="edm-sched-test-", dir=_server_scratch_parent()))
    try:
        with EmbeddedPostgres(tmp / "pgdata") as pg:
            _throwaway(pg.dsn())
            yield server_from_dsn(pg.dsn())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the run leaves nothing in the temp dir


# Below this much free memory-backed space the server's data stays in the temp dir.
_RAM_DISK_MIN_FREE = 2 * 2**30


def _server_scratch_parent() -> str | None:
    """Where the embedded server's data lives: a memory-backed file system when there is one.

    Every test that takes ``dsn`` clones the template (about 380 files) and drops
    the clone afterwards. On a disk file system each clone costs 0.25-0.5 s even
    without fsync (creating and unlinking files goes through the journal and the
    disk's discard); on tmpfs it costs 15-30 ms (measured on 2026-12-06, two
    cores). The data is removed after the run anyway; a run takes a few hundred
    megabytes at most. ``EDM_SCHED_TEST_PGDATA_PARENT`` chooses the directory
    instead (an empty value: the temp dir).
    """
    if "EDM_SCHED_TEST_PGDATA_PARENT" in os.environ:
        return os.environ["EDM_SCHED_TEST_PGDATA_PARENT"] or None
    shm = Path("/dev/shm")
    try:
        if (shm.is_dir() and os.access(shm, os.W_OK | os.X_OK)
                and shutil.disk_usage(shm).free >= _RAM_DISK_MIN_FREE):
            return str(shm)
    except OSError:
        pass
    return None


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


class _Clones:
    """The per-test clones of the template, made ahead and dropped behind the tests.

    One thread, on its own admin connection, keeps ``ahead`` clones ready and
    drops the clones the tests gave back, so a test waits neither for its
    ``CREATE DATABASE`` nor for the ``DROP DATABASE`` of the test before it: the
    tests mostly wait on the database, on sockets and on timers, and the
    second core does the cloning meanwhile. Every test still gets a database
    cloned from the template that no one has connected to before.

    ``DROP DATABASE ... WITH (FORCE)`` ends the connections a test left open
    and keeps new ones out while it drops.
    """

    def __init__(self, server: ServerInfo, template: str, *, file_copy: bool,
                 ahead: int = 2) -> None:
        self._admin_dsn = server.dsn(server.maintenance_dbname)
        self._template = template
        # FILE_COPY copies the template's files as they are (PostgreSQL 15+); on the
        # embedded, unsynced server it is about twice as fast as the default WAL_LOG,
        # which writes every block of the template through the WAL. A server given
        # by EDM_SCHED_TEST_DSN keeps its default (FILE_COPY checkpoints twice).
        self._strategy = sql.SQL(" STRATEGY FILE_COPY" if file_copy else "")
        self._ahead = ahead
        self._count = 0
        self._ready: collections.deque[str] = collections.deque()
        self._to_drop: collections.deque[str] = collections.deque()
        self._closing = False
        self._error: BaseException | None = None
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="edm-test-clones", daemon=True)
        self._thread.start()

    def take(self) -> str:
        """The name of a fresh clone, now the test's own."""
        with self._cv:
            self._cv.wait_for(lambda: self._ready or self._error is not None)
            if self._error is not None:
                raise RuntimeError("cloning the template failed") from self._error
            name = self._ready.popleft()
            self._cv.notify_all()
            return name

    def give_back(self, name: str) -> None:
        """Drop the clone (soon, in the background)."""
        with self._cv:
            self._to_drop.append(name)
            self._cv.notify_all()

    def close(self) -> None:
        """Drop every clone given back or left ready, then stop."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join()
        with psycopg.connect(self._admin_dsn, autocommit=True) as admin:
            for name in (*self._to_drop, *self._ready):
                self._drop(admin, name)
        if self._error is not None:
            raise RuntimeError("cloning or dropping a test database failed") from self._error

    def _work(self) -> None:
        try:
            with psycopg.connect(self._admin_dsn, autocommit=True) as admin:
                while True:
                    with self._cv:
                        self._cv.wait_for(lambda: self._closing or bool(self._to_drop)
                                          or len(self._ready) < self._ahead)
                        if self._to_drop:
                            drop: str | None = self._to_drop.popleft()
                        elif self._closing:
                            return
                        else:
                            drop = None
                    if drop is not None:
                        self._drop(admin, drop)
                        continue
                    name = self._make(admin)
                    with self._cv:
                        self._ready.append(name)
                        self._cv.notify_all()
        except BaseException as exc:
            with self._cv:
                self._error = exc
                self._cv.notify_all()

    def _make(self, admin: psycopg.Connection[Any]) -> str:
        self._count += 1
        name = f"edm_t_{os.getpid()}_{self._count}"
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(self._template)) + self._strategy)
        return name

    @staticmethod
    def _drop(admin: psycopg.Connection[Any], name: str) -> None:
        # A backend whose client just closed takes a moment to exit, and DROP waits
        # for it in steps of 100 ms: wait for it here in steps of 2 ms instead (the
        # connections still open after 0.1 s are ended by FORCE).
        for _ in range(50):
            row = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s",
                                [name]).fetchone()
            if row is None or row[0] == 0:
                break
            time.sleep(0.002)
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def edm_clones(edm_noproc: Any, edm_pg_server: ServerInfo) -> Iterator[_Clones]:
    """Where ``dsn`` and ``module_dsn`` get their clones of the migrated template."""
    clones = _Clones(edm_pg_server, edm_noproc.template_dbname,
                     file_copy=not os.environ.get(TEST_DSN_ENV))
    yield clones
    clones.close()


@pytest.fixture
def dsn(edm_clones: _Clones, edm_pg_server: ServerInfo) -> Iterator[str]:
    """DSN of a freshly migrated database private to this test, dropped afterwards."""
    name = edm_clones.take()
    yield edm_pg_server.dsn(name)
    edm_clones.give_back(name)


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to the test database."""
    with psycopg.connect(dsn, autocommit=True) as c:
        yield c


@pytest.fixture(scope="module")
def module_dsn(edm_clones: _Clones, edm_pg_server: ServerInfo) -> Iterator[str]:
    """DSN of a migrated database shared by the tests of one module, dropped afterwards.

    One clone of the template instead of one per test: for tests that only read
    the catalog, or whose checks do not depend on what the module's other tests
    wrote (a refused call compared with the state just before it, say).
    """
    name = edm_clones.take()
    yield edm_pg_server.dsn(name)
    edm_clones.give_back(name)


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
