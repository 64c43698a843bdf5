"""An embedded PostgreSQL for users without a server.

Backed by the ``pgserver`` wheel, which ships PostgreSQL binaries and, when
started as root (where ``initdb`` refuses to run), runs them as an unprivileged
system user. The server listens on a Unix socket only.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger("edm_sched.demo.embedded")

DATA_ENV = "EDM_SCHED_EMBEDDED_DIR"


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

    def __enter__(self) -> EmbeddedPostgres:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
