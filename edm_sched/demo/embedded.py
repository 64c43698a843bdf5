"""An embedded PostgreSQL for users without a server.

Backed by the ``pgserver`` wheel, which ships PostgreSQL binaries and, when
started as root (where ``initdb`` refuses to run), runs them as an unprivileged
system user: pgserver creates the OS user ``pgserver`` (``useradd``) when it is
missing, gives it the data directory, and makes the directories above the data
directory and the PostgreSQL binaries readable and traversable by it. The
server listens on a Unix socket only and trusts local connections.

``running_dsn()`` and ``stop_server()`` look at and stop a server started by
an earlier process (``edm-sched embedded status|dsn|stop``).
"""

from __future__ import annotations

import atexit
import logging
import os
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger("edm_sched.demo.embedded")

DATA_ENV = "EDM_SCHED_EMBEDDED_DIR"
ROOT_OS_USER = "pgserver"
"""The OS user pgserver creates and runs PostgreSQL as when started by root."""


def default_data_dir() -> Path:
    """``$EDM_SCHED_EMBEDDED_DIR``, else a directory in the user's data dir."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    from edm_sched.demo import require

    platformdirs = require("platformdirs", "the embedded PostgreSQL")
    return Path(platformdirs.user_data_dir("edm-sched")) / "pgdata"


class EmbeddedPostgres:
    """A running embedded server. Use as a context manager to stop it on exit."""

    def __init__(self, data_dir: Path | None = None, *, stop_on_exit: bool = True) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
            from edm_sched.demo import require

            pgserver = require("pgserver", "the embedded PostgreSQL")

            self.data_dir = (data_dir or default_data_dir()).resolve()
            self.data_dir.parent.mkdir(parents=True, exist_ok=True)
            log.info("starting embedded PostgreSQL in %s", self.data_dir)
            self._server: Any = pgserver.get_server(
                self.data_dir, cleanup_mode="stop" if stop_on_exit else None
            )

    def dsn(self, database: str = "postgres") -> str:
        return str(self._server.get_uri(database))

    def create_database(self, name: str) -> str:
        """Create database ``name`` when missing and return its DSN."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if exists.fetchone() is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn(name)

    def stop(self) -> None:
        self._server.cleanup()
        # pgserver would run its cleanup again at exit, re-creating its lock file.
        atexit.unregister(getattr(self._server, "_cleanup", lambda: None))

    def __enter__(self) -> EmbeddedPostgres:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def running_dsn(data_dir: Path | None = None, database: str = "postgres") -> str | None:
    """DSN of the embedded server in ``data_dir`` when it runs, else None (never starts it)."""
    from edm_sched.demo import require

    utils = require("pgserver.utils", "the embedded PostgreSQL")
    info = utils.PostmasterInfo.read_from_pgdata((data_dir or default_data_dir()).resolve())
    if info is None or not info.is_running():
        return None
    return str(info.get_uri(database=database))


def stop_server(data_dir: Path | None = None) -> bool:
    """Stop the embedded server in ``data_dir``; False when it was not running."""
    from edm_sched.demo import require

    if running_dsn(data_dir) is None:
        return False
    pgserver = require("pgserver", "the embedded PostgreSQL")
    user = ROOT_OS_USER if hasattr(os, "geteuid") and os.geteuid() == 0 else None
    log.info("stopping embedded PostgreSQL in %s", data_dir or default_data_dir())
    pgserver.pg_ctl(["-w", "stop"], pgdata=(data_dir or default_data_dir()).resolve(),
                    user=user)
    return True
