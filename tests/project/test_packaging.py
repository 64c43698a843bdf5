"""A lean install: the runtime needs only its runtime dependencies; the demo's
embedded PostgreSQL and SMTP server come with the ``demo`` extra, and their
absence is reported by name."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import edm_sched

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path(edm_sched.__file__).parent
# Import name → distribution name, where they differ.
DISTRIBUTION = {"psycopg_pool": "psycopg-pool", "prometheus_client": "prometheus-client"}
OPTIONAL_PARTS = ("demo", "testing")


def _project() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]  # type: ignore[no-any-return]


def _names(requirements: object) -> set[str]:
    assert isinstance(requirements, list)
    return {re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0].lower() for r in requirements}


def _third_party_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return {n for n in found if n not in sys.stdlib_module_names and n != "edm_sched"}


def test_runtime_dependencies_are_what_the_runtime_imports() -> None:
    project = _project()
    runtime = _names(project["dependencies"])
    assert not runtime & {"pgserver", "aiosmtpd", "platformdirs"}
    assert all("[binary]" not in r for r in project["dependencies"])  # type: ignore[attr-defined]
    imported: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        if parts[0] in OPTIONAL_PARTS or path.stem in ("embedded", "smtp_sink"):
            continue
        imported |= {DISTRIBUTION.get(n, n).lower() for n in _third_party_imports(path)}
    # An optional feature may import what its own extra brings (feedback: cryptography),
    # never what only the dev extra has.
    extras = project["optional-dependencies"]
    assert isinstance(extras, dict)
    optional = set().union(*(_names(v) for k, v in extras.items() if k not in ("dev", "bench")))
    assert imported - runtime - optional == set(), "imported by the runtime but not a dependency"
    assert runtime - imported == set(), "a dependency the runtime never imports"


def test_extras_bring_the_demo_and_the_binary_driver() -> None:
    extras = _project()["optional-dependencies"]
    assert isinstance(extras, dict)
    assert {"pgserver", "aiosmtpd"} <= _names(extras["demo"])
    assert any(r.startswith("psycopg[binary]") for r in extras["binary"])
    assert "edm-sched" in _names(extras["dev"])  # dev includes the demo extra
    imported = set().union(*(_third_party_imports(p) for part in OPTIONAL_PARTS
                             for p in (PACKAGE / part).rglob("*.py")))
    assert imported - _names(_project()["dependencies"]) - {"psycopg_pool"} <= _names(
        extras["demo"])


def test_missing_demo_extra_is_named_with_the_install_command() -> None:
    # pgserver made unimportable in a child process, as on a host without the extra.
    code = ("import sys; sys.modules['pgserver'] = None\n"
            "from edm_sched.cli import main\n"
            "sys.exit(main(['status']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin"}, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr
    assert "MISSING_EXTRA" in proc.stderr
    assert "pip install 'edm-sched[demo]'" in proc.stderr
    assert "--dsn" in proc.stderr
