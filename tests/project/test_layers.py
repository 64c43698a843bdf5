"""The package's layers, read from the source (AST): no cycles, no upward imports.

Every ``import`` counts, at module level or inside a function: a lazy import
hides a dependency from the reader as much as from the interpreter.
"""

from __future__ import annotations

import ast
from pathlib import Path

import edm_sched

PACKAGE = Path(edm_sched.__file__).parent

# Optional or outer parts; everything else is the runtime core.
FEATURES = ("edm_sched.jobs",)
SHELLS = ("edm_sched.cli", "edm_sched.demo", "edm_sched.testing")
# Kept only so old import paths still work (they warn); they may point anywhere.
SHIMS = {"edm_sched.embedded", "edm_sched.smtp_sink"}
# Developer tools that may use the embedded server.
TOOLS = {"edm_sched.schema_dump"}
# The host's entry point composes the core and the features (scheduler.jobs); nothing
# in the core imports it.
FACADE = {"edm_sched.api"}


def _name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """module → the edm_sched modules it imports (a package's submodule when named)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] == "edm_sched")
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                if base.split(".")[0] != "edm_sched":
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    deps.add(sub if sub in modules else base)
        deps.discard(name)
        graph[name] = {d for d in deps if d in modules}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                found.append([*stack[stack.index(dep):], dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def _in(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_no_import_cycles() -> None:
    # A package's __init__ that re-exports its submodules is not a cycle with them.
    graph = {m: {d for d in deps if not m.startswith(d + ".")}
             for m, deps in import_graph().items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_core_never_imports_features_or_shells() -> None:
    wrong = []
    for module, deps in import_graph().items():
        if module in SHIMS or module in TOOLS or _in(module, SHELLS):
            continue
        allowed_up = FEATURES if _in(module, FEATURES) or module in FACADE else ()
        for dep in deps:
            if _in(dep, SHELLS) or (_in(dep, FEATURES) and not _in(dep, allowed_up)):
                wrong.append(f"{module} imports {dep}")
    assert wrong == []


def test_only_the_features_and_shells_import_the_facade() -> None:
    wrong = [f"{m} imports {d}" for m, deps in import_graph().items() for d in deps
             if d in FACADE and not (_in(m, FEATURES) or _in(m, SHELLS) or m in SHIMS
                                     or m in TOOLS or m == "edm_sched")]
    assert wrong == []


def test_demo_and_test_servers_never_import_the_cli() -> None:
    wrong = [f"{m} imports {d}" for m, deps in import_graph().items()
             if _in(m, ("edm_sched.demo", "edm_sched.testing")) for d in deps
             if _in(d, ("edm_sched.cli",))]
    assert wrong == []


def test_cli_commands_import_only_the_shared_base() -> None:
    """One module per command group: they share edm_sched.cli.base, never each other."""
    graph = import_graph()
    commands = [m for m in graph if m.startswith("edm_sched.cli.")
                and m not in ("edm_sched.cli.app", "edm_sched.cli.base", "edm_sched.cli.__main__")]
    assert len(commands) >= 4
    wrong = [f"{m} imports {d}" for m in commands for d in graph[m]
             if _in(d, ("edm_sched.cli",)) and d != "edm_sched.cli.base"]
    assert wrong == []


def test_moved_modules_still_import_with_a_deprecation_warning() -> None:
    import importlib
    import sys

    import pytest

    for old, new, name in [("edm_sched.embedded", "edm_sched.demo.embedded", "EmbeddedPostgres"),
                           ("edm_sched.smtp_sink", "edm_sched.testing.smtp_sink", "SmtpSink")]:
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match=new):
            module = importlib.import_module(old)
        assert getattr(module, name) is getattr(importlib.import_module(new), name)
