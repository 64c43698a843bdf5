"""``edm-sched demo``: the end-to-end demonstration."""

from __future__ import annotations

from typing import Any

from edm_sched.migrations import migrate


def run_demo(dsn: str, *, seconds: float, fresh: bool, json_out: bool) -> dict[str, Any]:
    status = migrate(dsn)
    if not json_out:
        print(f"edm schema at version {max(status.applied)} on {dsn.split('?')[0]}")
    return {"ok": True, "schema_version": max(status.applied)}
