"""S2 dedicated (docs/performance.md): each of 10,000 users has 1–3 services of its own.

About 20,000 services (1 + (user * 7919) % 3 per user), each granted to its
owner only; 1,000,000 pending subtasks over 20,000 tasks (two per user), as in
S1. Every service has exactly one user who may use it, so the claim's user
choice for a service is a lookup rather than a rotation.

Prints claims/s and cycles/s with 1, 2 and 4 processes (raw SQL and
run_dispatcher()), claim latency, the SKIP LOCKED ceiling and PgQueuer in the
same run, and the hot tables' dead tuples.
"""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks import common, suite
from edm_sched.testing import worlds as data

DESCRIPTION = "S2 dedicated services: throughput when every service belongs to one user"


def main(argv: Sequence[str]) -> int:
    args = common.parse_args("s2", argv, DESCRIPTION, suite.add_throughput_args)
    spec = data.design_spec("s2", args.scale)
    scale = {"users": spec.users, "services": "1-3 per user (about 2 x users)",
             "grants": "owner only", "tasks": spec.tasks, "subtasks": spec.subtasks,
             "interval_ms": spec.interval_ms}
    result = suite.run_throughput_scenario(
        "s2", "S2 dedicated services", args, spec, scale,
        "10,000 users with 1-3 services each, 1,000,000 subtasks over 20,000 tasks")
    return common.finish(args, result)
