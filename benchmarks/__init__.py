"""Benchmarks: ``python -m benchmarks SCENARIO [--dsn DSN] [--json]``.

Each scenario builds its own data (on an embedded PostgreSQL unless --dsn is
given), runs, and prints a table with its scale and figures; with --json it
prints one JSON object on its last line. Figures are never asserted in tests.
"""
