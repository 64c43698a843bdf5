"""Claim profile: where the time of one ``edm.claim`` call goes, statement group by group.

Builds an S1, S2 or S3 world (docs/performance.md, ``--scale`` times as big), then
installs a copy of the *installed* ``edm.claim`` as ``edm_prof.claim`` with
``clock_timestamp()`` taken around each part of it (the rotation head, the
pool-size probe, each user lookup, the task and subtask lookups, the batched
writes) and the sums raised as a NOTICE. The copy keeps the original's
settings (``plan_cache_mode``, ``search_path``), so the plans are the ones the
real function runs. Each call runs in a transaction that is rolled back, so
every call sees the same world; the first ``--warmup`` calls are not counted
(PL/pgSQL plans each statement on its first execution).

Prints, per part, the median milliseconds per call and its share of the call
as seen by the client; "other" is the rest inside the function (the loop over
ready services, array bookkeeping), "outside" the lease statement, the return
of the rows and the round trip. This is how docs/performance.md's findings 9
and 10 were found; when ``edm.claim`` changes, update ``PARTS`` (the anchors are
the statements' first lines, and a missing one is reported by name).
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

DESCRIPTION = "Where the time of one edm.claim call goes, per statement group"

# (part, the text the part starts with, the text that follows the part): a
# clock is read before the first and the elapsed time added before the second.
PARTS: tuple[tuple[str, str, str], ...] = (
    ("rotation head", "  v_cands := ARRAY(", "  FOR v_svc IN"),
    ("pool probe and read", "    v_pool := NULL;", "    LOOP\n      v_user := NULL;"),
    ("first fitting user", "      SELECT c.user_id INTO v_user",
     "      IF v_user IS NOT NULL AND v_pool IS NOT NULL THEN"),
    ("lock a pool's user", "        PERFORM 1 FROM edm.users u", "        IF NOT FOUND THEN"),
    ("rotation walk", "        SELECT u.user_id INTO v_user\n        FROM edm.users u\n"
     "        WHERE u.claimable_tasks > 0", "      END IF;\n      -- ...then"),
    ("wrap-around lookup", "      IF v_user IS NULL AND cardinality(r_users) > 0 THEN",
     "      EXIT WHEN v_user IS NULL;"),
    ("task lookup", "        v_task := NULL;", "        EXIT WHEN v_task IS NULL;"),
    ("subtask lookup", "        SELECT st.subtask_id INTO v_sub",
     "        EXIT WHEN v_sub IS NOT NULL;\n        v_tried"),
    ("batched writes", "  SELECT array_agg(nextval('edm.serve_seq')", "  -- Rows in claim order"),
)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", choices=("s1", "s2", "s3"), default="s1")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply users, tasks and subtasks by this (1 = the design's size)")
    p.add_argument("--batch", type=int, default=50, help="claim batch size")
    p.add_argument("--calls", type=int, default=20, help="measured calls")
    p.add_argument("--warmup", type=int, default=6, help="calls run first and not counted")


def instrumented_claim(conn: psycopg.Connection[Any]) -> str:
    """The installed edm.claim's definition, renamed to edm_prof.claim and instrumented."""
    row = conn.execute("SELECT pg_get_functiondef('edm.claim'::regproc)").fetchone()
    assert row is not None
    fn = re.sub(r"FUNCTION edm\.claim\(", "FUNCTION edm_prof.claim(", row[0], count=1)
    names = [f"a{i}" for i in range(len(PARTS))]
    declare = "".join(f"  {n} interval := '0';\n" for n in names)
    fn = fn.replace("DECLARE\n", "DECLARE\n" + declare
                    + "  t0 timestamptz;\n  t_all timestamptz := clock_timestamp();\n", 1)
    for name, (part, start, end) in zip(names, PARTS, strict=True):
        i = fn.find(start)
        j = fn.find(end, i + len(start)) if i >= 0 else -1
        if i < 0 or j < 0:
            raise LookupError(f"part {part!r} not found in edm.claim: the function changed, "
                              "update PARTS in benchmarks/claimprofile.py")
        fn = (fn[:i] + "  t0 := clock_timestamp();\n" + fn[i:j]
              + f"  {name} := {name} + (clock_timestamp() - t0);\n" + fn[j:])
    sums = ", ".join(f"extract(epoch FROM {n}) * 1000" for n in names)
    report = ("  RAISE NOTICE 'edm_prof %', ARRAY[extract(epoch FROM clock_timestamp() - t_all)"
              f" * 1000, {sums}];\n")
    anchor = "  -- Rows in claim order"
    if anchor not in fn:
        raise LookupError("the end of edm.claim's loop was not found: update "
                          "benchmarks/claimprofile.py")
    return fn.replace(anchor, report + anchor, 1)


def profile(dsn: str, batch: int, calls: int, warmup: int) -> dict[str, Any]:
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
                rows = conn.execute("SELECT * FROM edm_prof.claim('claimprofile', %s, 60)",
                                    (batch,)).fetchall()
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
             "warm-up calls": args.warmup, "scaled_down": args.scale < 1}))
        common.say(f"building {args.shape}")
        data.build_world(dsn, spec)
        prof = profile(dsn, args.batch, args.calls, args.warmup)
    result.update(prof)
    call = prof["call_ms"]
    common.print_table(
        f"edm.claim(batch {args.batch}): median of {args.calls} rolled-back calls, "
        f"{prof['claimed']:.0f} subtasks each; call {call:.2f} ms at the client",
        ["part", "ms per call", "% of call"],
        [[part, ms, 100 * ms / call if call else 0.0] for part, ms in prof["parts_ms"].items()])
    return common.finish(args, result)
