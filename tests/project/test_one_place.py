"""Each rule written once (issue 18, point 3): settings' defaults live in edm.config only.

``edm.config`` holds every setting with its shipped default; Python reads the
value through ``edm_sched.db.setting`` and keeps no second default that could
drift from the database's (as ``queue.concurrent_workers`` once did, copied
into the dispatcher).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import psycopg

PACKAGE = Path(__file__).resolve().parents[2] / "edm_sched"


def _copies(source: str, keys: set[str]) -> list[int]:
    """Lines of ``x.get("<setting>", default)`` (or ``setdefault``) calls in ``source``."""
    return [node.lineno for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("get", "setdefault") and len(node.args) == 2
            and isinstance(node.args[0], ast.Constant) and node.args[0].value in keys]


def test_no_setting_has_a_default_in_python(conn: psycopg.Connection[Any]) -> None:
    keys = {k for (k,) in conn.execute("SELECT key FROM edm.config").fetchall()}
    assert "queue.concurrent_workers" in keys
    found = [f"{path.relative_to(PACKAGE.parent)}:{line}"
             for path in sorted(PACKAGE.rglob("*.py"))
             for line in _copies(path.read_text(), keys)]
    assert found == [], "read settings with edm_sched.db.setting(values, key)"


def test_the_scan_finds_a_copied_default() -> None:
    source = 'n = 1\nworkers = int(config.get("queue.concurrent_workers", 10))\n'
    assert _copies(source, {"queue.concurrent_workers"}) == [2]
    assert _copies('config.get("queue.concurrent_workers")', {"queue.concurrent_workers"}) == []
