"""The command line explains itself: --version, help on every command and
option, and --dsn / --json accepted before or after the command."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator

import pytest

import edm_sched
from edm_sched.cli import build_parser


def _walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.Action,
                                                                         argparse.ArgumentParser]]:
    for action in parser._actions:
        yield path, action, parser
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _walk(child, f"{path} {name}")


def test_every_command_and_option_has_help() -> None:
    missing: list[str] = []
    for path, action, _ in _walk(build_parser(), "edm-sched"):
        if isinstance(action, argparse._SubParsersAction):
            helped = {a.dest for a in action._choices_actions if a.help}
            missing += [f"{path} {name}" for name in action.choices if name not in helped]
        elif not action.help:
            name = "/".join(action.option_strings) or action.dest
            missing.append(f"{path} {name}")
    assert missing == []


def test_version() -> None:
    proc = subprocess.run([sys.executable, "-m", "edm_sched.cli", "--version"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0
    assert proc.stdout.startswith(f"edm-sched {edm_sched.__version__}")


@pytest.mark.parametrize("argv", [
    ["--dsn", "X", "--json", "status"],
    ["status", "--dsn", "X", "--json"],
    ["--dsn", "X", "status", "--json"],
    ["--json", "jobs", "list", "--dsn", "X"],
    ["--dsn", "X", "jobs", "list", "--json"],
])
def test_dsn_and_json_before_or_after_the_command(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert args.dsn == "X" and args.json is True


def test_no_dsn_anywhere_is_none() -> None:
    args = build_parser().parse_args(["status"])
    assert args.dsn is None and args.json is False
