"""The bounds the pydantic models check at the door equal the SQL CHECKs.

SQL is the authority; the models repeat its bounds so that a host gets a
precise error before a round trip. This test reads both (the catalog's CHECK
constraints, the models' JSON schema) and fails on any difference, so the two
cannot drift apart again (they had: 254 against 320 for an address).
"""

from __future__ import annotations

import re
from typing import Any

import psycopg
import pydantic
import pytest

from edm_sched import models

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
]

_LENGTH = re.compile(r"(length|cardinality)\((\w+)\) (>=|<=) (\d+)")
_VALUE = re.compile(r"(?<!\w)\((\w+) (>=|<=) \(?'?(-?\d+(?:\.\d+)?)")
_EMAIL = re.compile(r"length\(p_email\) <= (\d+)")


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
