"""Refused at the door (issue 16, I8): content that can never be sent is refused by
``create_task`` (and every API storing content) with a typed error, and nothing is
written. Real PostgreSQL; the checks run in the pydantic models and in SQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from edm_sched import errors
from edm_sched.api import Scheduler
from edm_sched.rendering import required_variables
from tests.support.helpers import T0, fingerprint, make_service

GOOD = {"subject": "Hello {{ first_name | default('there') }}", "body_text": "Hi!"}


@pytest.fixture(scope="module")
def world(module_dsn: str) -> Iterator[dict[str, Any]]:
    """One database for the module: each refusal is checked against the state just
    before it (refused()), and what the accepting tests create stays within u1's quota."""
    with Scheduler(module_dsn) as s, psycopg.connect(module_dsn, autocommit=True) as conn:
        s.upsert_user("u1", quota_limit=1000)
        svc = make_service(s, "svc", users=["u1"])
        yield {"s": s, "conn": conn, "svc": svc}


def task(**changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"user_id": "u1", "name": "n", "templates": [GOOD],
                            "scheduled_at": T0, "recipients": [{"email": "a@rcpt.example"}]}
    spec.update(changes)
    return spec


def refused(world: dict[str, Any], kind: type[errors.EdmSchedError],
            call: Callable[[], Any]) -> errors.EdmSchedError:
    before = fingerprint(world["conn"])
    with pytest.raises(kind) as info:
        call()
    assert fingerprint(world["conn"]) == before, "a refused call wrote something"
    return info.value


# ------------------------------------------------------------------ templates


@pytest.mark.parametrize(("field", "source"), [
    ("subject", "Hello {{ name "),
    ("subject", "{% if x %}no end"),
    ("body_text", "{{ 1 + }}"),
    ("body_html", "<p>{% for %}</p>"),
    ("body_html", "{% endif %}"),
    ("body_text", "{{ x | no_such_filter }}"),
])
def test_a_template_that_does_not_compile_is_refused(world: dict[str, Any], field: str,
                                                     source: str) -> None:
    tpl = {**GOOD, field: source}
    err = refused(world, errors.InvalidTemplate,
                  lambda: world["s"].create_task(task(templates=[GOOD, tpl])))
    assert err.code == "INVALID_TEMPLATE"
    assert "templates.1" in str(err) and field in str(err) and "line 1" in str(err)


@pytest.mark.parametrize("subject", ["Hi\r\nBcc: victim@example.com", "Hi\nthere", "a\rb",
                                     "nul\x00", "vt\x0b", "sep\u2028x", "nel\x85", "esc\x1b["])
def test_a_line_break_or_control_character_in_a_header_is_refused(world: dict[str, Any],
                                                                   subject: str) -> None:
    s = world["s"]
    refused(world, errors.InvalidHeader,
            lambda: s.create_task(task(templates=[{**GOOD, "subject": subject}])))
    refused(world, errors.InvalidHeader,
            lambda: s.create_task(task(templates=[{**GOOD, "from_name": subject}])))
    refused(world, errors.InvalidHeader,
            lambda: s.create_task(task(headers={"X-Campaign": subject})))


@pytest.mark.parametrize("name", ["Message-ID", "date", "FROM", "To", "Cc", "Bcc", "Subject",
                                  "Reply-To", "Sender", "Return-Path", "Received",
                                  "DKIM-Signature", "Content-Type", "MIME-Version",
                                  "List-Unsubscribe", "Resent-From", "X-Edm-Task",
                                  "Bad Name", "Colon:", "", "Ünicode"])
def test_a_header_the_caller_may_not_set_is_refused(world: dict[str, Any], name: str) -> None:
    s = world["s"]
    refused(world, errors.InvalidHeader, lambda: s.create_task(task(headers={name: "x"})))
    refused(world, errors.InvalidHeader, lambda: s.create_task(
        task(templates=[{**GOOD, "headers": {name: "x"}}])))
    refused(world, errors.InvalidHeader, lambda: s.create_service({
        "name": "svc2", "from_addresses": ["a@sender.example"], "interval_seconds": 1,
        "daily_quota": 10, "settings": {"headers": {name: "x"}}}))
    refused(world, errors.InvalidHeader, lambda: s.update_service(
        world["svc"], {"settings": {"headers": {name: "x"}}}))


def test_sql_refuses_the_same_headers(world: dict[str, Any]) -> None:
    """edm.headers_problem backs the Python rules: a plain-SQL caller is refused too."""
    conn = world["conn"]
    bad = [{"Message-ID": "x"}, {"X-A": "a\nb"}, {"X-A": 1}, {"a b": "x"}, {"X-A": "x" * 901},
           {"X-A": "1", "x-a": "2"}, [], {f"X-{i}": "v" for i in range(51)}]
    for headers in bad:
        problem = conn.execute("SELECT edm.headers_problem(%s)",
                               (psycopg.types.json.Jsonb(headers),)).fetchone()
        assert problem is not None and problem[0], headers
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("UPDATE edm.services SET settings = '{\"headers\": {\"Date\": \"x\"}}'")
    ok = conn.execute("SELECT edm.headers_problem(%s)",
                      (psycopg.types.json.Jsonb({"X-Campaign": "spring 🌸", "Precedence": "bulk"}),)
                      ).fetchone()
    assert ok == (None,)


def test_custom_headers_are_stored_with_the_templates(world: dict[str, Any]) -> None:
    s = world["s"]
    created = s.create_task(task(headers={"X-Campaign": "spring", "X-Tier": "gold"},
                                 templates=[{**GOOD, "headers": {"X-Tier": "silver"}}, GOOD],
                                 list_unsubscribe=False))
    rows = world["conn"].execute(
        "SELECT template_idx, headers, list_unsubscribe, required_variables FROM edm.templates"
        " WHERE task_id = %s ORDER BY template_idx", (created.task_id,)).fetchall()
    assert rows == [(0, {"X-Campaign": "spring", "X-Tier": "silver"}, False, None),
                    (1, {"X-Campaign": "spring", "X-Tier": "gold"}, False, None)]


# ------------------------------------------------------------------ variables


def test_required_variables_follow_the_syntax_tree() -> None:
    source = ("{{ name }} {{ nick | default('you') }} {% if vip is defined %}{{ vip }}{% endif %}"
              "{% for i in items %}{{ i }}{% endfor %}{% set k = 1 %}{{ k }} {{ email }}"
              "{{ order.total }} {{ unsubscribe_url }}")
    assert required_variables(source) == {"name", "items", "order"}


def test_strict_variables_refuse_recipients_lacking_them(world: dict[str, Any]) -> None:
    s = world["s"]
    templates = [{"subject": "Hi {{ first_name }}", "body_text": "{{ plan }} {{ x|default(1) }}"}]
    recipients = [{"email": "a@rcpt.example", "vars": {"first_name": "A", "plan": "pro"}},
                  {"email": "b@rcpt.example", "vars": {"first_name": "B"}},
                  {"email": "c@rcpt.example"}]
    err = refused(world, errors.MissingVariables, lambda: s.create_task(
        task(templates=templates, recipients=recipients, strict_variables=True)))
    assert err.code == "MISSING_VARIABLES"
    assert "2 recipient(s)" in str(err) and "b@rcpt.example" in str(err) and "plan" in str(err)
    # without strict variables the task is accepted (a missing variable fails that
    # recipient at send time), and with every variable given, strict accepts it too
    assert s.create_task(task(templates=templates, recipients=recipients)).recipients == 3
    assert s.create_task(task(templates=templates, recipients=recipients[:1],
                              strict_variables=True)).recipients == 1


def test_strict_variables_check_the_contacts_of_a_tag_rule(world: dict[str, Any]) -> None:
    s = world["s"]
    s.upsert_contacts("u1", [
        {"email": "a@rcpt.example", "tags": ["vip"], "attributes": {"first_name": "A"}},
        {"email": "b@rcpt.example", "tags": ["vip"], "attributes": {}},
        {"email": "c@rcpt.example", "tags": ["other"], "attributes": {}}])
    templates = [{"subject": "Hi {{ first_name }}", "body_text": "x"}]
    rule = {"include_any": ["vip"]}
    err = refused(world, errors.MissingVariables, lambda: s.create_task(
        task(templates=templates, recipients=None, rule=rule, strict_variables=True)))
    assert "b@rcpt.example" in str(err) and "first_name" in str(err)
    s.tag_contacts("u1", ["b@rcpt.example"], remove=["vip"])
    created = s.create_task(task(templates=templates, recipients=None, rule=rule,
                                 strict_variables=True))
    assert created.recipients == 1


# -------------------------------------------------------------- addresses, sizes


def test_an_empty_recipient_list_is_refused(world: dict[str, Any]) -> None:
    err = refused(world, errors.NoRecipients,
                  lambda: world["s"].create_task(task(recipients=[])))
    assert err.code == "NO_RECIPIENTS"


@pytest.mark.parametrize(("address", "reason"), [
    ("a..b@rcpt.example", "double dot"),
    (".a@rcpt.example", "leading"),
    ("a.@rcpt.example", "trailing"),
    ("x" * 65 + "@rcpt.example", "64 octets"),
    ("a@-rcpt.example", "host name"),
    ("a@rcpt-.example", "host name"),
    ("a@rc_pt.example", "host name"),
    ("a@" + "l" * 64 + ".example", "host name"),
    ("a@192.0.2.1", "number"),
    ("a@[192.0.2.1]", "not a valid address"),
    ('"a b"@rcpt.example', "not a valid address"),
    ("a@rcpt", "not a valid address"),
    ("ame\u0301lie@rcpt.example", "normal form C"),  # e + combining acute: not NFC
])
def test_addresses_outside_rfc_5321_syntax_are_refused(world: dict[str, Any], address: str,
                                                       reason: str) -> None:
    s = world["s"]
    err = refused(world, errors.InvalidInput,
                  lambda: s.create_task(task(recipients=[{"email": address}])))
    assert reason in str(err)
    refused(world, errors.InvalidInput, lambda: s.suppress(address))
    refused(world, errors.InvalidInput, lambda: s.upsert_contacts("u1", [{"email": address}]))
    refused(world, errors.InvalidInput, lambda: s.create_task(
        task(templates=[{**GOOD, "reply_to": address}])))


@pytest.mark.parametrize("address", ["amélie@rcpt.example", "用户@例子.广告", "a@bücher.example",
                                     "o'brien+tag@rcpt.example", "a@xn--bcher-kva.example"])
def test_internationalised_addresses_are_accepted_for_smtputf8(world: dict[str, Any],
                                                               address: str) -> None:
    created = world["s"].create_task(task(recipients=[{"email": address}]))
    assert created.recipients == 1 and created.invalid == []


def test_size_limits(world: dict[str, Any]) -> None:
    s = world["s"]
    refused(world, errors.PayloadTooLarge, lambda: s.create_task(
        task(recipients=[{"email": "a@rcpt.example", "vars": {"blob": "x" * 5_000_000}}])))
    refused(world, errors.PayloadTooLarge, lambda: s.create_task(task(recipients=[
        {"email": "a@rcpt.example", "vars": {"order": {"lines": ["x" * 1000] * 70}}}])))
    refused(world, errors.PayloadTooLarge, lambda: s.create_task(task(recipients=[
        {"email": "a@rcpt.example", "vars": {f"k{i}": "é" * 300 for i in range(120)}}])))
    refused(world, errors.PayloadTooLarge, lambda: s.upsert_contacts(
        "u1", [{"email": "a@rcpt.example", "attributes": {"blob": "x" * 70_000}}]))
    refused(world, errors.InvalidInput, lambda: s.create_task(
        task(templates=[{**GOOD, "body_html": "x" * 1_000_001}])))
    refused(world, errors.InvalidInput, lambda: s.create_task(
        task(templates=[{**GOOD, "subject": "x" * 999}])))
    refused(world, errors.PayloadTooLarge, lambda: s.create_task(
        task(templates=[{**GOOD, "body_text": "x" * 1_000_000}] * 11)))
    # at the limits: accepted
    assert s.create_task(task(recipients=[{"email": "a@rcpt.example",
                                           "vars": {"blob": "x" * 60_000}}])).recipients == 1
