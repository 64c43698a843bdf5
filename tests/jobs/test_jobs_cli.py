"""``edm-sched jobs ...``: validate without a database, and the job lifecycle through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from edm_sched.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    last = out.strip().splitlines()[-1] if out.strip() else ""
    try:
        payload = json.loads(last)
    except json.JSONDecodeError:
        payload = None
    return code, payload, out + err


def test_validate_accepts_a_valid_expression(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, out = run(capsys, "jobs", "validate", "0 30 2 * * *", "--tz", "Europe/Paris",
                       "--count", "3")
    assert code == 0
    assert "valid: 0 30 2 * * *" in out and "+0" in out
    code, payload, _ = run(capsys, "jobs", "validate", "*/5 * * * *", "--json")
    assert code == 0 and payload["ok"] and len(payload["next_runs"]) == 5


@pytest.mark.parametrize(("expr", "reason"), [
    ("61 * * * *", "Bad minute"),
    ("* * *", "expected 5 fields"),
    ("0 0 30 2 *", "Bad day-of-month"),
])
def test_validate_rejects_with_the_code_and_reason(capsys: pytest.CaptureFixture[str],
                                                   expr: str, reason: str) -> None:
    code, _, out = run(capsys, "jobs", "validate", expr)
    assert code != 0
    assert "INVALID_CRON_EXPRESSION" in out and reason in out


def test_validate_from_a_real_process_needs_no_database() -> None:
    bad = subprocess.run([sys.executable, "-m", "edm_sched.cli", "jobs", "validate", "* * * 13 *"],
                         capture_output=True, text=True, timeout=60,
                         env={"PATH": "", "EDM_SCHED_DSN": "host=/nonexistent dbname=none"})
    assert bad.returncode == 1
    assert "INVALID_CRON_EXPRESSION" in bad.stderr and "Bad month" in bad.stderr
    good = subprocess.run([sys.executable, "-m", "edm_sched.cli", "jobs", "validate", "@daily"],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "", "EDM_SCHED_DSN": "host=/nonexistent dbname=none"})
    assert good.returncode == 0, good.stderr


def test_job_lifecycle(capsys: pytest.CaptureFixture[str], dsn: str) -> None:
    common = ["--dsn", dsn, "--json"]
    code, payload, out = run(capsys, "jobs", "create", *common, "--name", "nightly",
                             "--cron", "30 2 * * *", "--tz", "America/New_York",
                             "--function", "reports.daily", "--args", '{"k": 1}',
                             "--tenant-id", "acme", "--tag", "reports", "--max-retries", "2",
                             "--retry-on", "timeout,ValueError", "--misfire", "skip")
    assert code == 0, out
    job = payload["job"]
    job_id = str(job["job_id"])
    assert job["timezone"] == "America/New_York" and job["retry"]["retry_on"] == [
        "timeout", "ValueError"]
    assert job["next_run_at"] is not None

    code, payload, _ = run(capsys, "jobs", "list", *common, "--tenant", "acme")
    assert [j["name"] for j in payload["jobs"]] == ["nightly"]
    code, payload, _ = run(capsys, "jobs", "update", job_id, *common, "--priority", "9")
    assert payload["job"]["priority"] == 9
    code, payload, _ = run(capsys, "jobs", "trigger", job_id, *common)
    execution_id = str(payload["execution"]["execution_id"])
    code, _, out = run(capsys, "jobs", "trigger", job_id, "--dsn", dsn)
    assert code == 1 and "JOB_ALREADY_RUNNING" in out
    code, payload, _ = run(capsys, "jobs", "executions", *common, "--job", job_id)
    assert [e["trigger"] for e in payload["executions"]] == ["manual"]
    code, payload, _ = run(capsys, "jobs", "cancel", execution_id, *common)
    assert payload["execution"]["status"] == "cancelled"
    code, _, out = run(capsys, "jobs", "execution", execution_id, "--dsn", dsn)
    assert code == 0 and "cancelled" in out
    for action, status in (("pause", "paused"), ("resume", "active"), ("stop", "inactive")):
        code, payload, _ = run(capsys, "jobs", action, job_id, *common)
        assert payload["job"]["status"] == status
    code, payload, _ = run(capsys, "jobs", "stats", *common)
    assert payload["jobs_by_status"] == {"inactive": 1}
    assert payload["executions_by_status"] == {"cancelled": 1}
    code, _, out = run(capsys, "jobs", "show", job_id, "--dsn", dsn)
    assert code == 0 and "nightly" in out and "stopped" in out
    code, _, _ = run(capsys, "jobs", "delete", job_id, *common)
    assert code == 0
    code, payload, out = run(capsys, "jobs", "show", job_id, *common)
    assert code == 1 and payload["error"] == "JOB_NOT_FOUND"


def test_create_errors_are_reported_with_codes(capsys: pytest.CaptureFixture[str],
                                               dsn: str) -> None:
    code, payload, _ = run(capsys, "jobs", "create", "--dsn", dsn, "--json", "--name", "x",
                           "--cron", "* * * * *", "--shell", "rm -rf /tmp/x")
    assert code == 1 and payload["error"] == "INVALID_JOB_CONFIG"
    code, payload, _ = run(capsys, "jobs", "create", "--dsn", dsn, "--json", "--name", "x",
                           "--cron", "70 * * * *", "--function", "f")
    assert code == 1 and payload["error"] == "INVALID_CRON_EXPRESSION"
