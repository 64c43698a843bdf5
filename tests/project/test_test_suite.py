"""The test suite's own rules: layered folders, shared helpers only in
tests/support/, no benchmark code imported, nothing left in the temp dir."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def test_no_test_module_imports_another_or_the_benchmarks() -> None:
    wrong = []
    for path in sorted(TESTS.rglob("*.py")):
        for name in _imports(path):
            top = name.split(".")[0]
            if top == "benchmarks" or (top == "tests" and not name.startswith("tests.support.")):
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert wrong == []


def test_tests_live_in_layer_folders() -> None:
    loose = [p.name for p in TESTS.glob("test_*.py")]
    assert loose == [], "put test modules in a folder of tests/ (sql, api, dispatcher, ...)"


@pytest.mark.slow
def test_a_run_leaves_nothing_in_the_temp_dir() -> None:
    """A small run on its own embedded server, with TMPDIR pointing at an empty directory
    (a short path: the server's Unix socket lives below it)."""
    tmpdir = Path(tempfile.mkdtemp(prefix="edm-t-"))
    try:
        _run_in(tmpdir)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _run_in(tmpdir: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("EDM_SCHED_TEST_DSN", "XDG_RUNTIME_DIR", "PYTEST_ADDOPTS")}
    env["TMPDIR"] = str(tmpdir)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/sql/test_schema.py::test_migrating_twice_changes_nothing",
         "tests/cli/test_demo.py::test_top_in_a_pipe_writes_no_escape_sequences"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in tmpdir.iterdir()) == []
