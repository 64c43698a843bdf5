"""The command line: migrate, error reporting and exit codes, the test harness switch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.server import ServerInfo


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edm_sched.cli", *args], capture_output=True,
                          text=True, timeout=120, check=False,
                          env={**os.environ, **(env or {})})


def test_migrate_with_dsn_and_env(empty_dsn: str) -> None:
    first = cli("migrate", "--dsn", empty_dsn, "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout.splitlines()[-1])["newly_applied"]
    again = cli("migrate", env={"EDM_SCHED_DSN": empty_dsn})
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_bad_dsn_and_unreachable_server_exit_codes() -> None:
    bad = cli("migrate", "--dsn", "host=x port=notaport = =")
    assert bad.returncode == 1 and "CONFIGURATION_ERROR" in bad.stderr
    down = cli("status", "--dsn", "postgresql://u:pw@127.0.0.1:1/db?connect_timeout=2", "--json")
    assert down.returncode == 3 and "DATABASE_UNAVAILABLE" in down.stderr
    assert json.loads(down.stdout.splitlines()[-1])["error"] == "DATABASE_UNAVAILABLE"
    assert "pw@" not in down.stderr


def test_usage_errors_exit_2() -> None:
    assert cli("no-such-command").returncode == 2


@pytest.mark.slow  # a pytest run of its own
def test_suite_runs_against_an_existing_server(edm_pg_server: ServerInfo) -> None:
    """EDM_SCHED_TEST_DSN points the harness at a server it did not start."""
    dsn = edm_pg_server.dsn(edm_pg_server.maintenance_dbname)
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/sql/test_schema.py::test_every_object_in_schema_has_a_comment"],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "EDM_SCHED_TEST_DSN": dsn})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 passed" in res.stdout
