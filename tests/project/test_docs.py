"""The docs cannot rot: every example in docs/ and README.md runs on a fresh database.

How a Markdown file is run (the same text is in docs/index.md, "How the examples
are tested"):

* Each file gets its own freshly migrated database; its fenced blocks run top to
  bottom, in document order, Python and SQL interleaved.
* ```python blocks share one namespace per file, with ``DSN`` predefined.
* ```sql blocks run through psycopg on an autocommit connection to the same
  database (several statements per block are fine; wrap staging-table work in
  BEGIN ... COMMIT as you would in psql).
* ```console and ```bash blocks: every line is ``edm-sched ...`` (optionally
  after ``$ ``) and runs as a subprocess with ``--dsn DSN`` appended. It must
  exit 0, or N when the line ends with ``# exit N``; with ``--json`` its last
  line must be JSON. Long-running commands (``dispatch``, ``jobs run``, ``demo``
  without ``--seconds``, ``top`` without ``--iterations``) are refused: show
  them in ```text blocks. ``jobs`` lines are skipped while the CLI has no
  ``jobs`` subcommand. The one exception is README.md's Quickstart block,
  checked against .ci/run instead.
* ```yaml blocks are parsed (when PyYAML is installed), ```json and ```ini
  blocks are parsed; ```text and ```mermaid blocks are not run. Any other info
  string, or none, is an error, so an example cannot silently escape the tests.

Besides: docs/reference/sql.md is regenerated and compared, the CLI and Python
references must name every option and public name, and relative links resolve.
"""

from __future__ import annotations

import argparse
import configparser
import difflib
import importlib.util
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
SQL_REFERENCE = DOCS / "reference" / "sql.md"
MARKDOWN = [README, *sorted(p for p in ROOT.glob("*.md") if p != README),
            *sorted(DOCS.rglob("*.md"))]

LANGUAGES = {"python", "sql", "console", "bash", "text", "ini", "yaml", "json", "mermaid"}
_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)[^`]*$")
_EXIT = re.compile(r"\s+#\s*exit\s+(\d+)\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the first line of code (after the opening fence)
    lang: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, in order."""
    found: list[Block] = []
    lines = path.read_text("utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m.group("fence"), len(m.group("indent"))
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not (lines[j].strip().startswith(fence[0] * len(fence))
                                      and set(lines[j].strip()) == {fence[0]}):
            body.append(lines[j][indent:] if lines[j][:indent].isspace() else lines[j])
            j += 1
        found.append(Block(path, i + 2, m.group("info").lower(), "\n".join(body)))
        i = j + 1
    return found


def quickstart_block() -> Block:
    """The first fenced block under README.md's ``## Quickstart`` heading."""
    text = README.read_text("utf-8")
    start = text.index("\n## Quickstart\n")
    heading_line = text[:start].count("\n") + 2
    return next(b for b in blocks(README) if b.line > heading_line)


def cli_parsers() -> dict[str, argparse.ArgumentParser]:
    from edm_sched.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for a in parser._actions for opt in a.option_strings if opt.startswith("--")}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "EDM_SCHED_DSN"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


# ---------------------------------------------------------------------------
# Running one file's examples
# ---------------------------------------------------------------------------


class Runner:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.namespace: dict[str, Any] = {"DSN": dsn, "__name__": "docs_example"}
        self.conn: psycopg.Connection[Any] | None = None
        self.quickstart = quickstart_block()
        self.commands = cli_parsers()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

    def run(self, block: Block) -> None:
        if block.lang not in LANGUAGES:
            pytest.fail(f"{block.where}: fenced block with info string {block.lang!r}; use one of "
                        f"{', '.join(sorted(LANGUAGES))} (text for what must not run)")
        getattr(self, f"run_{block.lang}", lambda b: None)(block)

    def run_python(self, block: Block) -> None:
        # Padding keeps line numbers, so tracebacks point into the Markdown file.
        code = compile("\n" * (block.line - 1) + block.code, str(block.path), "exec")
        exec(code, self.namespace)

    def run_sql(self, block: Block) -> None:
        if self.conn is None:
            self.conn = psycopg.connect(self.dsn, autocommit=True)
        try:
            cur = self.conn.execute(block.code.encode("utf-8"))
            while True:
                if cur.pgresult is not None and cur.description is not None:
                    cur.fetchall()
                if not cur.nextset():
                    break
        except psycopg.Error as exc:
            pytest.fail(f"{block.where}: SQL example failed: {exc}")

    def run_console(self, block: Block) -> None:
        if block == self.quickstart:
            return  # the install and test commands: test_ci_runs_the_readme_quickstart
        for k, raw in enumerate(block.code.splitlines()):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            line = line.removeprefix("$ ")
            if not line.startswith("edm-sched "):
                pytest.fail(f"{block.where}+{k}: only `edm-sched ...` lines may appear in a "
                            f"console/bash block (use ```text for the rest): {raw!r}")
            self.run_cli(block, k, line)

    run_bash = run_console

    def run_cli(self, block: Block, k: int, line: str) -> None:
        expected = 0
        m = _EXIT.search(line)
        if m:
            expected, line = int(m.group(1)), line[: m.start()]
        args = shlex.split(line, comments=True)[1:]
        where = f"{block.where}+{k}"
        command = next((a for a in args if not a.startswith("-")), "")
        if command == "jobs" and "jobs" not in self.commands:
            return  # recurring jobs are documented in docs/jobs.md; not installed yet
        long_running = (command == "dispatch"
                        or (command == "jobs" and "run" in args)
                        or (command == "demo" and "--seconds" not in args)
                        or (command == "top" and "--iterations" not in args))
        if long_running:
            pytest.fail(f"{where}: `{line}` runs until stopped; show it in a ```text block "
                        "(or bound it: top --iterations N, demo --seconds N)")
        proc = subprocess.run([sys.executable, "-m", "edm_sched.cli", *args, "--dsn", self.dsn],
                              capture_output=True, text=True, timeout=60, check=False,
                              cwd=ROOT, env=_env())
        assert proc.returncode == expected, (
            f"{where}: `{line}` exited {proc.returncode}, expected {expected}\n"
            f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}")
        if "--json" in args:
            last = proc.stdout.strip().splitlines()[-1]
            assert isinstance(json.loads(last), dict), f"{where}: last line is not a JSON object"

    def run_yaml(self, block: Block) -> None:
        try:
            yaml = importlib.import_module("yaml")
        except ImportError:
            return  # no PyYAML here: not a dependency of edm-sched
        try:
            list(yaml.safe_load_all(block.code))
        except yaml.YAMLError as exc:
            pytest.fail(f"{block.where}: YAML does not parse: {exc}")

    def run_json(self, block: Block) -> None:
        try:
            json.loads(block.code)
        except json.JSONDecodeError as exc:
            pytest.fail(f"{block.where}: JSON does not parse: {exc}")

    def run_ini(self, block: Block) -> None:
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        try:
            parser.read_string(block.code)
        except configparser.Error as exc:
            pytest.fail(f"{block.where}: INI does not parse: {exc}")


# Pages whose examples start many CLI processes, or run a dispatcher against a
# real SMTP server until its tasks finish (the tutorial, 2-3 s): the slow lane.
SLOW_PAGES = {DOCS / "jobs.md", DOCS / "reference" / "cli.md", DOCS / "tutorial.md"}


@pytest.mark.parametrize("path", [
    pytest.param(p, marks=pytest.mark.slow) if p in SLOW_PAGES else p for p in MARKDOWN],
    ids=[str(p.relative_to(ROOT)) for p in MARKDOWN])
def test_examples_run(path: Path, dsn: str) -> None:
    threads_before = set(threading.enumerate())
    runner = Runner(dsn)
    try:
        for block in blocks(path):
            runner.run(block)
    finally:
        runner.close()
    leftover = [t for t in set(threading.enumerate()) - threads_before
                if t.is_alive() and not t.daemon]
    assert leftover == [], f"{path.name}: examples left threads running: {leftover}"


# ---------------------------------------------------------------------------
# Generated and cross-checked references
# ---------------------------------------------------------------------------


def generator() -> ModuleType:
    """docs/gen_sql_reference.py, imported as a module."""
    spec = importlib.util.spec_from_file_location("gen_sql_reference",
                                                  DOCS / "gen_sql_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_sql_reference_is_current(dsn: str) -> None:
    fresh = generator().generate(dsn)
    committed = SQL_REFERENCE.read_text("utf-8")
    if fresh != committed:
        diff = "".join(list(difflib.unified_diff(
            committed.splitlines(keepends=True), fresh.splitlines(keepends=True),
            "committed docs/reference/sql.md", "generated from the catalog"))[:80])
        pytest.fail("docs/reference/sql.md is stale; regenerate it with\n"
                    "  python docs/gen_sql_reference.py --dsn DSN > docs/reference/sql.md\n"
                    "on a freshly migrated database.\n" + diff)


def test_sql_reference_covers_every_function_and_view(conn: psycopg.Connection[Any]) -> None:
    text = SQL_REFERENCE.read_text("utf-8")
    names = [r[0] for r in conn.execute(
        "SELECT proname::text FROM pg_proc WHERE pronamespace = 'edm'::regnamespace"
        " UNION SELECT relname::text FROM pg_class"
        " WHERE relnamespace = 'edm'::regnamespace AND relkind IN ('v', 'm')").fetchall()]
    missing = [n for n in names if f"### edm.{n}\n" not in text]
    assert missing == []


def test_cli_reference_covers_every_command_and_option() -> None:
    text = (DOCS / "reference" / "cli.md").read_text("utf-8")
    missing: list[str] = []
    for name, parser in cli_parsers().items():
        if f"edm-sched {name}" not in text:
            missing.append(f"edm-sched {name}")
        if name == "jobs":
            continue  # documented in docs/jobs.md, linked from the CLI reference
        missing += [f"{name} {opt}" for opt in sorted(_options(parser)) if f"`{opt}" not in text]
    for needed in ("EDM_SCHED_DSN", "--json", "jobs.md", "| 0 |", "| 1 |", "| 2 |", "| 3 |"):
        if needed not in text:
            missing.append(needed)
    assert missing == []


def test_python_reference_covers_the_public_api() -> None:
    import edm_sched
    from edm_sched import dispatcher, monitoring, transports
    from edm_sched.api import Scheduler

    text = (DOCS / "reference" / "python.md").read_text("utf-8")
    names = set(edm_sched.__all__) | set(transports.__all__)
    names |= {n for n in vars(Scheduler) if not n.startswith("_")}
    names |= set(inspect.signature(dispatcher.run_dispatcher).parameters)
    names |= {"status", "config_list", "config_get", "config_set"}
    names |= {n for n, c in vars(monitoring).items()
              if isinstance(c, type) and c.__module__ == monitoring.__name__
              and not n.startswith("_")}
    missing = sorted(n for n in names | _error_codes()
                     if f"`{n}" not in text and f"{n}(" not in text)
    assert missing == []


def _error_codes() -> set[str]:
    """The code of every error class, once the modules that define some are imported."""
    from edm_sched import api, errors, sweeps
    from edm_sched.jobs import errors as job_errors

    _ = (api, sweeps, job_errors)  # they define InvalidRecipients, SweepLockHeld, job errors
    seen: set[type[errors.EdmSchedError]] = set()
    todo: list[type[errors.EdmSchedError]] = [errors.EdmSchedError]
    while todo:
        cls = todo.pop()
        seen.add(cls)
        todo += cls.__subclasses__()
    return {cls.code for cls in seen}


# ---------------------------------------------------------------------------
# README, CI and links
# ---------------------------------------------------------------------------


def _tokens(command: str) -> list[str]:
    return [t for t in shlex.split(command) if t != "-q"]


def test_ci_runs_the_readme_quickstart() -> None:
    """.ci/run installs exactly as the Quickstart does (modulo -q) and runs its test command."""
    commands = [c.strip() for c in quickstart_block().code.splitlines() if c.strip()]
    assert len(commands) == 2, "the Quickstart block is: install (+ demo), then the tests"
    install, tests = commands
    steps = [s.strip() for s in install.split("&&")]
    demo = [s for s in steps if s.endswith("edm-sched demo")]
    assert demo == [steps[-1]], "the install line ends with the demo"
    install_tokens = _tokens(" && ".join(steps[:-1]))
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text("utf-8").splitlines()
                if ln.strip() and not ln.lstrip().startswith("#")]
    ci_tokens = [_tokens(ln) for ln in ci_lines]
    assert install_tokens in ci_tokens, f".ci/run lacks the Quickstart install step: {install}"
    assert _tokens(tests) in ci_tokens, f".ci/run lacks the Quickstart test command: {tests}"
    # The demo is not run by CI itself; the test suite runs it (tests/cli/test_demo.py).
    assert "demo" in (ROOT / "tests" / "cli" / "test_demo.py").read_text("utf-8")


def _anchors(path: Path) -> set[str]:
    found = set()
    in_code = False
    for line in path.read_text("utf-8").splitlines():
        if _FENCE.match(line):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _prose(path: Path) -> str:
    """The text of a Markdown file without its fenced blocks and inline code."""
    lines, in_code = [], False
    for line in path.read_text("utf-8").splitlines():
        if _FENCE.match(line):
            in_code = not in_code
        elif not in_code:
            lines.append(re.sub(r"(`+).*?\1", "", line))
    return "\n".join(lines)


def test_relative_links_resolve() -> None:
    broken = []
    for path in MARKDOWN:
        for target in _LINK.findall(_prose(path)):
            if re.match(r"^[a-z]+:", target):
                continue  # http(s), mailto
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []
