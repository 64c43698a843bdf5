"""Expansion of recipients into subtasks: explicit lists and tag rules, edge cases.

Everything goes through :class:`Scheduler` except where a test needs a step the
host API does not expose on its own (creating a rule task without expanding
it, expanding exactly one chunk), where it calls the SQL function the API
calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

from edm_sched import errors
from edm_sched.api import InvalidRecipients, Scheduler
from tests.support.helpers import TEMPLATE, at, reset_database

TEMPLATES = [{"subject": f"v{i}", "body_text": f"variant {i}"} for i in range(3)]


@pytest.fixture
def sched(dsn: str) -> Iterator[Scheduler]:
    with Scheduler(dsn) as s:
        yield s


def list_task(s: Scheduler, user: str, emails: list[str], **kw: Any) -> Any:
    return s.create_task({"user_id": user, "name": "list", "templates": [TEMPLATE],
                          "scheduled_at": at(0),
                          "recipients": [{"email": e} for e in emails], **kw})


def rule_task(s: Scheduler, user: str, rule: dict[str, list[str]], **kw: Any) -> Any:
    return s.create_task({"user_id": user, "name": "rule", "templates": [TEMPLATE],
                          "scheduled_at": at(0), "rule": rule, **kw})


def create_rule_unexpanded(conn: psycopg.Connection[Any], user: str, rule: dict[str, Any],
                           templates: list[dict[str, str]] | None = None) -> tuple[int, int]:
    """Step one of Scheduler.create_task(rule=...): the task and its reservation, no subtasks."""
    row = conn.execute(
        "SELECT task_id, recipients FROM edm.create_task_from_rule(%s, 'rule', %s, %s, 0, %s)",
        (user, Jsonb(templates or [TEMPLATE]), Jsonb(rule), at(0))).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def subtasks(conn: psycopg.Connection[Any], task_id: int) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT email, contact_id, template_idx, vars FROM edm.subtasks WHERE task_id = %s"
        " ORDER BY subtask_id", (task_id,)).fetchall()


def task_row(conn: psycopg.Connection[Any], task_id: int) -> tuple[Any, ...]:
    row = conn.execute(
        "SELECT status, total_count, pending_count, quota_reserved, expansion_cursor"
        " FROM edm.tasks WHERE task_id = %s", (task_id,)).fetchone()
    assert row is not None
    return tuple(row)


def nothing_written(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT (SELECT count(*) FROM edm.tasks) + (SELECT count(*) FROM"
                       " edm.subtasks) + (SELECT count(*) FROM edm.templates)").fetchone()
    return row is not None and row[0] == 0


def contacts(s: Scheduler, user: str, spec: dict[str, list[str]],
             unsubscribed: tuple[str, ...] = ()) -> None:
    s.upsert_contacts(user, [{"email": e, "tags": tags, "unsubscribed": e in unsubscribed}
                             for e, tags in spec.items()])


# --------------------------------------------------------------------- no work


def test_rule_without_match_completes_at_once_and_reserves_nothing(
        sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("u", quota_limit=5)
    contacts(sched, "u", {"a@x.example": ["news"], "b@x.example": ["promo"]})
    created = rule_task(sched, "u", {"include_any": ["nobody-has-this"]})
    assert created.recipients == 0
    st = sched.get_task(created.task_id)
    assert (st.status, st.total_count, st.pending_count) == ("completed", 0, 0)
    assert st.finished_at is not None
    assert sched.get_user("u").quota_used == 0
    assert task_row(conn, created.task_id)[3] == 0  # quota_reserved


def test_empty_list_is_refused_at_the_door(sched: Scheduler) -> None:
    sched.upsert_user("u", quota_limit=0)
    with pytest.raises(errors.NoRecipients):  # issue 16: nothing to send is a caller's mistake
        list_task(sched, "u", [])
    assert sched.tasks("u") == []


def test_a_list_left_empty_completes_at_once(sched: Scheduler) -> None:
    sched.upsert_user("u", quota_limit=0)  # a zero quota still allows an empty task
    sched.suppress("gone@x.example")
    created = list_task(sched, "u", ["gone@x.example"])
    assert created.recipients == 0
    assert sched.get_task(created.task_id).status == "completed"
    assert sched.get_user("u").quota_used == 0


def test_all_suppressed(sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("u", quota_limit=10)
    sched.upsert_user("other")
    sched.suppress("a@x.example")  # for everyone
    sched.suppress("B@X.example", user_id="u")  # for u only (normalised on the way in)
    sched.suppress("c@x.example", user_id="other")  # another tenant's: does not apply to u
    created = list_task(sched, "u", ["a@x.example", "b@x.example", " A@X.EXAMPLE"])
    assert (created.recipients, created.duplicates, created.suppressed) == (0, 1, 2)
    assert sched.get_task(created.task_id).status == "completed"
    contacts(sched, "u", {"a@x.example": ["t"], "b@x.example": ["t"]})
    by_rule = rule_task(sched, "u", {"include_all": ["t"]})
    assert by_rule.recipients == 0
    assert sched.get_task(by_rule.task_id).status == "completed"
    assert sched.get_user("u").quota_used == 0
    # the other tenant's suppression is its own
    third = list_task(sched, "u", ["c@x.example"])
    assert third.recipients == 1 and subtasks(conn, third.task_id)[0][0] == "c@x.example"


# ----------------------------------------------------------------- duplicates


def test_case_and_whitespace_variants_are_one_recipient(
        sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("u")
    created = sched.create_task({
        "user_id": "u", "name": "dups", "templates": [TEMPLATE], "scheduled_at": at(0),
        "recipients": [
            {"email": "Ann@Example.com", "vars": {"first_name": "first"}},
            {"email": "  ann@example.com"},
            {"email": "ANN@EXAMPLE.COM   ", "vars": {"first_name": "third"}},
            {"email": "ann@example.com"},
            {"email": "bob@example.com"},
        ]})
    assert (created.recipients, created.duplicates) == (2, 3)
    # the first occurrence wins, stored normalised
    assert [(e, v) for e, _, _, v in subtasks(conn, created.task_id)] == [
        ("ann@example.com", {"first_name": "first"}), ("bob@example.com", None)]
    assert sched.get_user("u").quota_used == 2


# ------------------------------------------------------------------- unicode


def test_unicode_addresses(sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    """What the SQL accepts outside ASCII.

    * Letters outside ASCII, in the local part and the domain, are accepted
      (SMTPUTF8, RFC 6531): 'josé@exämple.com', Greek, CJK.
    * Normalisation is the database's ``lower(btrim())``: whether 'JOSÉ'
      folds to 'josé' depends on the database's LC_CTYPE (it does under
      C.UTF-8 or en_US.UTF-8, not under plain C). The test asks the database
      rather than assuming; ASCII letters always fold.
    * No IDNA conversion: 'user@exämple.com' and its A-label
      'user@xn--exmple-cua.com' are two different addresses.
    * Invisible characters are refused, not silently kept: a non-breaking
      space (often pasted from a spreadsheet), zero-width spaces, soft hyphen,
      bidi controls, BOM. 'ann@example.com' + U+00A0 would otherwise be a
      second recipient for the same mailbox.
    """
    sched.upsert_user("u")
    given = ["josé@exämple.com", "JOSÉ@EXÄMPLE.COM", "δοκιμή@παράδειγμα.δοκιμή",
             "用户@例子.广告", "user@exämple.com", "user@xn--exmple-cua.com", "Zoë@Example.COM"]
    folded = [r[0] for r in conn.execute(
        "SELECT edm.normalize_email(e) FROM unnest(%s::text[]) WITH ORDINALITY AS x(e, i)"
        " ORDER BY i", (given,))]
    assert folded[-1].startswith("zo") and folded[-1].endswith("@example.com")
    created = list_task(sched, "u", given)
    distinct = list(dict.fromkeys(folded))
    assert created.recipients == len(distinct) and created.invalid == []
    assert [e for e, *_ in subtasks(conn, created.task_id)] == distinct
    assert "user@exämple.com" in distinct and "user@xn--exmple-cua.com" in distinct

    invisible = ["ann@example.com\u00a0", "ann\u200b@example.com", "\ufeffann@example.com",
                 "ann@exam\u00adple.com", "ann\u202e@example.com"]
    with pytest.raises(InvalidRecipients) as caught:
        list_task(sched, "u", ["ann@example.com", *invisible])
    assert [(r.position, r.email) for r in caught.value.report] == [
        (i + 1, e) for i, e in enumerate(invisible)]
    assert {r.reason for r in caught.value.report} == {
        "contains invisible or non-breaking space characters"}


# ---------------------------------------------------------- invalid addresses

BAD = [
    ("", "empty address"),
    ("   ", "empty address"),
    ("no-at-sign.example.com", "missing @"),
    ("two@@example.com", "not a valid address"),
    ("a b@example.com", "not a valid address"),
    ("user@localhost", "not a valid address"),
    ("<user@example.com>", "not a valid address"),
    ("user@example.com\r\nBcc: victim@example.com", "contains control characters (CR, LF, NUL...)"),
    ("x" * 250 + "@example.com", "longer than 254 characters"),
]


def test_invalid_addresses_refuse_the_task_with_a_report(
        sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("u", quota_limit=100)
    emails = ["ok1@example.com"]
    for bad, _ in BAD:
        emails += [bad, f"ok{len(emails)}@example.com"]
    with pytest.raises(InvalidRecipients) as caught:
        list_task(sched, "u", emails)
    err = caught.value
    assert isinstance(err, errors.InvalidInput) and err.code == "INVALID_RECIPIENTS"
    assert [(r.position, r.email, r.reason) for r in err.report] == [
        (1 + 2 * i, bad, reason) for i, (bad, reason) in enumerate(BAD)]
    assert "position 1" in str(err)
    # nothing is half-written (I8)
    assert nothing_written(conn)
    assert sched.get_user("u").quota_used == 0


def test_on_invalid_skip_creates_the_valid_part(
        sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("u", quota_limit=100)
    emails = ["ok1@example.com", "bad", "ok2@example.com", "a b@example.com", "OK1@example.com"]
    created = list_task(sched, "u", emails, on_invalid="skip")
    assert (created.recipients, created.duplicates) == (2, 1)
    assert [(r.position, r.email) for r in created.invalid] == [(1, "bad"),
                                                                 (3, "a b@example.com")]
    assert [e for e, *_ in subtasks(conn, created.task_id)] == ["ok1@example.com",
                                                                "ok2@example.com"]
    assert sched.get_user("u").quota_used == 2


# ---------------------------------------------------------------------- quota


def test_quota_exceeded_by_a_list_writes_nothing(sched: Scheduler,
                                                 conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("u", quota_limit=3)
    sched.suppress("gone@example.com")
    with pytest.raises(errors.QuotaExceeded):
        list_task(sched, "u", [f"r{i}@example.com" for i in range(4)])
    assert nothing_written(conn) and sched.get_user("u").quota_used == 0
    # the quota counts recipients after dedupe and suppression: exactly 3 fit
    created = list_task(sched, "u", ["r0@example.com", "R0@example.com", "gone@example.com",
                                     "r1@example.com", "r2@example.com"])
    assert created.recipients == 3 and sched.get_user("u").quota_used == 3
    before = conn.execute("SELECT count(*) FROM edm.tasks").fetchone()
    with pytest.raises(errors.QuotaExceeded):
        list_task(sched, "u", ["r9@example.com"])
    assert conn.execute("SELECT count(*) FROM edm.tasks").fetchone() == before
    assert sched.get_user("u").quota_used == 3


def test_quota_exceeded_by_a_rule_writes_nothing(sched: Scheduler,
                                                 conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("u", quota_limit=2)
    contacts(sched, "u", {f"c{i}@example.com": ["t"] for i in range(3)})
    with pytest.raises(errors.QuotaExceeded):
        rule_task(sched, "u", {"include_any": ["t"]})
    assert nothing_written(conn) and sched.get_user("u").quota_used == 0
    # an unsubscribed or suppressed match is not reserved: then it fits
    sched.suppress("c0@example.com")
    created = rule_task(sched, "u", {"include_any": ["t"]})
    assert created.recipients == 2 and sched.get_user("u").quota_used == 2


def test_expansion_never_exceeds_its_reservation(sched: Scheduler,
                                                 conn: psycopg.Connection[Any]) -> None:
    """Contacts that start matching between creation and expansion are left out.

    Before the fix, the last chunk added them and charged the difference to
    the user: past a quota limit the CHECK on edm.users failed, every retry
    failed the same way, and the task stayed 'expanding' forever.
    """
    sched.upsert_user("u", quota_limit=3)
    contacts(sched, "u", {f"c{i}@example.com": ["t"] for i in range(3)})
    task_id, reserved = create_rule_unexpanded(conn, "u", {"include_any": ["t"]})
    assert reserved == 3
    contacts(sched, "u", {"late@example.com": ["t"]})  # a concurrent import
    assert sched.expand(task_id, chunk=2) == 3
    assert task_row(conn, task_id)[:4] == ("scheduled", 3, 3, 3)
    assert sched.get_user("u").quota_used == 3
    # and the other way: a match suppressed meanwhile is refunded at the end
    sched.set_user_quota("u", 10)
    task2, reserved2 = create_rule_unexpanded(conn, "u", {"include_any": ["t"]})
    assert reserved2 == 4 and sched.get_user("u").quota_used == 7
    sched.suppress("c1@example.com")
    assert sched.expand(task2) == 3
    assert task_row(conn, task2)[:4] == ("scheduled", 3, 3, 3)
    assert sched.get_user("u").quota_used == 6


# ---------------------------------------------------------- rule semantics

TAG_SETS = st.sets(st.sampled_from("abcd"), max_size=4)


def _matches(rule: dict[str, list[str]], tags: set[str]) -> bool:
    return ((not rule["include_any"] or bool(tags & set(rule["include_any"])))
            and set(rule["include_all"]) <= tags
            and not tags & set(rule["exclude"]))


@pytest.mark.slow  # a hypothesis property over generated contact sets
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(people=st.lists(st.tuples(TAG_SETS, st.booleans()), max_size=12),
       rule=st.fixed_dictionaries({
           "include_any": st.lists(st.sampled_from("abcd"), max_size=3, unique=True),
           "include_all": st.lists(st.sampled_from("abcd"), max_size=2, unique=True),
           "exclude": st.lists(st.sampled_from("abcde"), max_size=2, unique=True),
       }).filter(lambda r: bool(r["include_any"] or r["include_all"])))
def test_include_any_all_and_exclude(dsn: str, people: list[tuple[set[str], bool]],
                                     rule: dict[str, list[str]]) -> None:
    """include_any: at least one of; include_all: every one of; exclude: none of.

    Both includes given means both must hold. Unsubscribed contacts never
    match. The expansion equals the rule evaluated in Python and agrees with
    edm.rule_matches(), the display form of the same predicate.
    """
    with psycopg.connect(dsn, autocommit=True) as conn, Scheduler(dsn) as s:
        reset_database(conn)
        s.upsert_user("u")
        s.upsert_user("other")
        book = {f"c{i}@example.com": (tags, unsub) for i, (tags, unsub) in enumerate(people)}
        if book:
            s.upsert_contacts("u", [{"email": e, "tags": sorted(t), "unsubscribed": x}
                                    for e, (t, x) in book.items()])
            # another tenant's contacts with the same tags never leak in
            s.upsert_contacts("other", [{"email": e, "tags": sorted(t)}
                                        for e, (t, _) in book.items()])
        created = rule_task(s, "u", rule)
        want = [e for e, (tags, unsub) in book.items() if not unsub and _matches(rule, tags)]
        got = [e for e, *_ in subtasks(conn, created.task_id)]
        assert got == want  # in contact order
        assert created.recipients == len(want)
        sql_view = [r[0] for r in conn.execute(
            "SELECT email FROM edm.contacts WHERE user_id = 'u' AND NOT unsubscribed"
            " AND edm.rule_matches(%s, tags) ORDER BY contact_id", (Jsonb(rule),))]
        assert sql_view == want


def test_unsubscribed_contacts_are_excluded(sched: Scheduler,
                                            conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("u")
    sched.upsert_user("other")
    contacts(sched, "u", {"in@example.com": ["t"], "out@example.com": ["t"]},
             unsubscribed=("out@example.com",))
    contacts(sched, "other", {"in@example.com": ["t"]}, unsubscribed=("in@example.com",))
    by_rule = rule_task(sched, "u", {"include_all": ["t"]})
    assert [e for e, *_ in subtasks(conn, by_rule.task_id)] == ["in@example.com"]
    # an explicit list drops the user's own unsubscribed contacts too (counted as suppressed)
    by_list = list_task(sched, "u", ["in@example.com", "OUT@example.com", "new@example.com"])
    assert (by_list.recipients, by_list.suppressed) == (2, 1)
    assert [e for e, *_ in subtasks(conn, by_list.task_id)] == ["in@example.com",
                                                                 "new@example.com"]
    # re-importing the contact does not resubscribe it
    contacts(sched, "u", {"out@example.com": ["t"]})
    assert rule_task(sched, "u", {"include_all": ["t"]}).recipients == 1


# ----------------------------------------------------------------- templates


def test_templates_rotate_across_recipients(sched: Scheduler,
                                            conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("u")
    by_list = sched.create_task({"user_id": "u", "name": "l", "templates": TEMPLATES,
                                 "scheduled_at": at(0),
                                 "recipients": [{"email": f"r{i}@example.com"}
                                                for i in range(7)]})
    assert [t for _, _, t, _ in subtasks(conn, by_list.task_id)] == [0, 1, 2, 0, 1, 2, 0]
    contacts(sched, "u", {f"c{i}@example.com": ["t"] for i in range(7)})
    task_id, _ = create_rule_unexpanded(conn, "u", {"include_any": ["t"]}, TEMPLATES)
    sched.expand(task_id, chunk=2)  # rotation continues across chunks
    assert [t for _, _, t, _ in subtasks(conn, task_id)] == [0, 1, 2, 0, 1, 2, 0]
    rows = conn.execute("SELECT task_id, template_idx, subject FROM edm.templates"
                        " WHERE task_id = %s ORDER BY template_idx", (task_id,)).fetchall()
    assert [r[2] for r in rows] == ["v0", "v1", "v2"]


# ------------------------------------------------------------------ chunking


def test_chunked_expansion_resumes_after_a_crash(sched: Scheduler,
                                                 conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("u", quota_limit=100)
    book = {f"c{i:02}@example.com": (["t"] if i % 4 else ["t", "x"]) for i in range(20)}
    contacts(sched, "u", book, unsubscribed=("c05@example.com",))
    sched.suppress("c07@example.com")
    rule = {"include_any": ["t"], "include_all": [], "exclude": ["x"]}
    # the reference: one-shot expansion through the host API
    oneshot = sched.create_task({"user_id": "u", "name": "rule", "templates": TEMPLATES,
                                 "scheduled_at": at(0), "rule": rule})
    assert oneshot.recipients == 13  # 20 - 5 excluded - 1 unsubscribed - 1 suppressed

    task_id, reserved = create_rule_unexpanded(conn, "u", rule, TEMPLATES)
    assert reserved == 13 and sched.get_user("u").quota_used == 26
    # one chunk commits, then the process dies in the middle of the next one
    assert conn.execute("SELECT added, done FROM edm.expand_task(%s, 4)",
                        (task_id,)).fetchone() == (4, False)
    after_first = task_row(conn, task_id)
    assert after_first[:4] == ("expanding", 4, 4, 13)
    with pytest.raises(RuntimeError), conn.transaction():
        conn.execute("SELECT edm.expand_task(%s, 4)", (task_id,))
        raise RuntimeError("crash inside the second chunk")
    assert task_row(conn, task_id) == after_first  # rolled back: nothing half-written
    # a restarted expansion finishes from the cursor
    assert sched.expand(task_id, chunk=3) == 9
    assert subtasks(conn, task_id) == subtasks(conn, oneshot.task_id)
    assert task_row(conn, task_id) == task_row(conn, oneshot.task_id) == (
        "scheduled", 13, 13, 13, None)
    assert sched.get_user("u").quota_used == 26
    # expanding a finished task again is a no-op
    assert sched.expand(task_id, chunk=3) == 0


def test_chunk_of_exactly_the_remaining_size(sched: Scheduler,
                                             conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("u")
    contacts(sched, "u", {f"c{i}@example.com": ["t"] for i in range(6)})
    task_id, _ = create_rule_unexpanded(conn, "u", {"include_any": ["t"]})
    steps = [conn.execute("SELECT added, done FROM edm.expand_task(%s, 3)",
                          (task_id,)).fetchone() for _ in range(3)]
    assert steps == [(3, False), (3, False), (0, True)]
    assert task_row(conn, task_id)[:3] == ("scheduled", 6, 6)


def test_cancel_during_expansion_refunds_the_unexpanded_part(
        sched: Scheduler, conn: psycopg.Connection[Any]) -> None:
    sched.upsert_user("u", quota_limit=10)
    contacts(sched, "u", {f"c{i}@example.com": ["t"] for i in range(6)})
    task_id, _ = create_rule_unexpanded(conn, "u", {"include_any": ["t"]})
    conn.execute("SELECT edm.expand_task(%s, 2)", (task_id,))
    assert sched.get_user("u").quota_used == 6
    assert sched.cancel_task(task_id) == 2
    assert sched.get_user("u").quota_used == 0
    assert task_row(conn, task_id)[:4] == ("cancelled", 2, 0, 0)
    assert sched.expand(task_id) == 0  # a late expander stops
