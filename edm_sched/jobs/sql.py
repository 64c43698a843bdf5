"""The named statements of recurring jobs, read from ``sql/jobs_queries.sql``."""

from __future__ import annotations

import functools
from typing import LiteralString

from edm_sched import sqlfiles


@functools.cache
def queries() -> dict[str, LiteralString]:
    """All named blocks of ``jobs_queries.sql``, loaded once."""
    return sqlfiles.parse_queries((sqlfiles.sql_dir() / "jobs_queries.sql").read_text("utf-8"))


def query(name: str) -> LiteralString:
    """The named block ``name`` of ``sql/jobs_queries.sql``."""
    return queries()[name]
