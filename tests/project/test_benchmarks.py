"""The benchmark scripts that instrument installed SQL still find what they instrument.

``python -m benchmarks claimprofile`` copies the installed ``edm.claim_v2`` with
clocks around its parts, found by the text of their first statements: a change
of the claim that moves one of them must update the script, not break it
silently. ``python -m benchmarks floor`` (and ``cpu --floor``) replaces the claim
and the completion with FIFO-cost versions of the same signatures, which must
stay in step with what run_dispatcher() reads. ``cpu`` reads the dispatcher's
backends' CPU from /proc. Run as their own processes (tests never import
benchmarks/).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def run_benchmark(server: Any, *args: str) -> dict[str, Any]:
    """``python -m benchmarks ARGS --json --dsn <server>`` as its own process; its JSON line."""
    dsn = server.dsn(server.maintenance_dbname)
    proc = subprocess.run([sys.executable, "-m", "benchmarks", *args, "--json", "--dsn", dsn],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_claimprofile_instruments_the_installed_claim(edm_pg_server: Any) -> None:
    r = run_benchmark(edm_pg_server, "claimprofile", "--shape", "s3", "--scale", "0.01",
                      "--calls", "3", "--warmup", "1")
    assert r["claimed"] > 0 and r["call_ms"] > 0
    parts = r["parts_ms"]
    assert {"rotation head", "slots: batched fill and slot by slot", "batched writes"} <= set(parts)
    assert all(ms >= 0 for ms in parts.values())


def test_floor_installs_its_claim_and_the_dispatcher_runs_on_it(edm_pg_server: Any) -> None:
    """``python -m benchmarks floor`` replaces the claim and the completion on a copy of
    the world: both must keep the columns run_dispatcher() reads, or the floor is 0.
    (50,000 subtasks: fewer would drain within the warm-up at the floor's pace.)"""
    r = run_benchmark(edm_pg_server, "floor", "--scale", "0.05", "--seconds", "1",
                      "--processes", "1")
    assert r["product_cycles_per_s"] > 0 and r["floor_cycles_per_s"] > 0


def test_cpu_reads_the_dispatcher_and_its_backends(edm_pg_server: Any) -> None:
    """``python -m benchmarks cpu`` finds the dispatcher's backends by database and
    reads their CPU from /proc: each figure must come out, on the floor too."""
    r = run_benchmark(edm_pg_server, "cpu", "--scale", "0.05", "--seconds", "1",
                      "--warmup", "1", "--floor")
    assert r["sends"] > 0 and r["python_us_per_send"] > 0 and r["postgres_us_per_send"] > 0
    assert len(r["backends"]) >= 2  # the claim's and the completion's connections


def test_drain_measures_a_dispatcher_at_its_defaults(edm_pg_server: Any) -> None:
    """``python -m benchmarks drain`` runs the dispatcher at the product's defaults (its
    worker reads them when given no concurrency) and judges pauses on send_events."""
    r = run_benchmark(edm_pg_server, "drain", "--recipients", "3000", "--delays", "0",
                      "--seconds", "1", "--warmup", "0.5")
    [run] = r["runs"]
    assert run["concurrency"] == 10 and run["sends"] > 0 and r["max_gap_ms"] > 0
