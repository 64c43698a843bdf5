"""The benchmark scripts that instrument installed SQL still find what they instrument.

``python -m benchmarks claimprofile`` copies the installed ``edm.claim_v2`` with
clocks around its parts, found by the text of their first statements: a change
of the claim that moves one of them must update the script, not break it
silently. Run as its own process (tests never import benchmarks/).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def test_claimprofile_instruments_the_installed_claim(edm_pg_server: Any) -> None:
    dsn = edm_pg_server.dsn(edm_pg_server.maintenance_dbname)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "claimprofile", "--shape", "s3", "--scale", "0.01",
         "--calls", "3", "--warmup", "1", "--json", "--dsn", dsn],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["claimed"] > 0 and r["call_ms"] > 0
    parts = r["parts_ms"]
    assert {"rotation head", "slots: batched fill and slot by slot", "batched writes"} <= set(parts)
    assert all(ms >= 0 for ms in parts.values())
