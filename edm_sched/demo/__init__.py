"""The demo and the embedded PostgreSQL: optional, installed with the ``demo`` extra.

``pip install 'edm-sched[demo]'`` adds ``pgserver`` (PostgreSQL binaries in a
wheel) and ``aiosmtpd`` (the local SMTP server the demo sends to). Nothing in
the runtime package imports this one.

* :mod:`edm_sched.demo.run`: ``run_demo()``, behind ``edm-sched demo``;
* :mod:`edm_sched.demo.embedded`: ``EmbeddedPostgres``, the server used when
  no DSN is given.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from edm_sched import errors

__all__ = ["MissingExtra", "require", "run_demo"]

INSTALL_HINT = "pip install 'edm-sched[demo]'"


class MissingExtra(errors.ConfigurationError, ImportError):
    """A part of the ``demo`` extra (pgserver, aiosmtpd) is not installed."""

    code = "MISSING_EXTRA"


def require(module: str, what: str) -> ModuleType:
    """Import ``module``, or raise MissingExtra saying which extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = module.split(".")[0]
        raise MissingExtra(
            f"{what} needs the 'demo' extra ({package} is not installed): {INSTALL_HINT}"
            + ("; or give --dsn / EDM_SCHED_DSN to use your own PostgreSQL"
               if package in ("pgserver", "platformdirs") else "")) from exc


def __getattr__(name: str) -> Any:
    # Lazy, so that importing edm_sched.demo.embedded does not need aiosmtpd.
    if name == "run_demo":
        from edm_sched.demo.run import run_demo

        return run_demo
    raise AttributeError(name)
