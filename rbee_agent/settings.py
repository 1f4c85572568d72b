"""The agent's settings: one typed model, defaults from BEHAVIORS.md, TOML file, flags.

Every number the agent uses (timeouts, intervals, retries, ports) lives here so tests can
shrink it instead of sleeping (DESIGN principle 5). Precedence: flags > TOML file > defaults.
The file is `<XDG config>/rbee/agent.toml` unless `--config` names another.

The API key: `--api-key-file FILE`, else `$RBEE_AGENT_API_KEY`, else `api_key` in the config
file; when none is set a random key is generated and written back to the file (mode 0600).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rbee_agent.auth import new_api_key
from rbee_agent.protocol import ErrorCode, RbeeError
from rbee_agent.tomlfile import read_toml, write_private_toml

APP = "rbee"
API_KEY_ENV = "RBEE_AGENT_API_KEY"


def default_config_file() -> Path:
    return Path(platformdirs.user_config_dir(APP)) / "agent.toml"


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP))


def default_state_dir() -> Path:
    return Path(platformdirs.user_state_dir(APP))


class AgentSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=9200, ge=1, le=65535)
    api_key: str | None = Field(default=None, repr=False)
    data_dir: Path = Field(default_factory=default_data_dir)
    models_dir: Path | None = None  # default: <data_dir>/models
    log_dir: Path = Field(default_factory=lambda: default_state_dir() / "logs")
    # workers
    worker_port_min: int = Field(default=8001, ge=1, le=65535)
    worker_port_max: int = Field(default=8999, ge=1, le=65535)
    worker_ctx_size: int = Field(default=2048, ge=16)
    worker_threads: int | None = Field(default=None, ge=1)
    worker_slots: int = Field(default=1, ge=1)
    ram_factor: float = Field(default=1.2, gt=0)
    # timings (B28-B30, B50)
    health_interval_s: float = Field(default=30.0, gt=0)
    health_timeout_s: float = Field(default=5.0, gt=0)
    health_failures: int = Field(default=3, ge=1)
    idle_timeout_s: float = Field(default=300.0, gt=0)
    idle_check_s: float = Field(default=5.0, gt=0)
    stop_grace_s: float = Field(default=30.0, gt=0)
    start_timeout_s: float = Field(default=300.0, gt=0)
    # model downloads (B37); the hub is $HF_ENDPOINT (default https://huggingface.co)
    download_attempts: int = Field(default=6, ge=1)
    download_backoff_s: float = Field(default=0.1, ge=0)  # doubles after each failed attempt
    download_stall_timeout_s: float = Field(default=60.0, gt=0)  # no bytes for this long
    download_connect_timeout_s: float = Field(default=10.0, gt=0)  # also each hub API call
    download_reserve_mb: int = Field(default=512, ge=0)  # left free on the models disk
    download_progress_interval_s: float = Field(default=0.25, gt=0)
    download_speed_window_s: float = Field(default=3.0, gt=0)
    download_jobs_kept: int = Field(default=100, ge=1)  # finished jobs still answerable
    # OpenAI-compatible API and metrics (B180-B193)
    openai_default_max_tokens: int = Field(default=1024, ge=1, le=32768)  # when a request
    # gives none (a prompt too long for it gets what the context has left)
    metrics_public: bool = False  # GET /metrics without the key, on a loopback agent only
    # logs
    log_max_bytes: int = Field(default=5 * 1024 * 1024, ge=1024)
    log_backups: int = Field(default=3, ge=0)
    worker_log_lines_kept: int = Field(default=40, ge=1)

    @property
    def models_path(self) -> Path:
        return self.models_dir or self.data_dir / "models"

    @property
    def catalog_path(self) -> Path:
        return self.data_dir / "catalog.sqlite3"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


# ------------------------------------------------------------------------ loading


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One `--flag` per setting, so every number can be set from the command line."""
    for name, field in AgentSettings.model_fields.items():
        if name == "api_key":
            continue
        flag = "--" + name.replace("_", "-")
        default = field.default if field.default is not None else "-"
        parser.add_argument(flag, dest=f"set_{name}", default=None, metavar="VALUE",
                            help=f"(default: {default})")


def load_settings(
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    api_key_file: Path | None = None,
) -> tuple[AgentSettings, Path]:
    path = config_file or default_config_file()
    data = read_toml(path, "the agent config")
    merged = {**data, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    try:
        settings = AgentSettings.model_validate(merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise RbeeError(
            ErrorCode.INVALID_CONFIG,
            f"Invalid agent setting {field!r} (from {path} or flags): {first['msg']}",
            hint=f"Valid settings: {', '.join(AgentSettings.model_fields)}.",
        ) from None
    settings.api_key = _resolve_api_key(settings, path, data, api_key_file)
    return settings, path


def _resolve_api_key(
    settings: AgentSettings, path: Path, data: dict[str, Any], api_key_file: Path | None
) -> str:
    if api_key_file is not None:
        try:
            key = api_key_file.read_text().strip()
        except OSError as exc:
            raise RbeeError(
                ErrorCode.INVALID_CONFIG,
                f"Cannot read the API key file {api_key_file}: {exc.strerror}",
            ) from None
        if not key:
            raise RbeeError(ErrorCode.INVALID_CONFIG, f"The API key file {api_key_file} is empty")
        return key
    env = os.environ.get(API_KEY_ENV, "").strip()
    if env:
        return env
    if settings.api_key:
        return settings.api_key
    key = new_api_key()
    write_private_toml(path, {**data, "api_key": key})
    return key
