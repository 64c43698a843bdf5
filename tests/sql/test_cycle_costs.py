"""0026: what a claim and a completion stopped paying for still behaves as before.

* The claim ranks ready services as a top-N list of ids (2 x batch + 8) and
  locks them from it; a call whose list gives nothing ranks the services it has
  not seen yet, so a service far down the ranking is still reached.
* The checks of a service's custom headers and quota time zone are a trigger
  on writes of those columns: refused with check_violation and the same
  constraint names as the CHECK constraints they replace, on insert and update.
* ``edm.config_int`` / ``edm.config_num`` (PL/pgSQL now) see a new value at
  once, within a session that has already read the old one.
* The site-suspension statement triggers keep ``services.site_rules_until``
  right when a statement changes nothing, and when it changes something.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from edm_sched.api import Scheduler
from tests.support.helpers import T0, at, claim_v2, make_service, make_task


@pytest.mark.parametrize("batch", [1, 3])
def test_a_claim_reaches_past_its_first_ranked_list(
        dsn: str, conn: psycopg.Connection[Any], batch: int) -> None:
    listed = 2 * batch + 8  # the first list's length
    with Scheduler(dsn) as s:
        s.upsert_user("a")
        # ready services with nobody to serve rank first (equal quota share and
        # success rate: by id), the one with work comes after the first list
        empty = [make_service(s, f"idle{i}", interval=0) for i in range(listed + 5)]
        sid = make_service(s, "last", interval=0, users=["a"])
        make_task(s, "a", 5)
    conn.execute("SELECT edm.start_due_tasks(%s)", (T0,))
    rows = claim_v2(conn, at(1), batch=batch, per_service=1)
    assert [r["service_id"] for r in rows] == [sid]
    assert max(empty) < sid


def test_ranked_services_are_served_in_quota_share_order(
        dsn: str, conn: psycopg.Connection[Any]) -> None:
    """The list keeps the ranking: the least used quota first, across passes too."""
    with Scheduler(dsn) as s:
        s.upsert_user("a")
        sids = [make_service(s, f"s{i}", interval=0, users=["a"]) for i in range(14)]
        make_task(s, "a", 40)
    conn.execute("SELECT edm.start_due_tasks(%s)", (T0,))
    # sent_today of service k is 14 - k: the last created has used least
    for k, sid in enumerate(sids):
        conn.execute("UPDATE edm.services SET sent_today = %s, quota_day = %s::date"
                     " WHERE service_id = %s", (14 - k, T0.date(), sid))
    rows = claim_v2(conn, at(1), batch=12, per_service=1)
    assert [r["service_id"] for r in rows] == list(reversed(sids))[:12]


@pytest.mark.parametrize(("column", "value", "constraint"), [
    ("settings", json.dumps({"headers": {"Date": "x"}}), "services_headers_ok"),
    ("settings", json.dumps({"headers": {"X-A": "a\nb"}}), "services_headers_ok"),
    ("quota_tz", "Mars/Olympus_Mons", "services_quota_tz_check"),
])
def test_a_bad_service_setting_is_refused_as_a_check_violation(
        dsn: str, conn: psycopg.Connection[Any], column: str, value: str,
        constraint: str) -> None:
    with Scheduler(dsn) as s:
        sid = make_service(s, "svc", interval=0)
    before = conn.execute("SELECT settings, quota_tz FROM edm.services WHERE service_id = %s",
                          (sid,)).fetchone()
    cast = "::jsonb" if column == "settings" else ""
    with pytest.raises(psycopg.errors.CheckViolation) as err:
        conn.execute(f"UPDATE edm.services SET {column} = %s{cast} WHERE service_id = %s",
                     (value, sid))
    assert err.value.diag.constraint_name == constraint
    assert err.value.diag.table_name == "services"
    with pytest.raises(psycopg.errors.CheckViolation) as err:
        conn.execute(
            f"INSERT INTO edm.services (name, from_addresses, interval_ms, daily_quota, {column})"
            f" VALUES ('new', ARRAY['a@b.example'], 0, 1, %s{cast})", (value,))
    assert err.value.diag.constraint_name == constraint
    after = conn.execute("SELECT settings, quota_tz FROM edm.services WHERE service_id = %s",
                         (sid,)).fetchone()
    assert after == before
    # a good value still goes in, and other columns are written without the check
    conn.execute("UPDATE edm.services SET quota_tz = 'Europe/Paris',"
                 " settings = '{\"headers\": {\"X-Campaign\": \"spring\"}}' WHERE service_id = %s",
                 (sid,))
    conn.execute("UPDATE edm.services SET sent_today = 3 WHERE service_id = %s", (sid,))


def test_config_reads_see_a_new_value_at_once(conn: psycopg.Connection[Any]) -> None:
    old = conn.execute("SELECT edm.config_int('queue.max_attempts'),"
                       " edm.config_num('queue.transactional_share')").fetchone()
    assert old is not None and old[0] is not None and old[1] is not None
    conn.execute("SELECT edm.config_set('queue.max_attempts', '7')")
    conn.execute("SELECT edm.config_set('queue.transactional_share', '0.5')")
    new = conn.execute("SELECT edm.config_int('queue.max_attempts'),"
                       " edm.config_num('queue.transactional_share')").fetchone()
    assert new == (7, 0.5)
    assert conn.execute("SELECT edm.config_int('no.such.key')").fetchone() == (None,)


def test_site_rules_until_survives_statements_that_change_nothing(
        dsn: str, conn: psycopg.Connection[Any]) -> None:
    with Scheduler(dsn) as s:
        sid = make_service(s, "svc", interval=0)
    conn.execute("SELECT edm.suspend_site(%s, 'google', %s, 'test')", (sid, at(60)))
    # statements on edm.site_suspensions that touch no row fire the statement triggers
    conn.execute("UPDATE edm.site_suspensions SET until = until WHERE false")
    conn.execute("DELETE FROM edm.site_suspensions WHERE false")
    conn.execute("INSERT INTO edm.site_suspensions (service_id, site, until, level, reason,"
                 " created_at) SELECT service_id, site, until, level, reason, created_at"
                 " FROM edm.site_suspensions WHERE false")
    until = conn.execute("SELECT site_rules_until FROM edm.services WHERE service_id = %s",
                         (sid,)).fetchone()
    assert until == (at(60),)
    conn.execute("DELETE FROM edm.site_suspensions WHERE service_id = %s", (sid,))
    until = conn.execute("SELECT site_rules_until FROM edm.services WHERE service_id = %s",
                         (sid,)).fetchone()
    assert until == (None,)
