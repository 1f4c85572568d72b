"""Lint and strict types are part of the suite, so CI (which runs the suite) enforces them:
ruff with the complexity limits of pyproject.toml (lesson 10), and strict mypy over every
module listed there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support import REPO

BIN = Path(sys.executable).parent


def run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / tool), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def test_ruff_finds_nothing() -> None:
    result = run("ruff", "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_finds_nothing() -> None:
    result = run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_checks_every_package() -> None:
    """A new module cannot slip past the type check: every package is in `files`."""
    import tomllib

    files = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]["files"]
    packages = {p.parent.name for p in REPO.glob("rbee*/__init__.py")}
    assert packages <= set(files)
