"""Destination sites (0015): domain map, resolver cache, suspensions."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from tests.support.helpers import at


def site_of(conn: psycopg.Connection[Any], email: str) -> str | None:
    row = conn.execute("SELECT edm.site_of(%s)", (email,)).fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def test_shipped_providers_are_mapped_by_the_domain_after_the_last_at(
        conn: psycopg.Connection[Any]) -> None:
    assert site_of(conn, "a@gmail.com") == "google"
    assert site_of(conn, "A@GoogleMail.COM") == "google"
    assert site_of(conn, "x@hotmail.co.uk") == "microsoft"
    assert site_of(conn, "x@aol.com") == "yahoo"
    for site in ("google", "microsoft", "yahoo", "apple", "qq", "netease", "mailru", "gmx",
                 "comcast"):
        n = conn.execute("SELECT count(*) FROM edm.site_domains WHERE site = %s",
                         (site,)).fetchone()
        assert n is not None and n[0] >= 1, site
    assert site_of(conn, "a@sub.gmail.com") is None  # subdomains are separate domains
    assert site_of(conn, "a@unknown.example") is None
    assert site_of(conn, "no-at-sign") is None


def test_admin_mapping_moves_a_domain_and_bad_input_writes_nothing(
        conn: psycopg.Connection[Any]) -> None:
    conn.execute("SELECT edm.set_site_domains('orange', ARRAY['orange.fr', 'Wanadoo.fr'])")
    assert site_of(conn, "x@wanadoo.fr") == "orange"
    conn.execute("SELECT edm.set_site_domains('orange', ARRAY['gmail.com'])")
    assert site_of(conn, "x@gmail.com") == "orange"
    for bad in ("SELECT edm.set_site_domains('Bad Name', ARRAY['x.com'])",
                "SELECT edm.set_site_domains('ok', ARRAY['a@b.com'])",
                "SELECT edm.set_site_domains('ok', ARRAY['x.com', NULL])"):
        with pytest.raises(psycopg.Error) as err:
            conn.execute(bad)
        assert err.value.sqlstate == "ED005"
    row = conn.execute("SELECT count(*) FROM edm.sites WHERE site IN ('ok', 'bad name')").fetchone()
    assert row == (0,)


def test_resolver_answers_are_cached_but_never_override_shipped_or_admin_rows(
        conn: psycopg.Connection[Any]) -> None:
    missing = conn.execute(
        "SELECT array_agg(d) FROM edm.unmapped_domains("
        "ARRAY['gmail.com', 'Corp.example', 'corp.example']) d").fetchone()
    assert missing == (["corp.example"],)
    conn.execute("SELECT edm.cache_site_domains(ARRAY['corp.example', 'gmail.com'],"
                 " ARRAY['google', 'mx-elsewhere'])")
    assert site_of(conn, "x@corp.example") == "google"
    assert site_of(conn, "x@gmail.com") == "google"  # shipped row kept
    # a new answer for a resolved row replaces it
    conn.execute("SELECT edm.cache_site_domains(ARRAY['corp.example'], ARRAY['microsoft'])")
    assert site_of(conn, "x@corp.example") == "microsoft"


def test_a_suspension_applies_until_its_end_then_expires_by_itself(
        conn: psycopg.Connection[Any]) -> None:
    sid = conn.execute("SELECT edm.create_service('s', ARRAY['a@example.com'], 0, 1000)").fetchone()
    assert sid is not None
    conn.execute("SELECT edm.suspend_site(%s, 'google', %s, 'test')", (sid[0], at(60)))
    sites = conn.execute("SELECT edm.suspended_sites(%s, %s)", (sid[0], at(59))).fetchone()
    assert sites == (["google"],)
    sites = conn.execute("SELECT edm.suspended_sites(%s, %s)", (sid[0], at(60))).fetchone()
    assert sites == ([],)
    with pytest.raises(psycopg.Error) as err:
        conn.execute("SELECT edm.suspend_site(%s, 'nosuchsite', %s)", (sid[0], at(1)))
    assert err.value.sqlstate == "ED001"
