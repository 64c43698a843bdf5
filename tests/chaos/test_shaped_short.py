"""Traffic shaping on the wire, short: the shaped benchmark at test size.

Runs ``python -m benchmarks shaped`` as its own process (tests never import
benchmarks/) without its claim-cost part: two real dispatcher processes, a real
SMTP server throttling one site mid-run, every shaping layer set, a
transactional stream, and a control run without the throttling.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_shaping_holds_every_layer_and_isolates_a_throttled_site(edm_pg_server: Any) -> None:
    dsn = edm_pg_server.dsn(edm_pg_server.maintenance_dbname)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "shaped", "--json", "--no-cost", "--seconds", "25",
         "--throttle-at", "8", "--per-user", "2000", "--dsn", dsn],
        cwd=ROOT, capture_output=True, text=True, timeout=400, check=False)
    print(proc.stdout[-5000:])
    assert proc.stdout.strip(), proc.stderr[-4000:]
    r: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    throttled, control = r["runs"]["throttled"], r["runs"]["control"]
    # the throttling replies suspended the pair on every service that met them
    assert throttled["throttled_site_refused"] > 0 and throttled["suspended_pairs"] >= 1
    assert control["throttled_site_refused"] == 0
    # every layer recomputed from the server's log
    assert r["limit_violations"] == 0, [c for c in throttled["checks"] if c["violations"]]
    # no head-of-line blocking: the other sites kept their pace
    assert r["unthrottled_sites_throughput_ratio"] >= 0.9
    # the transactional stream went through the full backlog
    assert throttled["transactional_sent"] >= throttled["transactional_submitted"] - 8
    assert r["transactional_p99_s"] <= 2.0
