"""The example apps of examples/: a task created inside a request, in the request's
transaction, commits with the request's own row or rolls back with it."""

from __future__ import annotations

import json
import os
from typing import Any

import psycopg
import pytest


def _rows(conn: psycopg.Connection[Any]) -> tuple[int, int, int]:
    def one(sql: Any) -> int:
        row = conn.execute(sql).fetchone()
        assert row is not None
        return int(row[0])
    return (one("SELECT count(*) FROM public.newsletters"),
            one("SELECT count(*) FROM edm.tasks"), one("SELECT count(*) FROM edm.subtasks"))


def test_fastapi_app(dsn: str, conn: psycopg.Connection[Any]) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from examples.fastapi_app.app import create_app

    with TestClient(create_app(dsn)) as client:
        ok = client.post("/newsletters", json={"user_id": "acme", "subject": "March",
                                               "emails": ["a@r.example", "b@r.example"]})
        assert ok.status_code == 201, ok.text
        assert ok.json()["recipients"] == 2
        assert _rows(conn) == (1, 1, 2)
        assert client.get(f"/tasks/{ok.json()['task_id']}").json()["total_count"] == 2
        failed = client.post("/newsletters", json={"user_id": "acme", "subject": "April",
                                                   "emails": ["c@r.example"],
                                                   "fail_after_create": True})
        assert failed.status_code == 409
        bad = client.post("/newsletters", json={"user_id": "acme", "subject": "May",
                                                "emails": ["not an address"]})
        assert bad.status_code == 422 and "INVALID_RECIPIENTS" in bad.text
    assert _rows(conn) == (1, 1, 2)  # the failed requests left nothing


def test_django_app(dsn: str, conn: psycopg.Connection[Any],
                    monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("django")
    import django
    from django.conf import settings

    monkeypatch.setenv("EDM_SCHED_DSN", dsn)
    if settings.configured:
        pytest.skip("Django was configured by another test in this process")
    os.environ["DJANGO_SETTINGS_MODULE"] = "examples.django_app.settings"
    try:
        django.setup()
        from django.db import connections
        from django.test import Client

        from examples.django_app import views

        client = Client()
        try:
            ok = client.post("/newsletters", json.dumps(
                {"user_id": "acme", "subject": "March", "emails": ["a@r.example"]}),
                content_type="application/json")
            assert ok.status_code == 201, ok.content
            assert _rows(conn) == (1, 1, 1)
            failed = client.post("/newsletters", json.dumps(
                {"user_id": "acme", "subject": "April", "emails": ["b@r.example"],
                 "fail_after_create": True}), content_type="application/json")
            assert failed.status_code == 409
            bad = client.post("/newsletters", json.dumps(
                {"user_id": "acme", "subject": "May", "emails": ["nope"]}),
                content_type="application/json")
            assert bad.status_code == 422
            assert _rows(conn) == (1, 1, 1)  # the failed requests left nothing
        finally:
            connections.close_all()
            views.scheduler().close()
            views.scheduler.cache_clear()
    finally:
        os.environ.pop("DJANGO_SETTINGS_MODULE", None)
