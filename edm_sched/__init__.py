"""edm-sched: a PostgreSQL-centric scheduler for the sending side of email marketing.

The rules (readiness, quotas, fair rotation, the atomic claim) live in SQL
functions of schema ``edm``; this package wraps them, runs the dispatcher loop
and the recovery sweeps.
"""

from edm_sched.errors import (
    ConfigRejected,
    ConfigurationError,
    DatabaseUnavailable,
    EdmSchedError,
    InvalidInput,
    InvalidTransition,
    LeaseLost,
    MigrationError,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
)
from edm_sched.migrations import migrate

__version__ = "0.1.0"

__all__ = [
    "ConfigRejected",
    "ConfigurationError",
    "DatabaseUnavailable",
    "EdmSchedError",
    "InvalidInput",
    "InvalidTransition",
    "LeaseLost",
    "MigrationError",
    "NotFound",
    "PermissionDenied",
    "QuotaExceeded",
    "migrate",
]
