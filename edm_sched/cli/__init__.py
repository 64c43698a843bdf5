"""The ``edm-sched`` command line: one module per command group.

* :mod:`edm_sched.cli.app`: the parser, global options and ``main()``;
* :mod:`edm_sched.cli.base`: what every command shares (database, output, exit codes);
* :mod:`edm_sched.cli.schema`: ``migrate``;
* :mod:`edm_sched.cli.demo`: ``demo`` and ``embedded`` (the ``demo`` extra);
* :mod:`edm_sched.cli.ops`: ``dispatch``, ``sweep``, ``status``, ``top``, ``config``;
* :mod:`edm_sched.cli.jobs`: ``jobs ...``.

Command modules import :mod:`~edm_sched.cli.base` only, never each other or ``app``.
"""

from edm_sched.cli.app import build_parser, main
from edm_sched.cli.base import EXIT_ERROR, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, database, emit

__all__ = ["EXIT_ERROR", "EXIT_OK", "EXIT_UNAVAILABLE", "EXIT_USAGE", "build_parser", "database",
           "emit", "main"]
