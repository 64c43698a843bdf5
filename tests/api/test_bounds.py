"""The bounds the pydantic models check at the door equal the SQL CHECKs.

SQL is the authority; the models repeat its bounds so that a host gets a
precise error before a round trip. This test reads both (the catalog's CHECK
constraints, the models' JSON schema) and fails on any difference, so the two
cannot drift apart again (they had: 254 against 320 for an address). Every
bounded field of every model of the package is either checked so (FIELDS) or
listed with the reason no CHECK holds it (PYTHON_ONLY), so a new bound cannot
slip past this test.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import warnings
from collections.abc import Iterator
from typing import Any

import psycopg
import pydantic
import pytest

import edm_sched
from edm_sched import models, ops, reply_rules
from edm_sched.jobs import models as jobs

# (model, field, table, column, SQL unit per model unit); "[]" means the list's items.
FIELDS: list[tuple[type[pydantic.BaseModel], str, str, str, int]] = [
    (models.ServiceSpec, "name", "services", "name", 1),
    (models.ServiceSpec, "from_addresses", "services", "from_addresses", 1),
    (models.ServiceSpec, "from_addresses[]", "*", "email", 1),
    (models.ServiceSpec, "interval_seconds", "services", "interval_ms", 1000),
    (models.ServiceSpec, "daily_quota", "services", "daily_quota", 1),
    (models.ServiceSpec, "credential_ref", "services", "credential_ref", 1),
    (models.ServiceUpdate, "name", "services", "name", 1),
    (models.ServiceUpdate, "from_addresses", "services", "from_addresses", 1),
    (models.ServiceUpdate, "from_addresses[]", "*", "email", 1),
    (models.ServiceUpdate, "interval_seconds", "services", "interval_ms", 1000),
    (models.ServiceUpdate, "daily_quota", "services", "daily_quota", 1),
    (models.ServiceUpdate, "credential_ref", "services", "credential_ref", 1),
    (models.Contact, "email", "contacts", "email", 1),
    (models.Contact, "tags[]", "tags", "tag", 1),
    (models.Template, "subject", "templates", "subject", 1),
    (models.Template, "reply_to", "templates", "reply_to", 1),
    (models.TagRule, "include_any[]", "tags", "tag", 1),
    (models.TaskSpec, "user_id", "users", "user_id", 1),
    (models.TaskSpec, "name", "tasks", "name", 1),
    (models.TaskSpec, "templates", "tasks", "template_count", 1),
    (models.TaskSpec, "priority", "tasks", "priority", 1),
    (models.Contact, "tags[]", "tags", "tag", 1),
    (models.TagRule, "include_all[]", "tags", "tag", 1),
    (models.TagRule, "exclude[]", "tags", "tag", 1),
    (models.ServiceLimit, "max_count", "service_limits", "max_count", 1),
    (models.ServiceLimit, "burst", "service_limits", "burst", 1),
    (ops.UserArgs, "user_id", "users", "user_id", 1),
    (ops.UserArgs, "display_name", "users", "display_name", 1),
    (ops.UserArgs, "quota_limit", "users", "quota_limit", 1),
    (ops.GrantArgs, "user_id", "users", "user_id", 1),
    (ops.GrantArgs, "priority", "grants", "priority", 1),
    (ops.TagArgs, "user_id", "users", "user_id", 1),
    (ops.TagArgs, "emails[]", "*", "email", 1),
    (ops.TagArgs, "add[]", "tags", "tag", 1),
    (ops.TagArgs, "remove[]", "tags", "tag", 1),
    (ops.SuppressionArgs, "email", "suppressions", "email", 1),
    (ops.SuppressionArgs, "user_id", "users", "user_id", 1),
    (jobs.JobSpec, "user_id", "jobs", "user_id", 1),
    (jobs.JobSpec, "description", "jobs", "description", 1),
    (jobs.JobSpec, "priority", "jobs", "priority", 1),
    (jobs.JobSpec, "max_concurrent", "jobs", "max_concurrent", 1),
    (jobs.JobSpec, "timeout_seconds", "jobs", "timeout_seconds", 1),
    (jobs.JobSpec, "misfire_grace_seconds", "jobs", "misfire_grace_seconds", 1),
    (jobs.JobUpdate, "description", "jobs", "description", 1),
    (jobs.JobUpdate, "priority", "jobs", "priority", 1),
    (jobs.JobUpdate, "max_concurrent", "jobs", "max_concurrent", 1),
    (jobs.JobUpdate, "timeout_seconds", "jobs", "timeout_seconds", 1),
    (jobs.JobUpdate, "misfire_grace_seconds", "jobs", "misfire_grace_seconds", 1),
    (reply_rules.ReplyRuleSpec, "smtp_code", "reply_rules", "smtp_code", 1),
    (reply_rules.ReplyRuleSpec, "priority", "reply_rules", "priority", 1),
    (reply_rules.ReplyRuleSpec, "duration_seconds", "reply_rules", "duration_s", 1),
    (reply_rules.ReplyRuleSpec, "escalation_factor", "reply_rules", "escalation_factor", 1),
    (reply_rules.ReplyRuleSpec, "max_duration_seconds", "reply_rules", "max_duration_s", 1),
    (reply_rules.ReplyRuleSpec, "reset_after_seconds", "reply_rules", "reset_after_s", 1),
    (reply_rules.ReplyRuleSpec, "pattern", "reply_rules", "pattern", 1),
    (reply_rules.ReplyRuleSpec, "description", "reply_rules", "description", 1),
    (jobs.RetryPolicy, "max_retries", "jobs", "max_retries", 1),
    (jobs.RetryPolicy, "delay_seconds", "jobs", "retry_delay_seconds", 1),
    (jobs.RetryPolicy, "backoff", "jobs", "retry_backoff", 1),
    (jobs.RetryPolicy, "max_delay_seconds", "jobs", "retry_max_delay_seconds", 1),
]

# Bounds only the models hold, each with the reason no CHECK repeats it. A new
# bounded field goes in FIELDS (checked against SQL) or here (said why):
# test_every_bounded_field_is_accounted_for fails otherwise.
PYTHON_ONLY: dict[str, str] = {
    "SiteDomainsArgs.domains": "how many domains one call may map (edm.set_site_domains "
                               "refuses more than 10,000 in its own body)",
    "SiteDomainsArgs.description": "edm.set_site_domains checks it in its body (a function "
                                   "argument, not a column write the CHECK would see first)",
    "SuspendSiteArgs.service_id": "an id: any positive bigint",
    "SuspendSiteArgs.reason": "edm.suspend_site checks it in its body (2,000 characters)",
    "WarmupArgs.service_id": "an id: any positive bigint",
    "WarmupArgs.ramp[]": "a ceiling: edm.warmup_ramp_problem checks the ramp in SQL",
    "RampArgs.start": "a ceiling: edm.warmup_ramp_problem checks the ramp in SQL",
    "RampArgs.full": "a ceiling: edm.warmup_ramp_problem checks the ramp in SQL",
    "ServiceSpec.limits": "rows of edm.service_limits: how many one call may set",
    "ServiceLimit.window_seconds": "converted to window_ms, whose CHECK is 1 ms .. 31 days (the "
                                   "model refuses 0 and above 31 days: the same range in seconds)",
    "Contact.tags": "how many tags one contact may be given in one call",
    "Template.body_text": "a size limit of the door (I8); bodies are text in SQL",
    "Template.body_html": "a size limit of the door (I8); bodies are text in SQL",
    "Template.from_name": "a header size limit of the door; checked with the headers in SQL",
    "Template.required_variables": "how many variables one template may require",
    "Template.required_variables[]": "a variable's name (stored in the template's JSON)",
    "Recipient.email": "a raw input cap: bad addresses are reported by edm.email_problem",
    "TagRule.include_any": "how many tags one rule may name",
    "TagRule.include_all": "how many tags one rule may name",
    "TagRule.exclude": "how many tags one rule may name",
    "TaskSpec.recipients": "how many recipients one call may stage",
    "GrantArgs.service_id": "an id (bigint)",
    "TagArgs.emails": "how many addresses one call may tag",
    "TagArgs.add": "how many tags one call may add",
    "TagArgs.remove": "how many tags one call may remove",
    "JobSpec.cron": "checked by cronsim; the CHECK only refuses an empty text",
    "JobUpdate.cron": "checked by cronsim; the CHECK only refuses an empty text",
    "JobSpec.max_executions": "no CHECK: NULL means unlimited",
    "JobUpdate.max_executions": "no CHECK: NULL means unlimited",
    "JobSpec.tags": "how many tags one job may carry",
    "JobUpdate.tags": "how many tags one job may carry",
    "RetryPolicy.retry_on": "how many error kinds one policy may name",
    "SecretRef.prefix": "inside the target (jsonb)",
    "BasicAuth.username": "inside the target (jsonb)",
    "HttpTarget.url": "inside the target (jsonb)",
    "HttpTarget.timeout_seconds": "inside the target (jsonb)",
    "HttpTarget.expected_status": "inside the target (jsonb)",
    "HttpTarget.retry_on_status": "inside the target (jsonb)",
    "HttpTarget.max_redirects": "inside the target (jsonb)",
    "HttpTarget.max_response_bytes": "inside the target (jsonb)",
    "ShellTarget.cwd": "inside the target (jsonb)",
}

@pytest.fixture(scope="module")
def conn(module_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """These tests only read the catalog: one database for the whole module."""
    with psycopg.connect(module_dsn, autocommit=True) as c:
        yield c


_LENGTH = re.compile(r"(length|cardinality)\((\w+)\) (>=|<=) (\d+)")
_VALUE = re.compile(r"(?<!\w)\((\w+) (>=|<=) \(?'?(-?\d+(?:\.\d+)?)")
_EMAIL = re.compile(r"length\(p_email\) <= (\d+)")
_PRODUCT = re.compile(r"\((\w+) (>=|<=) \((\d+) \* \((\d+)\)::\w+\)\)")


def sql_bounds(conn: psycopg.Connection[Any]) -> dict[tuple[str, str], dict[str, float]]:
    """(table, column) → {"min"/"max": bound} from the CHECK constraints of schema edm."""
    email_max = int(_EMAIL.findall(conn.execute(
        "SELECT pg_get_functiondef('edm.is_valid_email(text)'::regprocedure)").fetchone()[0])[0])
    bounds: dict[tuple[str, str], dict[str, float]] = {("*", "email"): {"max": email_max}}
    for table, definition in conn.execute("""
            SELECT c.relname::text, pg_get_constraintdef(k.oid) FROM pg_constraint k
            JOIN pg_class c ON c.oid = k.conrelid
            WHERE k.connamespace = 'edm'::regnamespace AND k.contype = 'c'""").fetchall():
        for _, column, op, n in _LENGTH.findall(definition):
            bounds.setdefault((table, column), {})["min" if op == ">=" else "max"] = int(n)
        for column, op, n in _VALUE.findall(definition):
            bounds.setdefault((table, column), {})["min" if op == ">=" else "max"] = float(n)
        for column, op, a, b in _PRODUCT.findall(definition):  # (x <= (31 * (86400000)::bigint))
            bounds.setdefault((table, column), {})["min" if op == ">=" else "max"] = int(a) * int(b)
        for column in re.findall(r"edm\.is_valid_email\((\w+)\)", definition):
            bounds.setdefault((table, column), {})["max"] = email_max
    return bounds


def model_bounds(model: type[pydantic.BaseModel], field: str) -> dict[str, float]:
    schema = model.model_json_schema()
    name, items = field.removesuffix("[]"), field.endswith("[]")
    node = _resolve(schema, schema["properties"][name])
    if items:
        node = _resolve(schema, node["items"])
    out: dict[str, float] = {}
    for key, side in (("minLength", "min"), ("maxLength", "max"), ("minItems", "min"),
                      ("maxItems", "max"), ("minimum", "min"), ("maximum", "max")):
        if key in node:
            out[side] = node[key]
    return out


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    if "anyOf" in node:  # Optional[...]: the non-null branch
        node = _resolve(schema, next(n for n in node["anyOf"] if n.get("type") != "null"))
    return node


@pytest.mark.parametrize(("model", "field", "table", "column", "unit"), FIELDS,
                         ids=[f"{m.__name__}.{f}" for m, f, *_ in FIELDS])
def test_model_bounds_equal_the_sql_checks(conn: psycopg.Connection[Any],
                                           model: type[pydantic.BaseModel], field: str,
                                           table: str, column: str, unit: int) -> None:
    sql = sql_bounds(conn).get((table, column), {})
    py = {side: value * unit for side, value in model_bounds(model, field).items()}
    assert sql, f"no CHECK bounds edm.{table}.{column}"
    for side in ("min", "max"):
        if side in sql:
            assert py.get(side) == sql[side], (
                f"{model.__name__}.{field} {side} {py.get(side)} but edm.{table}.{column} "
                f"{side} {sql[side]}")


def test_every_address_column_has_one_bound(conn: psycopg.Connection[Any]) -> None:
    bounds = sql_bounds(conn)
    address_bounds = {key: b.get("max") for key, b in bounds.items()
                      if key[1] in ("email", "reply_to")}
    assert set(address_bounds.values()) == {254}, address_bounds


_KEYS = ("minLength", "maxLength", "minItems", "maxItems", "minimum", "maximum",
         "exclusiveMinimum", "exclusiveMaximum")


def bounded_fields() -> set[str]:
    """``Model.field`` (``[]`` for a list's items) of every bounded field of edm_sched's models."""
    with warnings.catch_warnings():  # the deprecated module paths warn when imported
        warnings.simplefilter("ignore", DeprecationWarning)
        for info in pkgutil.walk_packages(edm_sched.__path__, "edm_sched."):
            if not info.name.endswith("__main__"):
                importlib.import_module(info.name)
    found: set[str] = set()
    todo: list[type[pydantic.BaseModel]] = [pydantic.BaseModel]
    while todo:
        for model in todo.pop().__subclasses__():
            todo.append(model)
            if not model.__module__.startswith("edm_sched."):
                continue
            schema = model.model_json_schema()
            for name, node in schema.get("properties", {}).items():
                node = _resolve(schema, node)
                items = _resolve(schema, node["items"]) if "items" in node else {}
                for key, branch in (("", node), ("[]", items)):
                    if any(k in branch for k in _KEYS):
                        found.add(f"{model.__name__}.{name}{key}")
    return found


def test_every_bounded_field_is_accounted_for() -> None:
    checked = {f"{m.__name__}.{f}" for m, f, *_ in FIELDS}
    found = bounded_fields()
    assert {"TaskSpec.name", "JobSpec.priority"} <= found  # the walk sees both packages
    assert found - checked - set(PYTHON_ONLY) == set(), "add them to FIELDS or PYTHON_ONLY"
    assert set(PYTHON_ONLY) - found - checked == set(), "stale PYTHON_ONLY entries"


# Defaults a model and a column both hold (the API writes the model's value
# explicitly, so the column default serves direct SQL): they must agree.
DEFAULTS: list[tuple[type[pydantic.BaseModel], str, str, str]] = [
    (models.ServiceSpec, "transport", "services", "transport"),
    (models.ServiceSpec, "quota_tz", "services", "quota_tz"),
    (models.ServiceSpec, "enabled", "services", "enabled"),
    (models.ServiceLimit, "burst", "service_limits", "burst"),
    (models.TaskSpec, "priority", "tasks", "priority"),
    (jobs.JobSpec, "timezone", "jobs", "timezone"),
    (jobs.JobSpec, "status", "jobs", "status"),
    (jobs.JobSpec, "priority", "jobs", "priority"),
    (jobs.JobSpec, "max_concurrent", "jobs", "max_concurrent"),
    (jobs.JobSpec, "timeout_seconds", "jobs", "timeout_seconds"),
    (jobs.JobSpec, "misfire_policy", "jobs", "misfire_policy"),
    (jobs.JobSpec, "misfire_grace_seconds", "jobs", "misfire_grace_seconds"),
    (jobs.RetryPolicy, "max_retries", "jobs", "max_retries"),
    (jobs.RetryPolicy, "delay_seconds", "jobs", "retry_delay_seconds"),
    (jobs.RetryPolicy, "backoff", "jobs", "retry_backoff"),
    (jobs.RetryPolicy, "max_delay_seconds", "jobs", "retry_max_delay_seconds"),
    (jobs.RetryPolicy, "retry_on", "jobs", "retry_on"),
]


@pytest.mark.parametrize(("model", "field", "table", "column"), DEFAULTS,
                         ids=[f"{m.__name__}.{f}" for m, f, *_ in DEFAULTS])
def test_model_defaults_equal_the_column_defaults(conn: psycopg.Connection[Any],
                                                  model: type[pydantic.BaseModel], field: str,
                                                  table: str, column: str) -> None:
    row = conn.execute(
        "SELECT column_default FROM information_schema.columns"
        " WHERE table_schema = 'edm' AND table_name = %s AND column_name = %s",
        (table, column)).fetchone()
    assert row is not None and row[0] is not None, f"edm.{table}.{column} has no default"
    sql_value = conn.execute(f"SELECT {row[0]}").fetchone()[0]  # a constant expression
    py_value = model.model_fields[field].get_default(call_default_factory=True)
    assert py_value == sql_value, (f"{model.__name__}.{field} {py_value!r}, "
                                   f"edm.{table}.{column} {sql_value!r}")
