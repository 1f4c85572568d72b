"""The agent's settings: one typed model, with defaults, read from flags, env and a TOML file.

Every number the agent uses (timeouts, intervals, retries, ports, limits) lives here so tests
can shrink it instead of sleeping (principle 5). pydantic-settings merges the sources, first
match wins: `--flags` > `RBEE_AGENT_<NAME>` environment variables > the TOML file > defaults.
The file is `<XDG config>/rbee/agent.toml` unless `--config` names another.

The API key: `--api-key-file FILE`, else `$RBEE_AGENT_API_KEY`, else `api_key` in the config
file; when none is set a random key is generated and written back to the file (mode 0600).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import platformdirs
from pydantic import Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from rbee_agent.auth import new_api_key
from rbee_agent.protocol import ErrorCode, RbeeError
from rbee_agent.tomlfile import read_toml, write_private_toml

APP = "rbee"
ENV_PREFIX = "RBEE_AGENT_"
API_KEY_ENV = ENV_PREFIX + "API_KEY"
MiB = 1024 * 1024

# Environment variables a worker process may see (principle 6: a worker never gets the
# agent's key or anything else it does not need). A trailing `*` matches a prefix.
WORKER_ENV_ALLOWED = (
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "LC_*", "TZ", "TMPDIR",
    "LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV", "OMP_*", "OPENBLAS_*", "MKL_*",
    "GGML_*", "LLAMA_*", "CUDA_*", "NVIDIA_*", "HIP_*", "ROCR_*", "HSA_*", "GPU_DEVICE_ORDINAL",
    "XDG_CACHE_HOME", "XDG_RUNTIME_DIR",
)


def default_config_file() -> Path:
    return Path(platformdirs.user_config_dir(APP)) / "agent.toml"


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP))


def default_state_dir() -> Path:
    return Path(platformdirs.user_state_dir(APP))


def default_log_dir() -> Path:
    return default_state_dir() / "logs"


# The TOML file of the settings being loaded (None: defaults and environment only, which is
# what constructing AgentSettings(...) in code gives).
_toml_file: ContextVar[Path | None] = ContextVar("rbee_agent_toml_file", default=None)


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="forbid", env_prefix=ENV_PREFIX,
                                      validate_default=True)

    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=9200, ge=1, le=65535, description="port to listen on")
    api_key: str | None = Field(default=None, repr=False)
    data_dir: Path = Field(default_factory=default_data_dir,
                           description="catalog, models and the data-dir lock")
    models_dir: Path | None = Field(default=None, description="default: <data dir>/models")
    log_dir: Path = Field(default_factory=default_log_dir,
                          description="agent.log and workers/<id>.log")
    # workers
    worker_port_min: int = Field(default=8001, ge=1, le=65535)
    worker_port_max: int = Field(default=8999, ge=1, le=65535)
    worker_ctx_size: int = Field(default=2048, ge=16,
                                 description="context when a spawn gives none (capped at "
                                 "the model's trained context)")
    worker_threads: int | None = Field(default=None, ge=1)
    worker_slots: int = Field(default=1, ge=1)
    worker_queue_depth: int = Field(default=64, ge=0,
                                    description="requests that may wait for a busy worker's "
                                    "slot; more get QUEUE_FULL without reaching it")
    worker_queue_timeout_s: float = Field(default=300.0, gt=0,
                                          description="longest wait in a worker's queue")
    ram_factor: float = Field(default=1.2, gt=0,
                              description="choosing among a repo's files before download: "
                              "size × this must fit the node")
    # memory preflight (B121): weights + KV cache + this margin per context
    compute_margin_mb: int = Field(default=64, ge=0,
                                   description="compute buffers per context, beyond logits")
    ram_reserve_mb: int = Field(default=256, ge=0, description="RAM left to the rest of "
                                "the node when a spawn is checked")
    vram_reserve_mb: int = Field(default=256, ge=0, description="VRAM left free per GPU")
    # timings (B28-B30, B50)
    health_interval_s: float = Field(default=30.0, gt=0)
    health_timeout_s: float = Field(default=5.0, gt=0)
    health_failures: int = Field(default=3, ge=1)
    idle_timeout_s: float = Field(default=300.0, gt=0)
    idle_check_s: float = Field(default=5.0, gt=0)
    stop_grace_s: float = Field(default=30.0, gt=0)
    start_timeout_s: float = Field(default=300.0, gt=0)
    rpc_unused_stop_s: float = Field(default=120.0, gt=0,
                                     description="an RPC server no split worker has been "
                                     "connected to for this long is stopped (B209)")
    failed_kept_s: float = Field(default=600.0, ge=0,
                                 description="how long a worker that failed to start stays "
                                 "answerable as state 'failed'")
    # the HTTP edge (B123)
    max_request_bytes: int = Field(default=4 * MiB, ge=1024)
    max_connections: int = Field(default=1000, ge=8,
                                 description="open client connections; more are closed at "
                                 "once")
    header_timeout_s: float = Field(default=10.0, gt=0,
                                    description="time a client has to send a request head")
    keep_alive_timeout_s: float = Field(default=5.0, gt=0)
    worker_headers_timeout_s: float = Field(default=15.0, gt=0,
                                            description="time a worker has to start "
                                            "answering a streamed request")
    worker_result_timeout_s: float = Field(default=900.0, gt=0,
                                           description="time a worker has for a whole "
                                           "stream:false reply")
    # model downloads (B37); the hub is $HF_ENDPOINT (default https://huggingface.co)
    download_attempts: int = Field(default=6, ge=1)
    download_backoff_s: float = Field(default=0.1, ge=0,
                                      description="doubles after each failed attempt")
    download_stall_timeout_s: float = Field(default=60.0, gt=0,
                                            description="no bytes for this long: retry")
    download_connect_timeout_s: float = Field(default=10.0, gt=0,
                                              description="also each hub API call")
    download_reserve_mb: int = Field(default=512, ge=0,
                                     description="left free on the models disk")
    download_progress_interval_s: float = Field(default=0.25, gt=0)
    download_speed_window_s: float = Field(default=3.0, gt=0)
    download_jobs_kept: int = Field(default=100, ge=1,
                                    description="finished jobs still answerable")
    # catalog
    catalog_busy_timeout_s: float = Field(default=2.0, gt=0,
                                          description="wait for a locked catalog before "
                                          "answering CATALOG_BUSY")
    # OpenAI-compatible API and metrics (B180-B193)
    openai_default_max_tokens: int = Field(default=1024, ge=1, le=32768,
                                           description="when a request gives none (a prompt "
                                           "too long for it gets what the context has left)")
    metrics_public: bool = Field(default=False,
                                 description="GET /metrics without the key, on a loopback "
                                 "agent only")
    # logs
    log_max_bytes: int = Field(default=5 * MiB, ge=1024)
    log_backups: int = Field(default=3, ge=0)
    worker_log_lines_kept: int = Field(default=40, ge=1)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = _toml_file.get()
        if toml is None:
            return init_settings, env_settings
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml)

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


def field_default(field: FieldInfo) -> Any:
    """The value a setting has when nothing sets it (a factory is called)."""
    if field.default_factory is not None:
        return field.default_factory()  # type: ignore[call-arg]
    return None if field.default is PydanticUndefined else field.default


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One `--flag` per setting, so every number can be set from the command line."""
    for name, field in AgentSettings.model_fields.items():
        if name == "api_key":
            continue
        flag = "--" + name.replace("_", "-")
        default = field_default(field)
        shown = "-" if default is None else default
        about = f"{field.description}; " if field.description else ""
        parser.add_argument(flag, dest=f"set_{name}", default=None, metavar="VALUE",
                            help=f"{about}env {ENV_PREFIX}{name.upper()} (default: {shown})")


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    token = _toml_file.set(path)
    try:
        yield
    finally:
        _toml_file.reset(token)


def load_settings(
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    api_key_file: Path | None = None,
) -> tuple[AgentSettings, Path]:
    path = config_file or default_config_file()
    data = read_toml(path, "the agent config")  # INVALID_CONFIG, one line, for bad TOML
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    try:
        with _reading(path):
            settings = AgentSettings(**flags)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise RbeeError(
            ErrorCode.INVALID_CONFIG,
            f"Invalid agent setting {field!r} (from {path}, {ENV_PREFIX}* or flags): "
            f"{first['msg']}",
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
    if settings.api_key and settings.api_key.strip():
        return settings.api_key.strip()  # from the environment or the file
    key = new_api_key()
    write_private_toml(path, {**data, "api_key": key})
    return key
