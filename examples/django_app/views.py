"""The view: the request's own row and its campaign, in the request's transaction."""

from __future__ import annotations

import functools
import json
import os

from django.db import connection, transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from edm_sched import InvalidInput, Scheduler


@functools.cache
def scheduler() -> Scheduler:
    """One Scheduler per process (its small pool serves calls made without conn=)."""
    return Scheduler(os.environ["EDM_SCHED_DSN"], min_size=1, max_size=2)


@csrf_exempt
@require_POST
def create_newsletter(request: HttpRequest) -> JsonResponse:
    body = json.loads(request.body)
    with connection.cursor() as cur:  # the request's transaction (ATOMIC_REQUESTS)
        cur.execute("CREATE TABLE IF NOT EXISTS public.newsletters (id serial PRIMARY KEY,"
                    " user_id text NOT NULL, subject text NOT NULL, task_id bigint)")
        cur.execute("INSERT INTO public.newsletters (user_id, subject) VALUES (%s, %s)"
                    " RETURNING id", [body["user_id"], body["subject"]])
        newsletter_id = cur.fetchone()[0]
    s = scheduler()
    conn = connection.connection  # Django's psycopg 3 connection, inside the transaction
    s.upsert_user(body["user_id"], conn=conn)
    try:
        created = s.create_task({
            "user_id": body["user_id"], "name": body["subject"],
            "templates": [{"subject": body["subject"], "body_text": "Hello!"}],
            "recipients": [{"email": e} for e in body["emails"]]}, conn=conn)
    except InvalidInput as exc:
        transaction.set_rollback(True)  # the newsletter row goes too
        return JsonResponse({"error": exc.code, "message": str(exc)}, status=422)
    with connection.cursor() as cur:
        cur.execute("UPDATE public.newsletters SET task_id = %s WHERE id = %s",
                    [created.task_id, newsletter_id])
    if body.get("fail_after_create"):  # a later step of the request fails
        transaction.set_rollback(True)
        return JsonResponse({"error": "payment failed: nothing was kept"}, status=409)
    return JsonResponse({"newsletter_id": newsletter_id, "task_id": created.task_id,
                         "recipients": created.recipients}, status=201)
