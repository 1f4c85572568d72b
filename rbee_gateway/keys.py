"""The gateway's own API key (B187): a file given with `--api-key-file`, else one generated
once into the operator's config folder, mode 0600, and reused on every start."""

from __future__ import annotations

from pathlib import Path

from rbee_agent.auth import new_api_key
from rbee_agent.protocol import ErrorCode, RbeeError
from rbee_agent.tomlfile import write_private_file
from rbee_tui.config import config_path

KEY_FILE = "gateway.key"


def default_key_file() -> Path:
    return config_path().parent / KEY_FILE


def load_or_create_key(key_file: Path | None) -> tuple[str, Path]:
    """(key, the file it is in). A named file must exist and hold a key; the default file is
    created when missing."""
    path = key_file or default_key_file()
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        if key_file is not None:
            raise RbeeError(ErrorCode.INVALID_CONFIG, f"The API key file {path} does not exist",
                            hint="Give an existing file, or leave --api-key-file out to use "
                            f"a generated key ({default_key_file()}).") from None
        key = ""
    except OSError as exc:
        raise RbeeError(ErrorCode.INVALID_CONFIG,
                        f"Cannot read the API key file {path}: {exc.strerror}") from None
    if key:
        return key, path
    if key_file is not None:
        raise RbeeError(ErrorCode.INVALID_CONFIG, f"The API key file {path} is empty",
                        hint="Put one key on one line in it.")
    key = new_api_key()
    write_private_file(path, (key + "\n").encode())
    return key, path
