"""TOML config files: read with one clear error, written atomically with mode 0600 (B08).

Both sides keep settings (and API keys) in TOML; this is the one place that reads and
writes them. It must stay free of heavy imports: the operator side uses it too.
"""

from __future__ import annotations

import os
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from rbee_agent.protocol import ErrorCode, RbeeError


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """The file's tables, `{}` when it does not exist, INVALID_CONFIG when it does not parse.

    `what` names the file for the operator ("the agent config", "the config file").
    """
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise RbeeError(
            ErrorCode.INVALID_CONFIG,
            f"{what[:1].upper()}{what[1:]} {path} is not valid TOML: {exc}",
            hint="Fix the file by hand (rbee does not overwrite a broken file), or move it "
            "away to start from defaults.",
            details={"path": str(path)},
        ) from None


def write_private_toml(path: Path, data: dict[str, Any]) -> None:
    write_private_file(path, tomli_w.dumps(data).encode())


def write_private_file(path: Path, content: bytes) -> None:
    """Temp file in the same folder, chmod 0600 before any byte is written, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(content)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
