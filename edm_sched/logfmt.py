"""Structured log lines (logfmt: ``event=claimed n=5 dispatcher=host:42``)."""

from __future__ import annotations

import logging
from typing import Any


def _fmt(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' ="\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        parts = [f"event={_fmt(event)}", *(f"{k}={_fmt(v)}" for k, v in fields.items())]
        logger.log(level, " ".join(parts))
