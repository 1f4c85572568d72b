"""The node side never imports the operator's UI or SSH stack (lesson 1)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import rbee_agent
from tests.support import REPO


def agent_modules() -> list[str]:
    return sorted(
        m.name for m in pkgutil.walk_packages(rbee_agent.__path__, "rbee_agent.")
        if not m.name.endswith("__main__")
    )


def test_every_rbee_agent_module_imports_without_textual_or_asyncssh() -> None:
    modules = agent_modules()
    assert "rbee_agent.worker.engine" in modules and "rbee_agent.protocol" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'asyncssh'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"rbee_agent pulled in: {out.stdout.strip()}"


def test_operator_side_imports_no_agent_dependencies() -> None:
    """`pip install rbee[operator]` must be enough to run rbee (no fastapi, no llama.cpp)."""
    import rbee_tui

    modules = sorted(m.name for m in pkgutil.walk_packages(rbee_tui.__path__, "rbee_tui.")
                     if not m.name.endswith("__main__"))
    assert "rbee_tui.app" in modules and "rbee_tui.ssh" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'fastapi', 'uvicorn', 'starlette', 'llama_cpp', 'gguf', 'psutil', 'pynvml'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"rbee_tui pulled in: {out.stdout.strip()}"
