"""The PostgreSQL server the tests run against, as pytest-postgresql's fixtures see it."""

from __future__ import annotations

import os
from dataclasses import dataclass

from psycopg import conninfo


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


def server_from_dsn(dsn: str) -> ServerInfo:
    params = conninfo.conninfo_to_dict(dsn)
    return ServerInfo(
        host=str(params.get("host") or "localhost"),
        port=int(params.get("port") or 5432),
        user=str(params.get("user") or os.environ.get("USER", "postgres")),
        password=str(params["password"]) if params.get("password") else None,
        maintenance_dbname=str(params.get("dbname") or "postgres"),
    )
