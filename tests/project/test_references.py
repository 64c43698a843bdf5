"""References in code and docs point at things that exist.

Markdown links are checked by test_docs.py; this checks the rest: repository
paths named in prose, docstrings and comments (``docs/x.md#anchor``,
``tests/sql/test_x.py::test_name``), promise numbers (I1, I2, ...) against the
list in docs/index.md, and that nothing cites a design document or numbered
section that is not in the repository.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Migrations are immutable (checksummed) and sql/schema.sql is generated from them.
SOURCES = [p for pattern in ("*.md", "docs/**/*.md", "docs/*.py", "edm_sched/**/*.py",
                             "benchmarks/*.py", "tests/**/*.py", "sql/*.sql", "examples/**/*.py",
                             ".ci/run", "pyproject.toml")
           for p in sorted(ROOT.glob(pattern)) if p.name != "schema.sql"]

_PATH = re.compile(
    r"(?<![\w./-])((?:docs|tests|sql|edm_sched|benchmarks|examples|\.ci)/[\w./-]*\w)"
    r"(?:#([\w-]+)|::(\w+))?")
_PROMISE = re.compile(r"(?<![\w-])I(\d{1,2})(?![\w-])")


def _text(path: Path) -> str:
    return path.read_text("utf-8")


def _anchors(path: Path) -> set[str]:
    found, in_code = set(), False
    for line in _text(path).splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def test_repository_paths_named_in_code_and_docs_exist() -> None:
    broken = []
    for source in SOURCES:
        if source == Path(__file__).resolve():
            continue  # the examples in the docstring above
        for line_no, line in enumerate(_text(source).splitlines(), 1):
            for match in _PATH.finditer(line):
                target, anchor, test_name = match.groups()
                if any(c in target for c in "*<>{}") or "NNNN" in target:
                    continue  # a pattern, not a path
                if "." not in Path(target).name and not (ROOT / target).is_dir():
                    continue  # a word like tests/support without an extension: a directory
                dest = ROOT / target
                where = f"{source.relative_to(ROOT)}:{line_no}: {match.group(0)}"
                if not dest.exists():
                    broken.append(where)
                elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                    broken.append(f"{where} (no such heading)")
                elif test_name and not re.search(rf"def {test_name}\b", _text(dest)):
                    broken.append(f"{where} (no such test)")
    assert broken == []


def test_promises_cited_are_listed_in_the_design_goals() -> None:
    index = _text(ROOT / "docs" / "index.md")
    listed = set(re.findall(r"^\| I(\d+) \|", index, re.MULTILINE))
    unknown = []
    for source in SOURCES:
        for line_no, line in enumerate(_text(source).splitlines(), 1):
            unknown += [f"{source.relative_to(ROOT)}:{line_no}: I{n}"
                        for n in _PROMISE.findall(line) if n not in listed]
    assert unknown == [], "cite only promises listed in docs/index.md#design-goals"


def test_no_reference_to_documents_or_sections_outside_the_repository() -> None:
    found = []
    for source in SOURCES:
        if source == Path(__file__).resolve():
            continue
        for line_no, line in enumerate(_text(source).splitlines(), 1):
            # A section of a public standard (RFC 5321 §4.5.3.2) is a fine reference.
            if "design.md" in line or "§" in re.sub(r"RFC \d+ §[\d.]+", "", line):
                found.append(f"{source.relative_to(ROOT)}:{line_no}: {line.strip()[:80]}")
    assert found == [], "link to a page of docs/ (and its heading) instead"


_MODULE = re.compile(r"""(?:python -m |"-m", ")((?:edm_sched|tests|benchmarks)(?:\.\w+)*)""")


def test_modules_run_with_python_m_exist() -> None:
    missing = []
    for source in SOURCES:
        for line_no, line in enumerate(_text(source).splitlines(), 1):
            for module in _MODULE.findall(line):
                path = ROOT / module.replace(".", "/")
                if not (path.with_suffix(".py").exists() or (path / "__main__.py").exists()):
                    missing.append(f"{source.relative_to(ROOT)}:{line_no}: {module}")
    assert missing == []
