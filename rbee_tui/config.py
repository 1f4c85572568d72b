"""The operator's settings and node registry: one TOML file, human-editable (B08).

`$RBEE_CONFIG` names the file; otherwise `<XDG config>/rbee/config.toml`. It is written
atomically (temp file + rename) with mode 0600 because it holds agents' API keys. Every
number the operator side uses lives in `OperatorSettings` (DESIGN principle 5).

`localhost` is always a node: it is implied when the file does not list it, and it can be
tuned (agent port, key) by adding a `[nodes.localhost]` table.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rbee_agent.protocol import ErrorCode, RbeeError
from rbee_agent.tomlfile import read_toml, write_private_toml

APP = "rbee"
CONFIG_ENV = "RBEE_CONFIG"
LOCALHOST = "localhost"
NODE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
DEFAULT_INSTALL_PATH = "~/.local/share/rbee-agent"

Transport = Literal["local", "ssh", "direct"]


def config_path() -> Path:
    override = os.environ.get(CONFIG_ENV)
    if override:
        return Path(override).expanduser()
    return Path(platformdirs.user_config_dir(APP)) / "config.toml"


def state_dir() -> Path:
    """Where rbee keeps files that are not settings: known_hosts, partial outputs, logs."""
    override = os.environ.get(CONFIG_ENV)
    if override:
        return Path(override).expanduser().parent / "state"
    return Path(platformdirs.user_state_dir(APP))


class OperatorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # SSH (B01)
    ssh_connect_timeout_s: float = Field(default=10.0, gt=0)
    ssh_attempts: int = Field(default=3, ge=1)
    ssh_backoff_ms: list[int] = Field(default_factory=lambda: [0, 200, 400])
    # agent HTTP (B12)
    http_attempts: int = Field(default=3, ge=1)
    http_backoff_s: list[float] = Field(default_factory=lambda: [0.0, 0.2, 0.4])
    http_timeout_s: float = Field(default=10.0, gt=0)
    # inference flow (B44, B50, B54)
    loading_timeout_s: float = Field(default=300.0, gt=0)
    token_stall_s: float = Field(default=60.0, gt=0)
    busy_retry_s: list[float] = Field(default_factory=lambda: [1.0, 2.0, 4.0])
    agent_start_timeout_s: float = Field(default=30.0, gt=0)
    # local agent (B09)
    local_agent_port: int = Field(default=9200, ge=1, le=65535)
    ephemeral: bool = False
    # dashboard (B70, B77)
    poll_interval_s: float = Field(default=2.0, gt=0)
    theme: str = "rbee"
    # `rbee serve`, the OpenAI-compatible gateway (B186-B189)
    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(default=8080, ge=1, le=65535)
    gateway_state_ttl_s: float = Field(default=1.0, ge=0)  # node state older than this is
    # asked again before a request is routed
    gateway_health_interval_s: float = Field(default=5.0, gt=0)  # how often a down node
    # is asked whether it is back
    gateway_refresh_timeout_s: float = Field(default=5.0, gt=0)
    gateway_metrics_public: bool = False  # /metrics without the key, on loopback only


class Node(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    transport: Transport = "ssh"
    ssh_host: str | None = None
    ssh_port: int = Field(default=22, ge=1, le=65535)
    ssh_user: str | None = None
    ssh_key: str | None = None
    install_path: str = DEFAULT_INSTALL_PATH
    agent_host: str = "127.0.0.1"  # where the agent listens, as seen from the node
    agent_port: int = Field(default=9200, ge=1, le=65535)
    api_key: str | None = Field(default=None, repr=False)
    status: str = "unknown"
    agent_version: str | None = None
    last_connected: float | None = None

    @property
    def is_local(self) -> bool:
        return self.transport == "local"


def default_localhost(settings: OperatorSettings) -> Node:
    return Node(name=LOCALHOST, transport="local", agent_port=settings.local_agent_port)


class Config(BaseModel):
    settings: OperatorSettings = Field(default_factory=OperatorSettings)
    nodes: dict[str, Node] = Field(default_factory=dict)

    def node(self, name: str) -> Node:
        if name == LOCALHOST and LOCALHOST not in self.nodes:
            return default_localhost(self.settings)
        try:
            return self.nodes[name]
        except KeyError:
            raise RbeeError(
                ErrorCode.NODE_NOT_FOUND,
                f"Node '{name}' is not in the registry",
                hint=f"Add it with: rbee nodes add --name {name} --ssh-host HOST",
                details={"node": name, "known": self.names()},
            ) from None

    def names(self) -> list[str]:
        return [LOCALHOST, *sorted(n for n in self.nodes if n != LOCALHOST)]

    def all_nodes(self) -> list[Node]:
        return [self.node(name) for name in self.names()]


def validate_node_name(name: str) -> str:
    if not NODE_NAME_RE.fullmatch(name):
        raise RbeeError(
            ErrorCode.INVALID_REQUEST,
            f"Invalid node name {name!r}: use 1-32 lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit",
            hint="For example: gpu1, workstation, lab-a100.",
        )
    return name


# ------------------------------------------------------------------------ file I/O


def load_config(path: Path | None = None) -> Config:
    path = path or config_path()
    raw = read_toml(path, "the config file")
    nodes = {name: {**table, "name": name} for name, table in raw.get("nodes", {}).items()}
    try:
        return Config.model_validate({"settings": raw.get("settings", {}), "nodes": nodes})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RbeeError(
            ErrorCode.INVALID_CONFIG,
            f"The config file {path} has an invalid value at {where}: {first['msg']}",
            hint=f"Valid settings: {', '.join(OperatorSettings.model_fields)}.",
        ) from None


def save_config(config: Config, path: Path | None = None) -> Path:
    path = path or config_path()
    data: dict[str, Any] = {
        "settings": config.settings.model_dump(exclude_defaults=True),
        "nodes": {
            name: node.model_dump(exclude={"name"}, exclude_none=True)
            for name, node in sorted(config.nodes.items())
        },
    }
    write_private_toml(path, data)
    return path
