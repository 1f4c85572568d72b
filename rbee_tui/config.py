"""The operator's settings and node registry: one TOML file, human-editable (B08).

`$RBEE_CONFIG` names the file; otherwise `<XDG config>/rbee/config.toml`. It is written
atomically (temp file + rename) with mode 0600 because it holds agents' API keys. Every
number the operator side uses lives in `OperatorSettings` (principle 5).

`localhost` is always a node: it is implied when the file does not list it, and it can be
tuned (agent port, key) by adding a `[nodes.localhost]` table.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from rbee_agent.protocol import ErrorCode, RbeeError
from rbee_agent.tomlfile import read_toml
from rbee_tui.defaults import LOCALHOST
from rbee_tui.retry import RetryPolicy, policy

APP = "rbee"
CONFIG_ENV = "RBEE_CONFIG"
NODE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
DEFAULT_INSTALL_PATH = "~/.local/share/rbee-agent"
DEFAULT_AGENT_PORT = 9200

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

    # SSH (B01): 3 tries, 0.2 s then 0.4 s apart; only an unreachable host is retried
    ssh_connect_timeout_s: float = Field(default=10.0, gt=0)
    ssh_retry: RetryPolicy = Field(default_factory=lambda: policy(3, 0.2, 0.4))
    # agent HTTP (B12): connection failures (and read timeouts of GETs) retried
    http_retry: RetryPolicy = Field(default_factory=lambda: policy(3, 0.2, 0.4))
    http_timeout_s: float = Field(default=10.0, gt=0)
    # list commands ask every agent at once and wait this long for each (B141)
    status_timeout_s: float = Field(default=3.0, gt=0)
    # `workers stop` waits while the agent drains the worker (its stop grace is 30 s, B30)
    worker_stop_timeout_s: float = Field(default=45.0, gt=0)
    # inference flow (B44, B50, B54)
    loading_timeout_s: float = Field(default=300.0, gt=0)
    token_stall_s: float = Field(default=60.0, gt=0)
    queue_full_retry: RetryPolicy = Field(default_factory=lambda: policy(4, 1.0, 2.0, 4.0))
    # a busy worker with at least this many queued requests gets a second copy of its model
    # when the node has room (0: never; B148)
    spawn_when_queued: int = Field(default=4, ge=0)
    agent_start_timeout_s: float = Field(default=30.0, gt=0)
    # a remote agent that does not answer is started over SSH when a command needs it (B143)
    cold_start: bool = True
    # local agent (B09, B140): None = a port chosen once for this config and recorded
    local_agent_port: int | None = Field(default=None, ge=1, le=65535)
    ephemeral: bool = False
    # dashboard (B70, B77)
    poll_interval_s: float = Field(default=2.0, gt=0)
    dashboard_frame_s: float = Field(default=0.5, gt=0)  # poll results drawn together (B166)
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
    # The dashboard starts the gateway when it opens (B196); off: a port opened only when
    # asked, and a second dashboard or a running `rbee serve` never collides on it.
    gateway_autostart: bool = False

    @model_validator(mode="before")
    @classmethod
    def _older_retry_keys(cls, data: Any) -> Any:
        """Config files written before the one retry policy keep working."""
        if not isinstance(data, dict) or not LEGACY_RETRY_KEYS & data.keys():
            return data
        data = dict(data)
        ssh_ms = data.pop("ssh_backoff_ms", None)
        ssh_attempts = data.pop("ssh_attempts", None)
        if (ssh_ms is not None or ssh_attempts is not None) and "ssh_retry" not in data:
            data["ssh_retry"] = {"attempts": ssh_attempts or 3,
                                 "backoff_s": [ms / 1000 for ms in (ssh_ms or [0, 200])[1:]]}
        http_s = data.pop("http_backoff_s", None)
        http_attempts = data.pop("http_attempts", None)
        if (http_s is not None or http_attempts is not None) and "http_retry" not in data:
            data["http_retry"] = {"attempts": http_attempts or 3,
                                  "backoff_s": (http_s or [0, 0.2])[1:] or http_s}
        busy = data.pop("busy_retry_s", None)
        if busy is not None and "queue_full_retry" not in data:
            data["queue_full_retry"] = {"attempts": len(busy) + 1, "backoff_s": busy}
        return data

    @property
    def ssh_backoff_ms(self) -> list[int]:
        """The older spelling of `ssh_retry`'s waits (delay before each try, in ms)."""
        return [0, *(round(s * 1000) for s in self.ssh_retry.backoff_s)]

    @ssh_backoff_ms.setter
    def ssh_backoff_ms(self, delays: list[int]) -> None:
        self.ssh_retry = RetryPolicy(attempts=self.ssh_retry.attempts,
                                     backoff_s=tuple(ms / 1000 for ms in delays[1:]))


LEGACY_RETRY_KEYS = {"ssh_backoff_ms", "ssh_attempts", "http_backoff_s", "http_attempts",
                     "busy_retry_s"}


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
    agent_port: int = Field(default=DEFAULT_AGENT_PORT, ge=1, le=65535)
    api_key: str | None = Field(default=None, repr=False)
    status: str = "unknown"
    agent_version: str | None = None
    last_connected: float | None = None

    @property
    def is_local(self) -> bool:
        return self.transport == "local"


def default_localhost(settings: OperatorSettings) -> Node:
    return Node(name=LOCALHOST, transport="local",
                agent_port=settings.local_agent_port or DEFAULT_AGENT_PORT)


class Config(BaseModel):
    settings: OperatorSettings = Field(default_factory=OperatorSettings)
    nodes: dict[str, Node] = Field(default_factory=dict)
    # What the file held when this config was read (or last saved): save_config merges
    # against it so that it writes only what this process changed.
    _base: dict[str, Any] = PrivateAttr(default_factory=lambda: {"settings": {}, "nodes": {}})

    def node(self, name: str) -> Node:
        if name == LOCALHOST and LOCALHOST not in self.nodes:
            return default_localhost(self.settings)
        try:
            return self.nodes[name]
        except KeyError:
            close = did_you_mean(name, self.names())
            raise RbeeError(
                ErrorCode.NODE_NOT_FOUND,
                f"Node '{name}' is not in the registry" + (f"; did you mean {close}?"
                                                           if close else ""),
                hint=f"Add it with: rbee nodes add --name {name} --ssh-host HOST"
                if not close else f"Known nodes: {', '.join(self.names())}.",
                details={"node": name, "known": self.names()},
            ) from None

    def names(self) -> list[str]:
        return [LOCALHOST, *sorted(n for n in self.nodes if n != LOCALHOST)]

    def all_nodes(self) -> list[Node]:
        return [self.node(name) for name in self.names()]


def did_you_mean(word: str, choices: list[str]) -> str | None:
    """The one choice a typo most likely meant, or None (B150)."""
    import difflib

    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return close[0] if close else None


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


def _table(config: Config) -> dict[str, Any]:
    """The config as the file holds it: non-default settings, and one table per node."""
    return {
        "settings": config.settings.model_dump(mode="json", exclude_defaults=True),
        "nodes": {name: node.model_dump(mode="json", exclude={"name"}, exclude_none=True)
                  for name, node in config.nodes.items()},
    }


def _parse(raw: dict[str, Any], path: Path) -> Config:
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


def load_config(path: Path | None = None) -> Config:
    path = path or config_path()
    config = _parse(read_toml(path, "the config file"), path)
    config._base = _table(config)
    return config


def save_config(config: Config, path: Path | None = None) -> Path:
    """Write what this process changed since it read the file, and nothing else (B145).

    Under an exclusive lock, the file is read again and merged node by node and setting by
    setting: a node or setting this config changed (or added) is written, one it removed is
    removed, and everything else keeps what the file holds now, so another rbee (the CLI
    beside a running dashboard, 20 `rbee nodes add` at once) loses nothing. The file is
    edited with tomlkit, so a hand-written comment or order survives; it is written atomically
    (see `registry_file`) with mode 0600.
    """
    from rbee_tui import registry_file

    path = path or config_path()
    mine, base = _table(config), config._base
    with registry_file.locked(path):
        doc = registry_file.read_document(path)
        _parse(doc.unwrap(), path)  # a hand-broken file is reported, never overwritten
        registry_file.merge_table(doc, "settings", mine["settings"], base["settings"])
        nodes = registry_file.subtable(doc, "nodes")
        for name in sorted(mine["nodes"].keys() | base["nodes"].keys()):
            ours, was = mine["nodes"].get(name), base["nodes"].get(name)
            if ours == was:
                continue  # untouched here: the file's version stands
            if ours is None:
                nodes.pop(name, None)
            else:
                registry_file.merge_table(nodes, name, ours, was or {}, removal_wins=True)
        registry_file.write_atomically(path, doc.as_string().encode())
    config._base = mine
    return path
