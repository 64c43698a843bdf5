"""Dispatch ``python -m benchmarks SCENARIO ...`` to ``benchmarks/<scenario>.py``'s ``main``."""

from __future__ import annotations

import importlib
import sys

SCENARIOS = {
    # scenario name -> module in this package exposing main(argv: list[str]) -> int
    "s1": "s1",
    "s2": "s2",
    "s3": "s3",
    "scale": "scale",
    "lag": "lag",
    "jobs": "jobs",
    "chaos": "chaos",
    "expansion": "expansion",
    "render": "render",
    "claimprofile": "claimprofile",
    "limits": "limits",
    "faults": "faults",
    "shaped": "shaped",
    "floor": "floor",
    "cpu": "cpu",
    "drain": "drain",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in SCENARIOS:
        names = ", ".join(sorted(SCENARIOS)) or "(none yet)"
        print(f"usage: python -m benchmarks SCENARIO [--dsn DSN] [--json]\nscenarios: {names}")
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    module = importlib.import_module(f"benchmarks.{SCENARIOS[argv[0]]}")
    return int(module.main(argv[1:]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
