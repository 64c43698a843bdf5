"""Rendering: template + recipient variables → an RFC 5322 message.

The default renderer runs Jinja2's ``SandboxedEnvironment`` (templates are
written by the platform's customers: no attribute access to Python internals)
with ``StrictUndefined``, so a variable missing for one recipient is a clear
error for that recipient — use ``{{ name | default('there') }}`` for optional
ones. HTML bodies are autoescaped. A host renders itself by passing its own
``Renderer`` to ``run_dispatcher(renderer=...)``.

Header injection is impossible by construction: headers are set through
:class:`email.message.EmailMessage`, which refuses CR or LF in a header value,
and a rendering error fails only that subtask (permanently, with the reason).
"""

from __future__ import annotations

import email.policy
import email.utils
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

import jinja2
import jinja2.sandbox

from edm_sched.transports.base import Message, ServiceConfig


@dataclass(frozen=True)
class TemplateRow:
    subject: str
    body_text: str | None
    body_html: str | None
    from_name: str | None = None
    reply_to: str | None = None


@dataclass(frozen=True)
class RenderContext:
    subtask_id: int
    task_id: int
    user_id: str
    email: str
    variables: Mapping[str, Any]
    template: TemplateRow


@dataclass(frozen=True)
class Rendered:
    subject: str
    text: str | None
    html: str | None


Renderer = Callable[[RenderContext], Rendered]


class RenderError(Exception):
    """A template could not be rendered for one recipient."""


_text_env = jinja2.sandbox.SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)
_html_env = jinja2.sandbox.SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=True)


@functools.lru_cache(maxsize=4096)
def _compile(source: str, html: bool) -> jinja2.Template:
    return (_html_env if html else _text_env).from_string(source)


def default_renderer(ctx: RenderContext) -> Rendered:
    """Render subject and bodies with the sandboxed Jinja2 environment."""
    variables = {"email": ctx.email, **ctx.variables}
    try:
        t = ctx.template
        return Rendered(
            subject=_compile(t.subject, False).render(variables),
            text=None if t.body_text is None else _compile(t.body_text, False).render(variables),
            html=None if t.body_html is None else _compile(t.body_html, True).render(variables),
        )
    except jinja2.TemplateError as exc:
        raise RenderError(f"template error: {type(exc).__name__}: {exc}") from exc


def message_id(subtask_id: int, task_id: int, sender: str) -> str:
    """Deterministic Message-ID: a resend after a crash carries the same id (dedupe downstream)."""
    domain = sender.rpartition("@")[2] or "edm-sched.invalid"
    return f"<edm.{task_id}.{subtask_id}@{domain}>"


def build_message(service: ServiceConfig, ctx: RenderContext, rendered: Rendered) -> Message:
    """Assemble the wire message; raises RenderError for anything unsendable."""
    if not service.from_addresses:
        raise RenderError(f"service {service.name} has no sender address")
    sender = service.from_addresses[0]
    mid = message_id(ctx.subtask_id, ctx.task_id, sender)
    msg = EmailMessage(policy=email.policy.SMTP)
    try:
        from_name = ctx.template.from_name
        msg["From"] = email.utils.formataddr((from_name, sender)) if from_name else sender
        msg["To"] = ctx.email
        msg["Subject"] = rendered.subject
        msg["Message-ID"] = mid
        msg["Date"] = email.utils.formatdate(localtime=False)
        msg["X-Edm-Service"] = str(service.service_id)
        msg["X-Edm-Task"] = str(ctx.task_id)
        if ctx.template.reply_to:
            msg["Reply-To"] = ctx.template.reply_to
        if rendered.text is not None:
            msg.set_content(rendered.text)
        if rendered.html is not None:
            if rendered.text is None:
                msg.set_content(rendered.html, subtype="html")
            else:
                msg.add_alternative(rendered.html, subtype="html")
        data = msg.as_bytes()
    except (ValueError, TypeError) as exc:  # CR/LF in a header, undefined charset...
        raise RenderError(f"cannot build message: {exc}") from exc
    return Message(subtask_id=ctx.subtask_id, task_id=ctx.task_id, message_id=mid,
                   sender=sender, recipient=ctx.email, data=data)
