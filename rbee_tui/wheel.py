"""A wheel of the rbee that is running right now, built without a build backend (B06).

The agent install uploads this wheel to a node, so the node runs exactly the operator's
version and needs no access to this machine's source tree or to an index holding rbee.
The metadata (name, version, Requires-Dist, Provides-Extra, entry points) comes from the
installed distribution; the package files come from where `rbee_agent` and `rbee_tui` are
imported from, which is site-packages for a normal install and the source tree for an
editable one. The zip is deterministic: the same files give the same bytes.

This module must never import the packages' heavy dependencies or touch the network.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rbee_agent.protocol import ErrorCode, RbeeError

DIST_NAME = "rbee"
PACKAGES = ("rbee_agent", "rbee_tui")
MIN_PYTHON = (3, 10)  # B06; the distribution's Requires-Python may ask for more
# Never shipped: caches, editor leftovers, dotfiles and model files lying in a source tree.
SKIP_DIRS = {"__pycache__"}
SKIP_SUFFIXES = (".pyc", ".pyo", ".gguf", ".partial", ".orig", ".rej", "~")
ZIP_DATE = (1980, 1, 1, 0, 0, 0)
WHEEL_FILE = (
    "Wheel-Version: 1.0\nGenerator: rbee_tui.wheel\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
)


@dataclass(frozen=True)
class BuiltWheel:
    path: Path
    version: str
    sha256: str

    @property
    def filename(self) -> str:
        return self.path.name


def distribution() -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution(DIST_NAME)
    except importlib.metadata.PackageNotFoundError:
        raise RbeeError(
            ErrorCode.INSTALL_FAILED,
            "This rbee is not installed as a distribution, so there is no version to install "
            "on a node",
            hint="Install it first, e.g. pip install -e '.[all]' (./dev.sh setup does this).",
        ) from None


def required_python(dist: importlib.metadata.Distribution | None = None) -> tuple[int, int]:
    """The lowest Python the wheel runs on: B06's 3.10, or Requires-Python if stricter."""
    spec = " ".join((dist or distribution()).metadata.get_all("Requires-Python") or [])
    found = re.search(r">=\s*(\d+)\.(\d+)", spec)
    wanted = (int(found[1]), int(found[2])) if found else MIN_PYTHON
    return max(wanted, MIN_PYTHON)


def _escaped(version: str) -> str:
    """PEP 427: runs of characters other than letters, digits, '.' and '+' become '_'."""
    return re.sub(r"[^\w\d.+]+", "_", version)


def wheel_filename(version: str) -> str:
    return f"{DIST_NAME}-{_escaped(version)}-py3-none-any.whl"


def package_files() -> list[tuple[str, Path]]:
    """(path inside the wheel, file on disk) for every shipped file of PACKAGES, sorted."""
    found: list[tuple[str, Path]] = []
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise RbeeError(ErrorCode.INSTALL_FAILED, f"Cannot locate the package {package}")
        root = Path(next(iter(spec.submodule_search_locations)))
        for file in sorted(root.rglob("*")):
            rel = file.relative_to(root)
            if not file.is_file() or _skipped(rel):
                continue
            found.append((f"{package}/{rel.as_posix()}", file))
    return found


def _skipped(rel: Path) -> bool:
    if any(part in SKIP_DIRS or part.startswith(".") for part in rel.parts):
        return True
    return rel.name.endswith(SKIP_SUFFIXES)


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return f"sha256={digest.decode()}"


def build_wheel(dest_dir: Path) -> BuiltWheel:
    """Write `rbee-<version>-py3-none-any.whl` of the running rbee into dest_dir."""
    dist = distribution()
    version = dist.version
    metadata = dist.read_text("METADATA")
    if not metadata:
        raise RbeeError(ErrorCode.INSTALL_FAILED, "The installed rbee has no METADATA file")
    dist_info = f"{DIST_NAME}-{_escaped(version)}.dist-info"
    entries: list[tuple[str, bytes]] = [(arc, file.read_bytes()) for arc, file in package_files()]
    entries.append((f"{dist_info}/METADATA", metadata.encode()))
    entries.append((f"{dist_info}/WHEEL", WHEEL_FILE.encode()))
    entry_points = dist.read_text("entry_points.txt")
    if entry_points:
        entries.append((f"{dist_info}/entry_points.txt", entry_points.encode()))
    record_name = f"{dist_info}/RECORD"
    record = "".join(f"{arc},{_record_hash(data)},{len(data)}\n" for arc, data in entries)
    entries.append((record_name, (record + f"{record_name},,\n").encode()))

    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / wheel_filename(version)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for arc, data in entries:
            info = zipfile.ZipInfo(arc, date_time=ZIP_DATE)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return BuiltWheel(path, version, hashlib.sha256(path.read_bytes()).hexdigest())
