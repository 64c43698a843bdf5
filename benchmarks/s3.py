"""S3 mixed (docs/performance.md): pools shared by groups of users, plus dedicated services.

10,000 users in groups of 100; each group shares a pool of 10 services
(1,000 pool services); every 10th user also has a dedicated service of its
own, granted at priority 10, so that user sends through it first and
overflows into its group's pool only while the dedicated one is not ready
(the claim's grant-priority tiers). 1,000,000 pending subtasks over 20,000
tasks (two per user).

Prints claims/s and cycles/s with 1, 2 and 4 processes (raw SQL and
run_dispatcher()), claim latency, the SKIP LOCKED ceiling and PgQueuer in the
same run, and the hot tables' dead tuples.
"""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks import common, suite
from edm_sched.testing import worlds as data

DESCRIPTION = "S3 mixed: group pools plus dedicated higher-priority services"


def main(argv: Sequence[str]) -> int:
    args = common.parse_args("s3", argv, DESCRIPTION, suite.add_throughput_args)
    spec = data.design_spec("s3", args.scale)
    users = spec.users
    scale = {"users": spec.users, "groups": -(-users // spec.group_size),
             "pool services": -(-users // spec.group_size) * spec.pool_per_group,
             "dedicated services": users // spec.dedicated_every,
             "tasks": spec.tasks, "subtasks": spec.subtasks, "interval_ms": spec.interval_ms}
    result = suite.run_throughput_scenario(
        "s3", "S3 mixed pools and dedicated services", args, spec, scale,
        "10,000 users, 100-user groups with 10-service pools, every 10th user with a "
        "dedicated service; 1,000,000 subtasks over 20,000 tasks")
    return common.finish(args, result)
