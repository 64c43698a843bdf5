"""The demo is the main job: it must run end to end and report a clean summary."""

from __future__ import annotations

import json
import subprocess
import sys


def test_demo_json_summary(dsn: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "edm_sched.cli", "demo", "--dsn", dsn, "--json", "--seconds", "90"],
        capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("sent", "interval_violations", "quota_violations", "duplicates",
                "per_user_sent", "first_send_wait_s"):
        assert key in summary
    assert summary["sent"] == summary["sent_recorded_in_db"] > 0
    assert (summary["interval_violations"], summary["quota_violations"],
            summary["duplicates"]) == (0, 0, 0)
    assert len(summary["per_user_sent"]) == 4
