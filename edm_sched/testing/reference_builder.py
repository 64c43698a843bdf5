"""The message builder ``edm_sched.rendering.build_message`` replaced.

``email.message.EmailMessage`` under ``email.policy.SMTP``: slower, but the
standard library's own reading of the RFCs. One copy, used as the oracle of
the rendering tests and as the baseline of ``python -m benchmarks render``.
"""

from __future__ import annotations

import email.policy
import email.utils
from email.message import EmailMessage

from edm_sched.rendering import RenderContext, Rendered, RenderError, message_id
from edm_sched.transports.base import Message, ServiceConfig


def email_message_builder(service: ServiceConfig, ctx: RenderContext,
                          rendered: Rendered) -> Message:
    """The builder before: EmailMessage(policy=email.policy.SMTP)."""
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
    except (ValueError, TypeError) as exc:
        raise RenderError(f"cannot build message: {exc}") from exc
    return Message(subtask_id=ctx.subtask_id, task_id=ctx.task_id, message_id=mid,
                   sender=sender, recipient=ctx.email, data=data)
