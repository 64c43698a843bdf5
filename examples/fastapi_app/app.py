"""An async backend (FastAPI) that creates a campaign inside the request's transaction.

POST /newsletters stores the host's own row (a newsletter) and creates its
edm-sched campaign in ONE transaction: both commit, or (when the request fails
after the campaign was created) neither. Run it with::

    EDM_SCHED_DSN=postgresql://... uvicorn app:app   # from examples/fastapi_app/

(uvicorn is not a dependency of edm-sched; tests/api/test_examples.py drives the
app with FastAPI's TestClient.)
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from edm_sched import AsyncScheduler, InvalidInput

SCHEMA = """
CREATE TABLE IF NOT EXISTS public.newsletters (
  id serial PRIMARY KEY, user_id text NOT NULL, subject text NOT NULL, task_id bigint)
"""


class NewsletterIn(BaseModel):
    user_id: str
    subject: str
    emails: list[str]
    fail_after_create: bool = False  # simulates a later step of the request failing


def create_app(dsn: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The app's own pool (its transactions) and edm-sched's (calls without conn=).
        async with AsyncConnectionPool(dsn, open=False) as pool, AsyncScheduler(dsn) as sched:
            async with pool.connection() as conn:
                await conn.execute(SCHEMA)
            app.state.pool, app.state.scheduler = pool, sched
            yield

    app = FastAPI(lifespan=lifespan)

    @app.post("/newsletters", status_code=201)
    async def create_newsletter(body: NewsletterIn, request: Request) -> dict[str, Any]:
        sched: AsyncScheduler = request.app.state.scheduler
        async with request.app.state.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "INSERT INTO public.newsletters (user_id, subject) VALUES (%s, %s) RETURNING id",
                (body.user_id, body.subject))
            row = await cur.fetchone()
            assert row is not None
            await sched.upsert_user(body.user_id, conn=conn)
            try:
                created = await sched.create_task({
                    "user_id": body.user_id, "name": body.subject,
                    "templates": [{"subject": body.subject, "body_text": "Hello!"}],
                    "recipients": [{"email": e} for e in body.emails]}, conn=conn)
            except InvalidInput as exc:  # leaving the block rolls the newsletter back too
                raise HTTPException(422, detail=f"{exc.code}: {exc}") from None
            await conn.execute("UPDATE public.newsletters SET task_id = %s WHERE id = %s",
                               (created.task_id, row[0]))
            if body.fail_after_create:
                raise HTTPException(409, detail="payment failed: nothing was kept")
        return {"newsletter_id": row[0], "task_id": created.task_id,
                "recipients": created.recipients}

    @app.get("/tasks/{task_id}")
    async def task_status(task_id: int, request: Request) -> dict[str, Any]:
        status = await request.app.state.scheduler.get_task(task_id)
        return status.model_dump(mode="json")  # type: ignore[no-any-return]

    return app


if os.environ.get("EDM_SCHED_DSN"):
    app = create_app(os.environ["EDM_SCHED_DSN"])
