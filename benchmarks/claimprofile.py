"""Claim profile: where the time of one ``edm.claim_v2`` call goes, part by part.

Builds an S1, S2 or S3 world (docs/performance.md, ``--scale`` times as big), then
installs a copy of the *installed* ``edm.claim_v2`` (the dispatcher's claim) as
``edm_prof.claim_v2`` with ``clock_timestamp()`` taken around each part of it
(the shaping probes, the rotation head, each service's shaping reads, pool
probe and transactional probe, its slots -- the batched fill and the
slot-by-slot path -- the shaping write-back and the batched writes) and the
sums raised as a NOTICE. The copy keeps the original's settings
(``plan_cache_mode``, ``search_path``), so the plans are the ones the real
function runs. Each call runs in a transaction that is rolled back, so every
call sees the same world; the first ``--warmup`` calls are not counted
(PL/pgSQL plans each statement on its first execution).

Prints, per part, the median milliseconds per call and its share of the call
as seen by the client; "other" is the rest inside the function (ranking the
ready services, array bookkeeping), "outside" the lease statement, the return
of the rows and the round trip. This is how docs/performance.md's findings 9
and 10 were found (on ``edm.claim``, before 0008 made it a wrapper of
``edm.claim_v2``); when ``edm.claim_v2`` changes, update ``PARTS`` (the anchors
are the statements' first lines, and a missing one is reported by name;
tests/project/test_benchmarks.py runs this at a tiny scale).
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections.abc import Sequence
from typing import Any

import psycopg

from benchmarks import common
from edm_sched.testing import worlds as data

DESCRIPTION = "Where the time of one edm.claim_v2 call goes, per part"

# (part, the text the part starts with, the text that follows the part): a
# clock is read before the first and the elapsed time added before the second.
PARTS: tuple[tuple[str, str, str], ...] = (
    ("shaping probes",
     "  SELECT EXISTS (SELECT 1 FROM edm.shaping_limits l WHERE l.scope = 'global')",
     "  -- The head of the rotation"),
    ("rotation head", "  v_cands := ARRAY(", "  -- Ready services"),
    ("service's shaping reads", "    -- Shaping of this service:", "    v_tx_run := v_svc.tx_run;"),
    ("pool probe", "    v_pool := NULL;", "    -- Batched fill (0014)"),
    ("transactional probe", "    v_tx_here := false;", "    -- (the fill runs at"),
    ("slots: batched fill and slot by slot", "    <<slots>>",
     "    IF v_tx AND v_tx_run IS DISTINCT FROM v_svc.tx_run THEN"),
    ("shaping write-back", "  -- The shaping limits' state after this call's sends",
     "  -- Services an extra limit blocks"),
    ("batched writes", "  SELECT array_agg(nextval('edm.serve_seq')", "  -- Rows in claim order"),
)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", choices=("s1", "s2", "s3"), default="s1")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply users, tasks and subtasks by this (1 = the design's size)")
    p.add_argument("--batch", type=int, default=50, help="claim batch size")
    p.add_argument("--per-service", type=int, default=16,
                   help="most slots a service gets per call (the dispatcher's default)")
    p.add_argument("--calls", type=int, default=20, help="measured calls")
    p.add_argument("--warmup", type=int, default=6, help="calls run first and not counted")


def instrumented_claim(conn: psycopg.Connection[Any]) -> str:
    """The installed edm.claim_v2's definition, renamed to edm_prof.claim_v2 and
    instrumented."""
    row = conn.execute("SELECT pg_get_functiondef('edm.claim_v2'::regproc)").fetchone()
    assert row is not None
    fn = re.sub(r"FUNCTION edm\.claim_v2\(", "FUNCTION edm_prof.claim_v2(", row[0], count=1)
    names = [f"a{i}" for i in range(len(PARTS))]
    declare = "".join(f"  {n} interval := '0';\n" for n in names)
    fn = fn.replace("DECLARE\n", "DECLARE\n" + declare
                    + "  t0 timestamptz;\n  t_all timestamptz := clock_timestamp();\n", 1)
    for name, (part, start, end) in zip(names, PARTS, strict=True):
        i = fn.find(start)
        j = fn.find(end, i + len(start)) if i >= 0 else -1
        if i < 0 or j < 0:
            raise LookupError(f"part {part!r} not found in edm.claim_v2: the function "
                              "changed, update PARTS in benchmarks/claimprofile.py")
        fn = (fn[:i] + "  t0 := clock_timestamp();\n" + fn[i:j]
              + f"  {name} := {name} + (clock_timestamp() - t0);\n" + fn[j:])
    sums = ", ".join(f"extract(epoch FROM {n}) * 1000" for n in names)
    report = ("  RAISE NOTICE 'edm_prof %', ARRAY[extract(epoch FROM clock_timestamp() - t_all)"
              f" * 1000, {sums}];\n")
    anchor = "  -- Rows in claim order"
    if anchor not in fn:
        raise LookupError("the end of edm.claim_v2 was not found: update "
                          "benchmarks/claimprofile.py")
    return fn.replace(anchor, report + anchor, 1)


def profile(dsn: str, batch: int, calls: int, warmup: int,
            per_service: int = 16) -> dict[str, Any]:
    """Median ms per call of each part, over ``calls`` rolled-back calls."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS edm_prof")
        conn.execute(instrumented_claim(conn))
        notices: list[list[float]] = []
        conn.add_notice_handler(lambda d: notices.append(
            [float(x) for x in (d.message_primary or "").split(" ", 1)[1].strip("{}").split(",")])
            if (d.message_primary or "").startswith("edm_prof ") else None)
        client: list[float] = []
        claimed: list[int] = []
        for n in range(warmup + calls):
            t0 = time.perf_counter()
            with conn.transaction():
                rows = conn.execute(
                    "SELECT * FROM edm_prof.claim_v2('claimprofile', %s, 60, NULL, %s, 0)",
                    (batch, per_service)).fetchall()
                elapsed = (time.perf_counter() - t0) * 1000
                raise psycopg.Rollback()
            if n >= warmup:
                client.append(elapsed)
                claimed.append(len(rows))
        conn.execute("DROP SCHEMA edm_prof CASCADE")
    measured = notices[-calls:]
    call_ms = statistics.median(client)
    parts = {part: statistics.median(m[k + 1] for m in measured)
             for k, (part, _, _) in enumerate(PARTS)}
    inside = statistics.median(m[0] for m in measured)
    parts["other (service loop, arrays)"] = max(0.0, inside - sum(parts.values()))
    parts["outside (lease, rows, round trip)"] = max(0.0, call_ms - inside)
    return {"call_ms": call_ms, "claimed": statistics.median(claimed), "parts_ms": parts}


def main(argv: Sequence[str]) -> int:
    args = common.parse_args("claimprofile", argv, DESCRIPTION, add_args)
    spec = data.design_spec(args.shape, args.scale)
    result: dict[str, Any] = {"scenario": "claimprofile", "shape": args.shape}
    with common.bench_server(args.dsn, keep=args.keep) as server:
        dsn = server.fresh_database(f"edm_bench_prof_{args.shape}")
        result.update(common.print_header(
            f"Claim profile, {args.shape.upper()}", server,
            {**spec.describe(), "batch": args.batch, "calls": args.calls,
             "per service": args.per_service, "warm-up calls": args.warmup,
             "scaled_down": args.scale < 1}))
        common.say(f"building {args.shape}")
        data.build_world(dsn, spec)
        prof = profile(dsn, args.batch, args.calls, args.warmup, args.per_service)
    result.update(prof)
    call = prof["call_ms"]
    common.print_table(
        f"edm.claim_v2(batch {args.batch}, {args.per_service} per service): median of "
        f"{args.calls} rolled-back calls, "
        f"{prof['claimed']:.0f} subtasks each; call {call:.2f} ms at the client",
        ["part", "ms per call", "% of call"],
        [[part, ms, 100 * ms / call if call else 0.0] for part, ms in prof["parts_ms"].items()])
    return common.finish(args, result)
