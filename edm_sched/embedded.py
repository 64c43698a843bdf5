"""Deprecated: moved to :mod:`edm_sched.demo.embedded` (the ``demo`` extra)."""

from __future__ import annotations

import warnings

from edm_sched.demo.embedded import DATA_ENV, EmbeddedPostgres, default_data_dir

warnings.warn("edm_sched.embedded moved to edm_sched.demo.embedded",
              DeprecationWarning, stacklevel=2)

__all__ = ["DATA_ENV", "EmbeddedPostgres", "default_data_dir"]
