"""Where the SQL lives and how Python reads it.

The SQL is the product: migrations in ``sql/migrations/NNNN_name.sql`` and the
few statements Python issues itself in ``sql/queries.sql``, as named blocks::

    -- claim_batch --
    -- One line saying what it does.
    SELECT ...

Python never assembles SQL from strings: it looks a block up by name and binds
parameters, so every query can be read and EXPLAINed as it runs.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import LiteralString, cast

_BLOCK = re.compile(r"(?:\n|^)-- ([a-z0-9_]+) --\n", re.MULTILINE)
_MIGRATION = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def sql_dir() -> Path:
    """The SQL directory: packaged copy in a wheel, ``sql/`` in a source checkout."""
    packaged = Path(__file__).parent / "_sql"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "sql"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


@functools.cache
def migrations() -> tuple[Migration, ...]:
    """All migration files, in version order."""
    found: list[Migration] = []
    for path in sorted((sql_dir() / "migrations").iterdir()):
        m = _MIGRATION.match(path.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), path.read_text("utf-8")))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions in {sql_dir()}")
    return tuple(found)


def schema_sql() -> str:
    """``sql/schema.sql``: the current schema, generated from the migrations."""
    return (sql_dir() / "schema.sql").read_text("utf-8")


def parse_queries(text: str) -> dict[str, LiteralString]:
    parts = _BLOCK.split(text)
    out: dict[str, LiteralString] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        # The SQL comes from our own files: as trusted as code.
        out[name] = cast(LiteralString, body.strip())
    return out


@functools.cache
def queries() -> dict[str, LiteralString]:
    return parse_queries((sql_dir() / "queries.sql").read_text("utf-8"))


def query(name: str) -> LiteralString:
    """The named block ``name`` of ``sql/queries.sql``."""
    return queries()[name]
