"""S5 chaos, small: the benchmark of benchmarks/chaos.py at test size.

Four dispatcher processes send 2,000 subtasks through an SMTP sink process;
three of them are killed with SIGKILL (and replaced); PostgreSQL is restarted
in immediate mode when half of the work is done. The run uses its own embedded
PostgreSQL in a temporary directory (the session's test server is shared by
every test and is never restarted). With ``EDM_SCHED_TEST_DSN`` set, the run
uses that server instead, in a database of its own, without the restart.

Every figure comes from the sink's log and the database (see the benchmark's
module doc): nothing lost, every duplicate delivery matched by a recorded lease
expiry, no interval or quota violation, counters equal to subtask counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

TEST_DSN_ENV = "EDM_SCHED_TEST_DSN"  # as in tests/conftest.py


def test_chaos_short() -> None:
    argv = ["--json", "--subtasks", "2000", "--dispatchers", "4", "--kills", "3",
            "--kill-every", "2", "--lease", "5", "--timeout", "150"]
    external = os.environ.get(TEST_DSN_ENV)
    if external:
        argv += ["--dsn", external, "--database", f"edm_chaos_{os.getpid()}"]
    # Run as the benchmark runs (a process of its own), not imported: tests
    # never import benchmarks/.
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "chaos", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)
    code, out = proc.returncode, proc.stdout
    print(out, proc.stderr[-4000:])  # the benchmark's tables, shown when the test fails
    result = json.loads(out.strip().splitlines()[-1])
    assert not result["timed_out"]
    assert result["kills"] == 3
    assert result["db_restarts"] == (0 if external else 1)
    assert result["subtasks"] == 2000
    assert result["sent"] + result["documented_failures"] == 2000
    for key in ("lost", "unrecorded_duplicates", "interval_violations", "quota_violations",
                "counter_mismatches", "unknown_deliveries"):
        assert result[key] == 0, (key, result[key])
    # The small quotas were reached, so I3 was exercised, not just vacuously true.
    assert result["capped_services_exhausted"] >= 1, result["per_service"]
    assert code == 0
