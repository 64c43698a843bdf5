"""Deprecated: moved to :mod:`edm_sched.testing.smtp_sink` (the ``demo`` extra)."""

from __future__ import annotations

import sys
import warnings

from edm_sched.testing.smtp_sink import Received, SmtpSink, main, read_log

warnings.warn("edm_sched.smtp_sink moved to edm_sched.testing.smtp_sink",
              DeprecationWarning, stacklevel=2)

__all__ = ["Received", "SmtpSink", "read_log"]

if __name__ == "__main__":
    sys.exit(main())
