"""The wheel of this very rbee that agent installs upload to nodes (B06)."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from rbee_agent import __version__
from rbee_tui.wheel import build_wheel, required_python
from tests.support import REPO


def source_files(package: str) -> set[str]:
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations
    root = Path(next(iter(spec.submodule_search_locations)))
    return {f"{package}/{p.relative_to(root).as_posix()}" for p in root.rglob("*.py")
            if "__pycache__" not in p.parts}


def test_b06_wheel_holds_this_rbee_with_its_metadata(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    assert wheel.path.name == f"rbee-{__version__}-py3-none-any.whl"
    info = f"rbee-{__version__}.dist-info"
    with zipfile.ZipFile(wheel.path) as zf:
        names = set(zf.namelist())
        assert source_files("rbee_agent") | source_files("rbee_tui") <= names
        assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
        metadata = zf.read(f"{info}/METADATA").decode()
        assert f"Version: {__version__}" in metadata and "Name: rbee" in metadata
        assert "Provides-Extra: agent" in metadata
        assert "Requires-Dist: llama-cpp-python==0.3.36; extra == 'agent'" in metadata
        assert "Tag: py3-none-any" in zf.read(f"{info}/WHEEL").decode()
        assert "rbee-agent = rbee_agent.cli:main" in zf.read(f"{info}/entry_points.txt").decode()
        record = zf.read(f"{info}/RECORD").decode().splitlines()
        listed = {line.split(",")[0] for line in record}
        assert listed == names
        for line in record:
            name, digest, size = line.rsplit(",", 2)
            if name == f"{info}/RECORD":
                assert (digest, size) == ("", "")
                continue
            data = zf.read(name)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            assert digest == f"sha256={expected.decode()}" and int(size) == len(data), name


def test_b06_wheel_is_reproducible(tmp_path: Path) -> None:
    assert build_wheel(tmp_path / "a").sha256 == build_wheel(tmp_path / "b").sha256


def test_b06_python_floor_follows_requires_python() -> None:
    assert required_python() == (3, 11)  # pyproject's requires-python is stricter than B06


def test_b06_a_regular_install_rebuilds_the_same_wheel(tmp_path: Path) -> None:
    """Built from an editable install (this checkout), installed for real, built again from
    that installed copy: byte for byte the same wheel."""
    first = build_wheel(tmp_path / "first")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-index", "--target", str(target), str(first.path)],
                   check=True, timeout=120)
    code = (
        "import sys, rbee_agent\n"
        "from pathlib import Path\n"
        "from rbee_tui.wheel import build_wheel\n"
        "print(rbee_agent.__file__)\n"
        "print(build_wheel(Path(sys.argv[1])).sha256)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "second")],
                         env={**os.environ, "PYTHONPATH": str(target)}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    origin, sha = out.stdout.split()
    assert origin.startswith(str(target)) and not origin.startswith(str(REPO))
    assert sha == first.sha256
