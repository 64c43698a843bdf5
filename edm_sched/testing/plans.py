"""The plans of the statements inside ``edm.claim`` and ``edm.complete``.

Both functions are PL/pgSQL, so EXPLAIN on ``SELECT edm.claim(...)`` shows one
opaque function scan. This module reads each inner statement from the
*installed* function's source (``pg_proc.prosrc``), so it checks the real code
rather than a copy, turns the PL/pgSQL variables it uses into ``$n``
parameters, and EXPLAINs it as a prepared statement — with a custom plan (the
first executions of a PL/pgSQL statement) and a generic plan (what PL/pgSQL
switches to once the generic cost looks no worse, usually from the sixth
execution on). Used by tests/sql/test_plan_regression.py and by ``python -m
benchmarks scale --explain``.

When the server has ``auto_explain`` (not the embedded one), the test also
logs the plans of the real function calls (:func:`auto_explain_plans`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import psycopg


@dataclass(frozen=True)
class Inner:
    """One statement inside a PL/pgSQL function, located by its first words."""

    name: str
    function: str  # regprocedure-ish lookup name, e.g. 'edm.claim'
    start: str | tuple[str, ...]  # the statement begins with (one of) this text (first found)
    params: tuple[tuple[str, str], ...]  # (PL/pgSQL expression, SQL type), longest first
    indexes: tuple[str, ...]  # every one of these must appear in the plan
    strip_into: bool = False  # drop "INTO var" of SELECT ... INTO
    perform: bool = False  # PERFORM ... -> SELECT ...
    end_before: str | None = None  # statement ends before this (cursor loops: "LOOP")


CLAIM = "edm.claim_v2"
COMPLETE = "edm.complete"
NEXT_SUBTASK = "edm.claim_next_subtask"
SENDABLE = "edm.task_sendable_outside"

INNER_STATEMENTS: tuple[Inner, ...] = (
    Inner("claim: ready services, ranked", CLAIM,
          "SELECT s.service_id FROM edm.services s\n    WHERE s.enabled",
          (("v_horizon", "timestamptz"), ("v_now", "timestamptz"), ("p_owner", "text"),
           ("p_skip_services", "bigint[]"), ("v_order", "bigint[]"), ("v_lim", "integer")),
          ("services_ready_idx",)),
    Inner("claim: ranked services, locked in order", CLAIM, "SELECT s.service_id, s.quota_tz",
          (("v_horizon", "timestamptz"), ("v_now", "timestamptz"), ("p_owner", "text"),
           ("v_order", "bigint[]")), ("services_pkey",), end_before="LOOP"),
    Inner("claim: a chunk of the second ranking, services with work", CLAIM,
          "SELECT x.id FROM unnest(v_rest",
          (("v_rest", "bigint[]"), ("v_pos", "integer"), ("v_chunk", "integer")),
          ("grants_pkey", "users_pkey")),
    Inner("claim: head of the rotation", CLAIM,
          "SELECT u.user_id FROM edm.users u\n    WHERE u.claimable_tasks > 0\n    ORDER BY",
          (("p_batch", "integer"),), ("users_rotation_idx",)),
    Inner("claim: is the pool small", CLAIM, "SELECT 1 FROM edm.grants g WHERE g.service_id",
          (("v_svc.service_id", "bigint"), ("v_small", "integer")), ("grants_pkey",)),
    Inner("claim: a small pool in rotation order", CLAIM,
          "SELECT u.user_id FROM edm.users u\n                      WHERE u.user_id = ANY (v_pool)",
          (("v_pool", "text[]"),), ("users_pkey",)),
    Inner("claim: next user from the pool or rotation head", CLAIM,
          "SELECT c.user_id INTO v_user",
          (("v_svc.service_id", "bigint"), ("v_skip", "text[]"), ("v_horizon", "timestamptz"),
           ("v_now", "timestamptz"),
           ("v_cands", "text[]"), ("v_left", "text[]"), ("r_users", "text[]"),
           ("c_svc", "bigint[]"), ("v_from", "integer")),
          ("grants_pkey|grants_user_idx",), strip_into=True),
    Inner("claim: users served in the call, in serve order", CLAIM,
          "SELECT c.user_id INTO v_user\n        FROM unnest(r_users)",
          (("v_svc.service_id", "bigint"), ("v_skip", "text[]"), ("v_horizon", "timestamptz"),
           ("v_now", "timestamptz"), ("v_pool", "text[]"), ("r_users", "text[]"),
           ("c_svc", "bigint[]")),
          ("grants_pkey|grants_user_idx",), strip_into=True),
    Inner("claim: batched fill of a service's slots", CLAIM,
          "SELECT array_agg(b.user_id ORDER BY b.n)",
          (("v_svc.service_id", "bigint"), ("v_skip", "text[]"), ("v_horizon", "timestamptz"),
           ("v_now", "timestamptz"), ("v_cands", "text[]"), ("v_pool", "text[]"),
           ("r_users", "text[]"), ("c_svc", "bigint[]"), ("c_sub", "bigint[]"),
           ("v_want", "integer"), ("v_bdom", "text[]"), ("v_lsites", "text[]"),
           ("v_from", "integer")),
          ("grants_pkey|grants_user_idx", "users_pkey", "tasks_rotation_idx",
           "subtasks_claim_idx"), strip_into=True),
    Inner("claim: lock a pool's user", CLAIM, "PERFORM 1 FROM edm.users u",
          (("v_user", "text"),), ("users_pkey",), perform=True),
    Inner("claim: next user in rotation", CLAIM,
          "SELECT u.user_id INTO v_user\n        FROM edm.users u\n        WHERE u.claimable_tasks",
          (("v_svc.service_id", "bigint"), ("v_skip", "text[]"), ("v_horizon", "timestamptz"),
           ("v_now", "timestamptz"),
           ("v_cands", "text[]"), ("r_users", "text[]"), ("c_svc", "bigint[]")),
          ("users_rotation_idx", "grants_pkey"), strip_into=True),
    Inner("claim: the user's next task", CLAIM,
          ("SELECT t.task_id FROM edm.tasks t", "SELECT t.task_id, t.priority INTO"),
          (("v_user", "text"), ("v_tried", "bigint[]"), ("r_tasks", "bigint[]"),
           ("v_empty", "bigint[]")),
          ("tasks_rotation_idx",), end_before="LOOP", strip_into=True),
    Inner("claim: the task's due retry", CLAIM,
          "SELECT st.subtask_id, st.domain INTO v_sub, v_dom\n            FROM",
          (("v_task", "bigint"), ("v_now", "timestamptz"), ("c_sub", "bigint[]")),
          ("subtasks_claim_idx",), strip_into=True),
    Inner("claim: the task's next fresh subtask", CLAIM,
          "SELECT st.subtask_id, st.domain INTO v_sub, v_dom\n              FROM",
          (("v_task", "bigint"), ("c_sub", "bigint[]")),
          ("subtasks_claim_idx",), strip_into=True),
    # 0030: the single-user pass (a service whose one user with work was served in the call)
    Inner("claim: single-user pass, the user's tasks", CLAIM,
          "SELECT coalesce(array_agg(t.task_id ORDER BY t.n)",
          (("v_user", "text"), ("v_empty", "bigint[]"), ("r_tasks", "bigint[]"),
           ("v_want", "integer")),
          ("tasks_rotation_idx|tasks_user_idx",), strip_into=True),
    Inner("claim: single-user pass, a task's due retries", CLAIM,
          "SELECT st.subtask_id FROM edm.subtasks st\n            WHERE st.task_id = w_task[j]",
          (("w_task[j]", "bigint"), ("v_now", "timestamptz"), ("c_sub", "bigint[]"),
           ("v_l", "integer")),
          ("subtasks_claim_idx",)),
    Inner("claim: single-user pass, a task's fresh subtasks", CLAIM,
          "SELECT st.subtask_id FROM edm.subtasks st\n              WHERE st.task_id = w_task[j]",
          (("cardinality(w_got)", "integer"), ("w_task[j]", "bigint"), ("c_sub", "bigint[]"),
           ("v_l", "integer")),
          ("subtasks_claim_idx",)),
    # edm.claim_next_subtask (0022): a task's next recipient outside blocked sites' domains
    Inner("claim: probe of the first recipients", NEXT_SUBTASK,
          "SELECT st.not_before, st.subtask_id INTO v_nb, v_id",
          (("p_task_id", "bigint"), ("p_exclude", "bigint[]"), ("v_lo", "timestamptz"),
           ("v_hi", "timestamptz")),
          ("subtasks_claim_idx",), strip_into=True),
    Inner("claim: next recipient outside blocked domains", NEXT_SUBTASK,
          "SELECT st.subtask_id, st.domain INTO subtask_id, domain",
          (("p_task_id", "bigint"), ("p_exclude", "bigint[]"), ("p_skip_domains", "text[]"),
           ("v_lo", "timestamptz"), ("v_hi", "timestamptz"), ("v_nb", "timestamptz"),
           ("v_id", "bigint")),
          ("subtasks_claim_idx",), strip_into=True),
    Inner("claim: jump from domain to domain", NEXT_SUBTASK,
          "SELECT f.not_before, f.subtask_id INTO v_nb, v_id",
          (("p_task_id", "bigint"), ("p_exclude", "bigint[]"), ("p_skip_domains", "text[]"),
           ("v_lo", "timestamptz"), ("v_hi", "timestamptz"), ("v_nb", "timestamptz"),
           ("v_id", "bigint")),
          ("subtasks_domain_idx",), strip_into=True),
    # edm.task_sendable_outside (0025): a task's pending domains, one probe each
    Inner("claim: a task's first pending domain", SENDABLE,
          "SELECT s.domain, s.not_before INTO v_dom, v_nb FROM edm.subtasks s\n"
          "  WHERE s.task_id = p_task_id AND s.status = 'pending'\n  ORDER BY",
          (("p_task_id", "bigint"),), ("subtasks_domain_idx",), strip_into=True),
    Inner("claim: a task's next pending domain", SENDABLE,
          "SELECT s.domain, s.not_before INTO v_dom, v_nb FROM edm.subtasks s\n"
          "    WHERE s.task_id = p_task_id AND s.status = 'pending' AND s.domain > v_dom",
          (("p_task_id", "bigint"), ("v_dom", "text")), ("subtasks_domain_idx",),
          strip_into=True),
    Inner("claim: shaping layers in use", CLAIM, "SELECT EXISTS (SELECT 1 FROM edm.shaping_limits",
          (("v_now", "timestamptz"),),
          ("shaping_limits_scope_idx", "users_limited_idx", "tasks_limited_idx",
           "tasks_transactional_idx"), strip_into=True),
    Inner("claim: next transactional task", CLAIM, "SELECT t.task_id, t.user_id INTO v_fixed",
          (("v_svc.service_id", "bigint"), ("v_skip", "text[]"), ("v_horizon", "timestamptz"),
           ("v_now", "timestamptz"), ("v_tx_tried", "bigint[]"), ("c_svc", "bigint[]")),
          ("tasks_transactional_idx", "grants_pkey|grants_user_idx"), strip_into=True),
    Inner("claim: lease the subtask", CLAIM, ("WITH leased AS (", "UPDATE edm.subtasks st"),
          (("v_svc.service_id", "bigint"), ("v_lease", "interval"), ("v_user", "text"),
           ("v_now", "timestamptz"), ("v_sub", "bigint"), ("p_owner", "text"),
           ("c_sub", "bigint[]"), ("c_svc", "bigint[]"), ("c_user", "text[]"),
           ("c_slot", "timestamptz[]")),
          ("subtasks_pkey",)),
    Inner("claim: start the services' intervals", CLAIM,
          "UPDATE edm.services s\n  SET last_sent_at",
          (("v_now", "timestamptz"), ("c_svc", "bigint[]"), ("c_slot", "timestamptz[]"),
           ("p_owner", "text"), ("v_hold", "interval")), ("services_pkey",)),
    Inner("claim: task counters and rotation", CLAIM, "UPDATE edm.tasks t",
          (("v_now", "timestamptz"), ("c_task", "bigint[]"), ("v_seqs", "bigint[]")),
          ("tasks_pkey",)),
    Inner("claim: user rotation", CLAIM, "UPDATE edm.users u",
          (("v_now", "timestamptz"), ("c_user", "text[]"), ("v_seqs", "bigint[]")),
          ("users_pkey",)),
    Inner("complete: lock subtasks", COMPLETE,
          "SELECT coalesce(array_agg(DISTINCT x.service_id)",
          (("p_subtask_ids", "bigint[]"),), ("subtasks_pkey",), strip_into=True),
    Inner("complete: lock services", COMPLETE, "PERFORM 1 FROM edm.services s",
          (("v_svc_ids", "bigint[]"),), ("services_pkey",), perform=True),
    Inner("complete: lock tasks", COMPLETE,
          "SELECT coalesce(array_agg(DISTINCT x.user_id)",
          (("v_task_ids", "bigint[]"),), ("tasks_pkey",), strip_into=True),
    Inner("complete: record outcomes", COMPLETE, "WITH input AS (",
          (("p_subtask_ids", "bigint[]"), ("p_outcomes", "text[]"), ("p_codes", "integer[]"),
           ("p_details", "text[]"), ("p_response_ms", "integer[]"),
           ("p_provider_ids", "text[]"), ("p_owner", "text"), ("v_now", "timestamptz"),
           ("v_n", "integer"), ("v_max_attempts", "integer"), ("v_retry_base", "integer"),
           ("v_retry_max", "integer"), ("v_svc_base", "integer"), ("v_svc_max", "integer"),
           ("v_rule_ids", "bigint[]"), ("v_sites", "text[]"), ("v_svc_ids", "bigint[]")),
          ("subtasks_pkey", "tasks_pkey", "services_pkey")),
)


@dataclass
class PlanCheck:
    inner: Inner
    sql: str
    custom_indexes: set[str] = field(default_factory=set)
    generic_indexes: set[str] = field(default_factory=set)
    custom_plan: str = ""
    generic_plan: str = ""

    def missing(self, expected: tuple[str, ...] | None = None) -> dict[str, set[str]]:
        """Expected indexes (default: the statement's) absent from each plan; {} when none.

        An entry "a|b" is met by either index (two indexes that serve the same
        probe equally well, e.g. both lead to one grant by service and user).
        """
        want = expected if expected is not None else self.inner.indexes

        def absent(used: set[str]) -> set[str]:
            return {w for w in want if not used & set(w.split("|"))}

        out = {"custom": absent(self.custom_indexes), "generic": absent(self.generic_indexes)}
        return {k: v for k, v in out.items() if v}

    @property
    def ok(self) -> bool:
        return not self.missing()


def sample_values(conn: psycopg.Connection[Any]) -> dict[str, str]:
    """Literal values for every PL/pgSQL variable of the inner statements, from the data.

    A ready service, a user with work and a grant on it, that user's task and
    up to three of its subtasks; the arrays a claim call accumulates as at its first
    lookup.
    """
    svc = conn.execute("SELECT service_id FROM edm.services WHERE next_available_at <= now()"
                       " ORDER BY service_id LIMIT 1").fetchone()
    user = conn.execute("""
        SELECT u.user_id FROM edm.users u JOIN edm.grants g ON g.user_id = u.user_id
        WHERE g.service_id = %s AND u.claimable_tasks > 0 LIMIT 1""",
                        (svc[0] if svc else 0,)).fetchone()
    task = conn.execute("SELECT task_id FROM edm.tasks WHERE user_id = %s AND claimable"
                        " ORDER BY task_id LIMIT 1", (user[0] if user else "",)).fetchone()
    subs = conn.execute("SELECT subtask_id FROM edm.subtasks WHERE task_id = %s"
                        " ORDER BY subtask_id LIMIT 3", (task[0] if task else 0,)).fetchall()
    if not (svc and user and task and subs):
        raise LookupError("no ready service with a user holding claimable work")
    ids = ",".join(str(r[0]) for r in subs)
    ready = ",".join(str(r[0]) for r in conn.execute(
        "SELECT service_id FROM edm.services WHERE next_available_at <= now() ORDER BY service_id"))
    return {
        "v_now": "now()", "v_svc.service_id": str(svc[0]), "v_skip": "'{}'::text[]",
        "v_user": f"'{user[0]}'", "v_task": str(task[0]), "v_sub": str(subs[0][0]),
        "v_lease": "interval '30 seconds'", "p_owner": "'plan-test'",
        "p_subtask_ids": f"'{{{ids}}}'::bigint[]",
        "p_outcomes": "'{" + ",".join(["sent"] * len(subs)) + "}'::text[]",
        "v_n": str(len(subs)), "v_max_attempts": "5",
        "v_retry_base": "60", "v_retry_max": "3600", "v_svc_base": "30", "v_svc_max": "1800",
        # arrays a claim call accumulates (empty at its first lookup)
        # the second ranking (0027): the ready services, a chunk taken from the first
        "v_rest": f"'{{{ready}}}'::bigint[]",
        "v_pos": "1", "v_chunk": "108",
        "v_tried": "'{}'::bigint[]", "r_tasks": "'{}'::bigint[]", "v_cands": "'{}'::text[]",
        "r_users": "'{}'::text[]", "c_svc": "'{}'::bigint[]", "c_sub": "'{}'::bigint[]",
        "c_user": f"'{{{user[0]}}}'::text[]", "c_task": f"'{{{task[0]}}}'::bigint[]",
        "v_seqs": "'{1}'::bigint[]",
        "v_pool": f"'{{{user[0]}}}'::text[]", "v_left": f"'{{{user[0]}}}'::text[]",
        "v_small": "100",
        "p_batch": "50", "v_want": "4",
        # the single-user pass (0030)
        "w_task[j]": str(task[0]), "v_l": "4", "cardinality(w_got)": "0",
        "v_horizon": "now() + interval '250 milliseconds'", "p_skip_services": "'{}'::bigint[]",
        "v_bdom": "'{}'::text[]", "v_tx_tried": "'{}'::bigint[]", "v_lsites": "'{}'::text[]",
        "v_empty": "'{}'::bigint[]", "v_dom": "''",
        "c_slot": "ARRAY[now()]::timestamptz[]", "v_hold": "interval '2 seconds'",
        # edm.claim_next_subtask (0022): a fresh lookup past a probe, one domain skipped
        "p_task_id": str(task[0]), "p_exclude": "'{}'::bigint[]",
        "p_skip_domains": "'{example.com}'::text[]", "v_lo": "'-infinity'::timestamptz",
        "v_hi": "'-infinity'::timestamptz", "v_nb": "'-infinity'::timestamptz",
        "v_id": str(subs[0][0]),
        # reply rules (0017): no rule matched, the common case
        "v_rule_ids": "NULL::bigint[]", "v_sites": "NULL::text[]",
        # 0028: the head's first user not served yet; what the completion's locks read
        "v_from": "1", "v_svc_ids": f"'{{{svc[0]}}}'::bigint[]",
        "v_task_ids": f"'{{{task[0]}}}'::bigint[]",
    }


def function_source(conn: psycopg.Connection[Any], name: str) -> str:
    schema, fname = name.split(".")
    rows = conn.execute(
        "SELECT p.prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = %s AND p.proname = %s", (schema, fname)).fetchall()
    if len(rows) != 1:
        raise LookupError(f"expected exactly one function {name}, found {len(rows)}")
    return str(rows[0][0])


def _statement_end(src: str, start: int, end_before: str | None) -> int:
    """Index of the end of the statement starting at ``start`` (its ';' or ``end_before``)."""
    depth = 0
    i = start
    in_str = False
    while i < len(src):
        ch = src[i]
        if in_str:
            if ch == "'" and src[i + 1:i + 2] == "'":  # '' inside a literal
                i += 2
                continue
            in_str = ch != "'"
            i += 1
            continue
        if ch == "'":
            in_str = True
        elif src.startswith("--", i):
            nl = src.find("\n", i)
            i = len(src) if nl < 0 else nl
            continue
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:  # the statement was inside parentheses (a CTE): it ends here
                return i
        elif depth == 0 and (ch == ";" or (end_before is not None
                                           and re.match(rf"\s{end_before}\b", src[i:]))):
            return i
        i += 1
    raise ValueError("unterminated statement")


def declared_variables(src: str) -> set[str]:
    """Names declared in the DECLARE section of a PL/pgSQL body."""
    m = re.search(r"\bDECLARE\b(.*?)\bBEGIN\b", src, re.S | re.I)
    if not m:
        return set()
    return set(re.findall(r"^\s*([a-z_][a-z0-9_]*)\s+[a-z]", m.group(1), re.M | re.I))


def extract(src: str, inner: Inner) -> tuple[str, list[str]]:
    """The statement with its variables as $n parameters, and the parameter types."""
    starts = (inner.start,) if isinstance(inner.start, str) else inner.start
    found = [p for p in (src.find(s) for s in starts) if p >= 0]
    if not found:
        raise LookupError(f"{inner.name}: none of {starts} found in {inner.function}; "
                          "the function changed: update edm_sched/testing/plans.py")
    pos = min(found)
    stmt = src[pos:_statement_end(src, pos, inner.end_before)]
    if inner.perform:
        stmt = re.sub(r"^PERFORM\b", "SELECT", stmt)
    if inner.strip_into:
        stmt = re.sub(r"\bINTO\s+[a-z_][a-z0-9_.]*(\s*,\s*[a-z_][a-z0-9_.]*)*", "", stmt,
                      count=1)
    types: list[str] = []
    for n, (expr, sqltype) in enumerate(inner.params, start=1):
        pattern = r"(?<![A-Za-z0-9_.])" + re.escape(expr) + r"(?![A-Za-z0-9_])"
        stmt = re.sub(pattern, f"${n}", stmt)
        types.append(sqltype)  # PREPARE accepts declared parameters the statement never uses
    variables = declared_variables(src) | {"p_" + m for m in
                                           re.findall(r"(?<![A-Za-z0-9_])p_([a-z0-9_]+)", src)}
    leftovers = sorted(v for v in variables
                       if re.search(r"(?<![A-Za-z0-9_.])" + re.escape(v) + r"(?![A-Za-z0-9_])",
                                    stmt))
    if leftovers:
        raise LookupError(f"{inner.name}: PL/pgSQL variables {leftovers} have no parameter "
                          "mapping; the function changed: update edm_sched/testing/plans.py")
    return stmt.strip(), types


def _index_names(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        if "Index Name" in node:
            found.add(str(node["Index Name"]))
        for v in node.values():
            found |= _index_names(v)
    elif isinstance(node, list):
        for v in node:
            found |= _index_names(v)
    return found


def explain_inner(conn: psycopg.Connection[Any], inner: Inner, values: dict[str, str],
                  *, analyze: bool = False) -> PlanCheck:
    """EXPLAIN one inner statement with a custom and a generic plan.

    ``values`` maps each PL/pgSQL expression of ``inner.params`` to a SQL
    literal. With ``analyze`` the custom plan is EXPLAIN ANALYZEd inside a
    transaction that is rolled back (row locks and updates are undone).
    """
    src = function_source(conn, inner.function)
    stmt, types = extract(src, inner)
    check = PlanCheck(inner, stmt)
    name = "edm_plan_" + re.sub(r"[^a-z0-9]+", "_", inner.name.lower()).strip("_")
    args = ", ".join(values.get(expr, "NULL") for expr, _ in inner.params)
    with conn.transaction(force_rollback=True):
        conn.execute(f"PREPARE {name}({', '.join(types)}) AS {stmt}")
        try:
            for mode in ("force_custom_plan", "force_generic_plan"):
                conn.execute(f"SET LOCAL plan_cache_mode = {mode}")
                row = conn.execute(f"EXPLAIN (FORMAT JSON) EXECUTE {name}({args})").fetchone()
                raw = row[0] if row else "[]"
                plan = json.loads(raw) if isinstance(raw, str) else raw
                opts = "COSTS OFF"
                if analyze and mode == "force_custom_plan":
                    opts = "ANALYZE, BUFFERS, COSTS OFF"
                text = "\n".join(str(r[0]) for r in conn.execute(
                    f"EXPLAIN ({opts}) EXECUTE {name}({args})").fetchall())
                if mode == "force_custom_plan":
                    check.custom_indexes, check.custom_plan = _index_names(plan), text
                else:
                    check.generic_indexes, check.generic_plan = _index_names(plan), text
        finally:
            conn.execute(f"DEALLOCATE {name}")
    return check


def auto_explain_plans(conn: psycopg.Connection[Any], statement: str,
                       params: Any = None) -> list[str] | None:
    """Plans of every statement run by ``statement`` (nested ones included) via auto_explain.

    None when the server has no auto_explain. The statement runs inside a
    transaction that is rolled back.
    """
    notices: list[str] = []

    def grab(diag: Any) -> None:
        if diag.message_primary and "plan:" in diag.message_primary.lower():
            notices.append(diag.message_primary + "\n" + (diag.message_detail or ""))

    try:
        with conn.transaction(force_rollback=True):
            conn.execute("LOAD 'auto_explain'")
    except psycopg.Error:
        return None
    conn.add_notice_handler(grab)
    try:
        with conn.transaction(force_rollback=True):
            conn.execute("LOAD 'auto_explain'")
            for setting, value in (("auto_explain.log_min_duration", "0"),
                                   ("auto_explain.log_nested_statements", "on"),
                                   ("auto_explain.log_analyze", "off"),
                                   ("auto_explain.log_level", "notice"),
                                   ("client_min_messages", "notice")):
                conn.execute(f"SET LOCAL {setting} = {value}")
            conn.execute(statement, params)
    finally:
        conn.remove_notice_handler(grab)
    return notices
