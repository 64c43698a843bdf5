"""The test suite's own rules: layered folders, shared helpers only in
tests/support/, no benchmark code imported, nothing left in the temp dir, a
fast lane that README names and that keeps a test for every promise."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support.fast_lane import FAST_LANE_EXAMPLES

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


# Each promise of docs/index.md (I1-I11) keeps at least one test in the fast lane
# (`pytest -m "not slow"`); the slow lane adds the multi-process, chaos and large
# generated runs. Moving one of these to the slow lane needs another fast test here.
FAST_PROMISE_TESTS: dict[str, list[str]] = {
    "I1": ["tests/sql/test_limits.py::test_uncertain_outcome_is_recorded_and_counted",
           "tests/sql/test_limits.py::test_renewal_keeps_live_leases_only",
           "tests/sql/test_claim.py::test_completion_is_fenced_by_the_lease"],
    "I2": ["tests/sql/test_claim.py::test_interval_and_lease",
           "tests/sql/test_limits.py::test_rate_limit_with_burst_is_a_token_bucket",
           "tests/dispatcher/test_dispatcher.py::test_dispatcher_sends_everything_and_stops",
           "tests/dispatcher/test_lane_isolation.py::"
           "test_sends_whose_slots_passed_keep_the_interval_on_the_wire"],
    "I3": ["tests/sql/test_claim.py::test_daily_quota_holds_until_local_midnight",
           "tests/sql/test_expansion.py::test_quota_exceeded_by_a_list_writes_nothing"],
    "I4": ["tests/sql/test_task_completion.py::test_completing_the_last_subtask",
           "tests/api/test_progress_truth.py::test_failed_recipients_are_never_100_percent_sent"],
    "I5": ["tests/sql/test_claim.py::test_users_alternate_and_newcomer_is_served_next",
           "tests/sql/test_claim.py::test_tasks_of_a_user_rotate_with_priority"],
    "I6": ["tests/sql/test_claim.py::test_pause_resume_cancel",
           "tests/sql/test_expansion.py::test_cancel_during_expansion_refunds_the_unexpanded_part"],
    "I7": ["tests/sql/test_claim.py::test_expired_leases_return_and_are_counted"],
    "I8": ["tests/api/test_hostile_input.py::test_create_task",
           "tests/api/test_door_validation.py::test_a_template_that_does_not_compile_is_refused"],
    "I9": ["tests/sql/test_limits.py::test_due_retry_goes_before_fresh_work",
           "tests/sql/test_sites.py::test_a_suspension_applies_until_its_end_then_expires_by_itself"],
    "I10": ["tests/api/test_reputation.py::"
            "test_hard_bounces_pause_the_service_and_the_users_bulk_tasks"],
    "I11": ["tests/dispatcher/test_lane_isolation.py::"
            "test_a_slow_renderer_delays_only_its_own_service"],
}


def _is_slow(decorators: list[ast.expr]) -> bool:
    return any("mark.slow" in ast.unparse(d) for d in decorators)


def test_every_promise_has_a_test_in_the_fast_lane() -> None:
    assert sorted(FAST_PROMISE_TESTS, key=lambda p: int(p[1:])) == [f"I{i}" for i in range(1, 12)]
    wrong = []
    for promise, nodes in FAST_PROMISE_TESTS.items():
        for node in nodes:
            path, name = node.split("::")
            tree = ast.parse((ROOT / path).read_text("utf-8"))
            module_slow = any(isinstance(n, ast.Assign) and "mark.slow" in ast.unparse(n)
                              and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
                              for n in tree.body)
            fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
                       and n.name == name), None)
            if fn is None:
                wrong.append(f"{promise}: {node} does not exist")
            elif module_slow or _is_slow(fn.decorator_list):
                wrong.append(f"{promise}: {node} is in the slow lane")
    assert wrong == []


FAST_LANE = '.venv/bin/python -m pytest -m "not slow"'


def test_readme_names_the_fast_lane_and_ci_runs_everything() -> None:
    readme = (ROOT / "README.md").read_text("utf-8")
    start = readme.index("\n## Contributing\n")
    end = readme.find("\n## ", start + 1)
    contributing = readme[start:end if end != -1 else None]
    assert FAST_LANE in contributing, "README's Contributing section must name the fast lane"
    pyproject = (ROOT / "pyproject.toml").read_text("utf-8")
    assert re.search(r'^\s*"slow: ', pyproject, re.M), "the slow marker must be declared"
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text("utf-8").splitlines()
          if re.match(r"\s*\S*python -m pytest\b", line)]
    assert ci == [".venv/bin/python -m pytest"], "CI runs the whole suite, both lanes"


@pytest.mark.slow
def test_the_fast_lane_runs_fewer_examples_and_the_full_run_all() -> None:
    """Property tests run FAST_LANE_EXAMPLES examples in the fast lane and their own
    count otherwise (test_wire_format asks for 200)."""
    def passing(*args: str) -> int:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             "--hypothesis-show-statistics", *args,
             "tests/api/test_rendering.py::test_wire_format"],
            cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        found = re.findall(r"(\d+) passing", proc.stdout)
        assert len(found) == 1, proc.stdout
        return int(found[0])

    assert passing("-m", "not slow") == FAST_LANE_EXAMPLES
    assert passing() == 200
    assert passing("-m", "not slow", "--hypothesis-profile=default") == 200
