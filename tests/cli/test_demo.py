"""The demo is the main job: it must run end to end and report a clean summary;
the embedded server it uses is managed from the CLI and stops when asked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def cli(*args: str, env: dict[str, str] | None = None,
        timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edm_sched.cli", *args], capture_output=True,
                          text=True, timeout=timeout, check=False,
                          env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_demo_json_summary(dsn: str) -> None:
    proc = cli("demo", "--dsn", dsn, "--json", "--seconds", "90")
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("sent", "interval_violations", "quota_violations", "duplicates",
                "per_user_sent", "first_send_wait_s", "dsn"):
        assert key in summary
    assert summary["sent"] == summary["sent_recorded_in_db"] > 0
    assert (summary["interval_violations"], summary["quota_violations"],
            summary["duplicates"]) == (0, 0, 0)
    assert len(summary["per_user_sent"]) == 4


@pytest.mark.slow
def test_demo_in_a_pipe_then_status(dsn: str) -> None:
    """Piped, the demo writes no escape sequences; it names the command that shows it again."""
    proc = cli("demo", "--dsn", dsn, "--seconds", "90")
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout
    assert "summary" in proc.stdout and "edm-sched status --dsn" in proc.stdout
    status = cli("status", "--dsn", dsn, "--json")
    assert status.returncode == 0, status.stderr
    names = {t["name"] for t in json.loads(status.stdout.splitlines()[-1])["tasks"]}
    assert {"spring-sale", "newsletter"} <= names


def test_top_in_a_pipe_writes_no_escape_sequences(dsn: str) -> None:
    proc = cli("top", "--dsn", dsn, "--iterations", "2", "--interval", "0.1")
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout
    assert proc.stdout.count("edm-sched top") == 2


def test_a_database_without_the_schema_says_to_migrate(empty_dsn: str) -> None:
    proc = cli("status", "--dsn", empty_dsn)
    assert proc.returncode == 1
    assert "MIGRATION_ERROR" in proc.stderr and "edm-sched migrate --dsn" in proc.stderr
    jobs = cli("jobs", "list", "--dsn", empty_dsn)
    assert jobs.returncode == 1 and "edm-sched migrate" in jobs.stderr


@pytest.mark.slow
def test_embedded_server_start_status_dsn_stop(tmp_path: Path) -> None:
    env = {"EDM_SCHED_EMBEDDED_DIR": str(tmp_path / "pgdata"), "EDM_SCHED_DSN": ""}
    assert cli("embedded", "status", env=env).returncode == 3
    assert cli("embedded", "dsn", env=env).returncode == 3
    try:
        start = cli("embedded", "start", "--json", env=env)
        assert start.returncode == 0, start.stderr
        state = json.loads(start.stdout.splitlines()[-1])
        assert state["running"] and state["dsn"]
        dsn = cli("embedded", "dsn", env=env)
        assert dsn.returncode == 0 and dsn.stdout.strip() == state["dsn"]
        # Commands without a DSN use it and leave it running.
        assert cli("migrate", env=env).returncode == 0
        status = cli("status", "--json", env=env)
        assert status.returncode == 0, status.stderr
        assert cli("embedded", "status", env=env).returncode == 0
    finally:
        stop = cli("embedded", "stop", "--json", env=env)
    assert stop.returncode == 0 and json.loads(stop.stdout.splitlines()[-1])["stopped"]
    assert cli("embedded", "status", env=env).returncode == 3
    # A command that has to start the server stops it again.
    again = cli("status", env=env)
    assert again.returncode == 0, again.stderr
    assert cli("embedded", "status", env=env).returncode == 3
