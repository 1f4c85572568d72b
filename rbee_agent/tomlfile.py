"""Private TOML files (configs that hold API keys): written atomically, mode 0600 (B08)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import tomli_w


def write_private_toml(path: Path, data: dict[str, Any]) -> None:
    """Temp file in the same folder, chmod 0600 before any byte is written, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            tomli_w.dump(data, fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
