"""Shared benchmark helpers: the server, timing, statistics, tables and JSON.

Reusable by every scenario module::

    from benchmarks import common

    args = common.parse_args("s1", argv, "what this scenario measures")
    with common.bench_server(args.dsn) as server:
        dsn = server.fresh_database("bench_s1")   # migrated, empty
        ...
        common.print_table("throughput", ["processes", "claims/s"], rows)
    common.finish(args, {"cycles_per_s": ...})

``bench_server(None)`` starts an embedded PostgreSQL in a new temporary
directory (removed afterwards) with a few benchmark settings applied;
``bench_server(dsn)`` uses that server and creates (then drops) its own
databases there, so the database named in the DSN is never touched.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import conninfo, sql

from edm_sched.migrations import migrate

# Settings applied to the embedded server before a run (ALTER SYSTEM + restart).
# The defaults of initdb (128 MB shared_buffers) are far from any production
# server; these stay modest for a shared 2-core machine. Durability settings
# (fsync, synchronous_commit) are left at their safe defaults: every figure,
# ours and the baselines', pays for a durable commit.
EMBEDDED_SETTINGS: dict[str, str] = {
    "shared_buffers": "1GB",
    "max_connections": "200",
    "max_wal_size": "4GB",
    "checkpoint_timeout": "15min",
    "wal_buffers": "16MB",
    "maintenance_work_mem": "512MB",
    "work_mem": "16MB",
}

REPORTED_SETTINGS = (
    "server_version", "shared_buffers", "synchronous_commit", "fsync", "wal_level",
    "max_wal_size", "autovacuum", "autovacuum_naptime", "jit",
)


# --------------------------------------------------------------------------- args


def parse_args(
    scenario: str,
    argv: Sequence[str],
    description: str,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """``--dsn`` (server to use instead of the embedded one), ``--json``, plus ``extra``."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {scenario}",
                                     description=description)
    parser.add_argument("--dsn", default=None,
                        help="PostgreSQL server to use (a fresh database is created on it "
                             "and dropped afterwards); default: an embedded server")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object with the figures on the last line")
    parser.add_argument("--keep", action="store_true",
                        help="keep the benchmark database (and embedded data directory)")
    if extra is not None:
        extra(parser)
    return parser.parse_args(list(argv))


def finish(args: argparse.Namespace, result: dict[str, Any]) -> int:
    """Print the JSON line when asked for; return the process exit code."""
    if getattr(args, "json", False):
        print(json.dumps(result, sort_keys=True, default=_json_default))
    return 0


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, Path):
        return str(value)
    return str(value)


def say(message: str) -> None:
    """Progress line (stderr, so that stdout holds the tables and the JSON)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------- server


@dataclass
class BenchServer:
    """A PostgreSQL server the benchmark may create databases on."""

    admin_dsn: str
    embedded: Any = None  # edm_sched.demo.embedded.EmbeddedPostgres when we started it
    data_dir: Path | None = None
    keep: bool = False
    created: list[str] = field(default_factory=list)

    def dsn(self, database: str) -> str:
        params = conninfo.conninfo_to_dict(self.admin_dsn)
        params["dbname"] = database
        return conninfo.make_conninfo(**{k: v for k, v in params.items() if v is not None})

    def uri(self, database: str) -> str:
        """The DSN of ``database`` as a postgresql:// URI (for clients such as asyncpg)."""
        return as_uri(self.dsn(database))

    def fresh_database(self, name: str, *, migrated: bool = True) -> str:
        """Drop and create database ``name`` (migrated to the latest schema); its DSN."""
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                         .format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        if name not in self.created:
            self.created.append(name)
        dsn = self.dsn(name)
        if migrated:
            migrate(dsn)
        return dsn

    def clone_database(self, source: str, name: str) -> str:
        """Drop ``name`` and create it as a copy of database ``source`` (no one may be
        connected to it); its DSN."""
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                         .format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}")
                         .format(sql.Identifier(name), sql.Identifier(source)))
        if name not in self.created:
            self.created.append(name)
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                         .format(sql.Identifier(name)))
        if name in self.created:
            self.created.remove(name)

    def settings(self) -> dict[str, str]:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            rows = conn.execute("SELECT name, current_setting(name) FROM pg_settings "
                                "WHERE name = ANY(%s)", (list(REPORTED_SETTINGS),)).fetchall()
        return {str(k): str(v) for k, v in rows}

    def describe(self) -> str:
        kind = "embedded (pgserver wheel)" if self.embedded is not None else "given by --dsn"
        return kind


def as_uri(dsn: str) -> str:
    """A libpq DSN (key=value or URI) as a postgresql:// URI; Unix-socket hosts go in ?host=."""
    from urllib.parse import quote, urlencode

    p = {k: v for k, v in conninfo.conninfo_to_dict(dsn).items() if v is not None}
    user = quote(str(p.pop("user", "")), safe="")
    password = p.pop("password", None)
    auth = f"{user}:{quote(str(password), safe='')}@" if password else (f"{user}@" if user else "")
    host = str(p.pop("host", ""))
    port = p.pop("port", None)
    query: dict[str, str] = {}
    if host.startswith("/"):
        query["host"] = host
        host = ""
    netloc = f"{auth}{host}" + (f":{port}" if port and host else "")
    if port and not host:
        query["port"] = str(port)
    dbname = quote(str(p.pop("dbname", "")), safe="")
    query.update({k: str(v) for k, v in p.items()})
    return f"postgresql://{netloc}/{dbname}" + (f"?{urlencode(query)}" if query else "")


@contextlib.contextmanager
def bench_server(dsn: str | None, *, keep: bool = False) -> Iterator[BenchServer]:
    """The server of a run: ``dsn``'s, or an embedded one in a new temporary directory."""
    if dsn:
        server = BenchServer(admin_dsn=dsn, keep=keep)
        try:
            yield server
        finally:
            if not keep:
                for name in list(server.created):
                    with contextlib.suppress(psycopg.Error):
                        server.drop_database(name)
        return
    from edm_sched.demo.embedded import EmbeddedPostgres

    root = Path(tempfile.mkdtemp(prefix="edm-bench-"))
    data = root / "pgdata"
    say("starting an embedded PostgreSQL in a fresh temporary directory")
    pg = EmbeddedPostgres(data)
    try:
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            for name, value in EMBEDDED_SETTINGS.items():
                conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(
                    sql.Identifier(name), sql.Literal(value)))
        pg.stop()  # shared_buffers needs a restart
        pg = EmbeddedPostgres(data)
        server = BenchServer(admin_dsn=pg.dsn(), embedded=pg, data_dir=data, keep=keep)
        yield server
    finally:
        pg.stop()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def pgbench_path() -> Path | None:
    """The pgbench binary: the embedded server's (pgserver wheel), else one on PATH."""
    with contextlib.suppress(ImportError):
        import pgserver

        candidate = Path(pgserver.__file__).parent / "pginstall" / "bin" / "pgbench"
        if candidate.exists():
            return candidate
    found = shutil.which("pgbench")
    return Path(found) if found else None


# ----------------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gb = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    return {"cpus": os.cpu_count(), "cpu_model": model, "memory_gb": mem_gb,
            "python": platform.python_version(), "system": platform.system()}


def print_header(title: str, server: BenchServer, scale: dict[str, Any]) -> dict[str, Any]:
    """Print the run's header (machine, server settings, scale); returns them for the JSON."""
    m = machine()
    settings = server.settings()
    print(f"\n=== {title} ===")
    print(f"machine : {m['cpus']} cores ({m['cpu_model']}), {m['memory_gb']} GB RAM, "
          f"Python {m['python']}")
    print(f"server  : PostgreSQL {settings.get('server_version', '?')}, {server.describe()}; "
          + ", ".join(f"{k}={v}" for k, v in settings.items() if k != "server_version"))
    print("scale   : " + ", ".join(f"{k}={_fmt(v)}" for k, v in scale.items()))
    load = load_average()
    print(f"load    : {load} (1/5/15 min load average at start; the machine is shared, so "
          "compare ratios measured in the same run)")
    sys.stdout.flush()
    return {"machine": m, "server": settings, "scale": scale, "load_at_start": load}


def load_average() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


# ------------------------------------------------------------------------ tables


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]],
                note: str | None = None) -> None:
    """A plain-text table (also valid Markdown)."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        print("| " + " | ".join(c.rjust(w) if i else c.ljust(w)
                                for i, (c, w) in enumerate(zip(r, widths, strict=True))) + " |")
    if note:
        print(note)
    sys.stdout.flush()


# -------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100), nearest-rank; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[k]


def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return float("nan")
    return a / b


class Stopwatch:
    """``with Stopwatch() as sw: ...; sw.seconds``."""

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


# ---------------------------------------------------------------- database stats


HOT_TABLES = ("subtasks", "tasks", "users", "services")


def table_stats(dsn: str, tables: Sequence[str] = HOT_TABLES,
                schema: str = "edm") -> list[dict[str, Any]]:
    """n_live_tup / n_dead_tup / vacuum counts of some tables (pg_stat_user_tables)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        rows = conn.execute(
            """
            SELECT relname, n_live_tup, n_dead_tup, n_tup_upd, n_tup_hot_upd,
                   autovacuum_count, vacuum_count,
                   pg_total_relation_size(relid) AS bytes
            FROM pg_stat_user_tables WHERE schemaname = %s AND relname = ANY(%s)
            ORDER BY array_position(%s::text[], relname::text)
            """, (schema, list(tables), list(tables))).fetchall()
    keys = ("table", "live", "dead", "updates", "hot_updates", "autovacuums", "vacuums", "bytes")
    return [dict(zip(keys, r, strict=True)) for r in rows]


def print_table_stats(title: str, stats: list[dict[str, Any]]) -> None:
    print_table(title, ["table", "live tuples", "dead tuples", "dead %", "updates", "HOT %",
                        "autovacuums", "size MB"],
                [[f"edm.{s['table']}", s["live"], s["dead"],
                  100.0 * s["dead"] / max(1, s["live"] + s["dead"]), s["updates"],
                  100.0 * s["hot_updates"] / max(1, s["updates"]), s["autovacuums"],
                  s["bytes"] / 1e6] for s in stats])


def wait_for_stats(seconds: float = 0.6) -> None:
    """Cumulative statistics are flushed by backends at most once a second or so."""
    time.sleep(seconds)


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MB (psutil, shipped with pgserver; else /proc)."""
    try:
        import psutil

        return float(psutil.Process(pid).memory_info().rss) / 1e6
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024 * 1.048576
    return float("nan")
