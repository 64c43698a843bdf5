"""The demo and the embedded PostgreSQL: optional, installed with the ``demo`` extra.

``pip install 'edm-sched[demo]'`` adds ``pgserver`` (PostgreSQL binaries in a
wheel) and ``aiosmtpd`` (the local SMTP server the demo sends to). Nothing in
the runtime package imports this one.

* :mod:`edm_sched.demo.run`: ``run_demo()``, behind ``edm-sched demo``;
* :mod:`edm_sched.demo.embedded`: ``EmbeddedPostgres``, the server used when
  no DSN is given.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_demo"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing edm_sched.demo.embedded does not need aiosmtpd.
    if name == "run_demo":
        from edm_sched.demo.run import run_demo

        return run_demo
    raise AttributeError(name)
