"""The agent on `localhost`: found if running, started detached if not (B09, B140).

rbee starts the local agent itself and leaves it running so the next request is warm. It
records what it started in a pid file; `--ephemeral` (or the setting) stops, on exit, only
an agent this very run started, and `rbee nodes stop localhost` stops only an agent rbee
started. An agent started by hand or by systemd is never stopped by rbee.

Which agent is ours is proven, never assumed from a port (B140): an agent counts as this
config's only when it answers an authenticated `GET /v1/node` with this config's key, and an
agent rbee has just started counts only when the pid it reports is the process rbee
started. Anything else on the port (another user's agent, another config's, another program)
is reported with its owner where the system shows it.

Why a port per config rather than a per-user Unix socket: the agent speaks TCP on loopback
to every client (remote nodes reach it through an SSH forward to a TCP port, the OpenAI
gateway and scripts use plain HTTP), and one transport for every node keeps one code path.
So each config gets a port of its own, chosen once (9200 when free, else one the system
hands out) and recorded in the local agent's config file, which `rbee-agent serve` run by
hand reads too; `[settings] local_agent_port` pins it instead. Keys are per config, so two
configs never mistake each other's agents, and a recorded port that someone else took is
given up for a free one, saying so.

The local agent reads the same config file as `rbee-agent serve` run by hand
(`<XDG config>/rbee/agent.toml`), so both agree on the API key and port. When
`$RBEE_CONFIG` points elsewhere (tests, or a second profile), everything lives beside that
file instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rbee_agent.auth import new_api_key
from rbee_agent.protocol import ErrorCode, HealthReply, NodeInfo, RbeeError
from rbee_agent.settings import default_config_file
from rbee_agent.tomlfile import read_toml
from rbee_tui.config import CONFIG_ENV, DEFAULT_AGENT_PORT, OperatorSettings, state_dir

KEY_ENV = "RBEE_AGENT_API_KEY"  # the agent prefers it to its config: never pass ours on


@dataclass(frozen=True)
class LocalAgent:
    url: str
    api_key: str
    pid: int | None
    started_here: bool
    instance_id: str | None = None
    note: str | None = None  # said once to the operator: the port moved, and why


@dataclass(frozen=True)
class Lookup:
    """What answers on this config's port: our agent (with what it said), or nobody /
    somebody else (`reason`)."""

    agent: LocalAgent | None
    reason: str
    info: NodeInfo | None = None
    version: str | None = None


def agent_config_file() -> Path:
    if os.environ.get(CONFIG_ENV):
        return state_dir() / "local-agent" / "agent.toml"
    return default_config_file()


def pid_file() -> Path:
    return state_dir() / "local-agent.pid"


def _update_agent_config(path: Path, values: dict[str, object]) -> None:
    from rbee_tui import registry_file  # tomlkit loads only when something is written

    with registry_file.locked(path):
        doc = registry_file.read_document(path)
        for name, value in values.items():
            doc[name] = value
        registry_file.write_atomically(path, doc.as_string().encode())


def ensure_key(path: Path) -> str:
    """The local agent's key; generated (0600) before the first start so both sides know it."""
    data: dict[str, object] = read_toml(path, "the local agent config")
    key = data.get("api_key")
    if isinstance(key, str) and key:
        return key
    key = new_api_key()
    values: dict[str, object] = {"api_key": key}
    if os.environ.get(CONFIG_ENV):
        home = path.parent
        values.setdefault("data_dir", str(data.get("data_dir") or home / "data"))
        values.setdefault("log_dir", str(data.get("log_dir") or home / "logs"))
    _update_agent_config(path, values)
    return key


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _system_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def agent_port(settings: OperatorSettings, config: Path) -> tuple[int, bool]:
    """This config's local agent port, and whether rbee chose it (False: the settings pin
    it). Chosen once and recorded in the agent's config file."""
    if settings.local_agent_port is not None:
        return settings.local_agent_port, False
    recorded = read_toml(config, "the local agent config").get("port")
    if isinstance(recorded, int):
        return recorded, True
    port = DEFAULT_AGENT_PORT if _port_free(DEFAULT_AGENT_PORT) else _system_port()
    _update_agent_config(config, {"port": port})
    return port, True


def _url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


Answer = NodeInfo | Literal["nobody", "silent", "stranger"]


def _get(url: str, path: str, key: str | None, timeout: float) -> tuple[int, bytes]:
    """One GET on loopback with the standard library: a listing that only asks the local
    agent does not pay for loading httpx (B151)."""
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname or "127.0.0.1", where.port,
                                      timeout=timeout)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {key}"} if key else {})
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def identify(url: str, key: str, timeout: float) -> Answer:
    """Who answers at `url`: this config's agent (its NodeInfo: the key was accepted),
    nobody, something that accepted the connection and said nothing in time (silent), or a
    stranger (something that refuses the key or is no rbee agent)."""
    import http.client

    try:
        status, body = _get(url, "/v1/node", key, timeout)
    except ConnectionRefusedError:
        return "nobody"
    except TimeoutError:
        return "silent"
    except (OSError, http.client.HTTPException):
        return "stranger"
    if status != 200:
        return "stranger"
    try:
        return NodeInfo.model_validate_json(body)
    except ValueError:
        return "stranger"


def port_holder(port: int) -> str:
    """Who listens on a loopback port, as far as this user may see (B140)."""
    import psutil

    try:
        listening = [c for c in psutil.net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port]
    except psutil.Error:
        listening = []
    pid = next((c.pid for c in listening if c.pid), None)
    if pid is None:
        return ("a process of another user (the system does not show it to you)"
                if listening else "another program")
    try:
        process = psutil.Process(pid)
        args = process.cmdline()
        user = process.username()
    except psutil.Error:
        return f"process {pid}"
    if any("rbee_agent" in a or a.endswith("rbee-agent") for a in args):
        config = args[args.index("--config") + 1] if "--config" in args[:-1] else None
        where = f", config {config}" if config else ""
        return f"another rbee agent (pid {pid}, user {user}{where})"
    return f"'{process.name()}' (pid {pid}, user {user})"


def recorded_pid() -> int | None:
    """The pid of the agent rbee started for this config, if that process still is one."""
    try:
        pid = int(pid_file().read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None
    return pid if _is_our_agent_process(pid) else None


def _is_our_agent_process(pid: int) -> bool:
    import psutil

    try:
        args = psutil.Process(pid).cmdline()
    except psutil.Error:
        return False
    return any("rbee_agent" in a for a in args) and str(agent_config_file()) in args


@dataclass(frozen=True)
class _Probe:
    config: Path
    key: str
    port: int
    chosen: bool
    answer: Answer


def _probe(settings: OperatorSettings, timeout: float) -> _Probe:
    """This config's agent config, key and port, and who answers there now."""
    config = agent_config_file()
    key = ensure_key(config)
    port, chosen = agent_port(settings, config)
    return _Probe(config, key, port, chosen, identify(_url(port), key, timeout))


def lookup(settings: OperatorSettings) -> Lookup:
    """Find this config's agent without starting one (for status listings)."""
    probe = _probe(settings, settings.status_timeout_s)
    port, key, answer = probe.port, probe.key, probe.answer
    if isinstance(answer, NodeInfo):
        try:
            status, body = _get(_url(port), "/v1/health", None, settings.status_timeout_s)
            version = HealthReply.model_validate_json(body).version if status == 200 else None
        except (OSError, ValueError):
            version = None
        return Lookup(_ours(port, key, answer), "up", answer, version)
    if answer == "nobody":
        return Lookup(None, "agent not running (a command that needs it starts it)")
    if answer == "silent":
        return Lookup(None, f"no answer on port {port} within {settings.status_timeout_s:g} s")
    return Lookup(None, f"port {port} is held by {port_holder(port)}, not by this config's "
                        "agent")


def _ours(port: int, key: str, info: NodeInfo, pid: int | None = None) -> LocalAgent:
    return LocalAgent(_url(port), key, info.agent_pid or pid, started_here=False,
                      instance_id=info.agent_instance_id)


_START_LOCK = threading.Lock()


def find_or_start(settings: OperatorSettings) -> LocalAgent:
    """Blocking (call it from a thread in async code): return this config's local agent.

    Serialised within this process (a lock) and across rbee processes (flock on a file in
    the state dir), so two callers racing never start two agents and lose track of one.
    """
    lock_path = state_dir() / "local-agent.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with _START_LOCK, lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _find_or_start(settings)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _find_or_start(settings: OperatorSettings) -> LocalAgent:
    probe = _probe(settings, settings.http_timeout_s)
    config, key, port, answer = probe.config, probe.key, probe.port, probe.answer
    if isinstance(answer, NodeInfo):
        return _ours(port, key, answer, recorded_pid())
    if answer == "silent":
        raise RbeeError(
            ErrorCode.AGENT_UNREACHABLE,
            f"Something holds port {port} (the local agent's) and does not answer within "
            f"{settings.http_timeout_s:g} s: {port_holder(port)}",
            hint="If it is this config's agent and it is stuck, restart it: "
            "rbee nodes restart localhost.",
            details={"port": port},
        )
    note = None
    if answer == "stranger":
        holder = port_holder(port)
        if not probe.chosen:
            raise RbeeError(
                ErrorCode.AGENT_UNREACHABLE,
                f"Port {port} on this machine is held by {holder}, not by this config's "
                "local agent",
                hint="Stop that program, or give this config's agent another port: "
                "[settings] local_agent_port in the config file (or remove the setting and "
                "rbee picks a free one).",
                details={"port": port, "holder": holder},
            )
        old, port = port, _system_port()
        _update_agent_config(config, {"port": port})
        note = (f"port {old} is held by {holder}; this config's local agent now uses port "
                f"{port}")
    return _start(settings, config, key, port, note)


def _start(settings: OperatorSettings, config: Path, key: str, port: int,
           note: str | None) -> LocalAgent:
    log_path = state_dir() / "local-agent.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "rbee_agent", "serve", "--config", str(config),
           "--port", str(port), "--host", "127.0.0.1"]
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, close_fds=True, env=env)
    # Recorded at once, not once it answers: if this process dies while the agent starts
    # (a closed terminal), `rbee nodes stop localhost` still finds the agent it left.
    pid_file().write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + settings.agent_start_timeout_s
    while time.monotonic() < deadline:
        answer = identify(_url(port), key, timeout=1.0)
        exited = proc.poll() is not None
        if isinstance(answer, NodeInfo) and answer.agent_pid in (None, proc.pid) and not exited:
            return LocalAgent(_url(port), key, proc.pid, started_here=True,
                              instance_id=answer.agent_instance_id, note=note)
        if exited:
            pid_file().unlink(missing_ok=True)
            raise _start_failed(proc.returncode, log_path, port, answer)
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    pid_file().unlink(missing_ok=True)
    raise RbeeError(
        ErrorCode.AGENT_UNREACHABLE,
        f"The local agent did not answer at {_url(port)} within "
        f"{settings.agent_start_timeout_s:g} s",
        hint=f"See {log_path}.",
    )


def _start_failed(code: int | None, log_path: Path, port: int, answer: Answer) -> RbeeError:
    tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
    held = (f"; port {port} is held by {port_holder(port)}" if answer != "nobody" else "")
    return RbeeError(
        ErrorCode.AGENT_UNREACHABLE,
        f"The local agent exited with code {code} while starting: "
        f"{tail[-1] if tail else 'no output'}{held}",
        hint=f"See {log_path}.",
        details={"log": str(log_path), "last_lines": tail, "port": port},
    )


def stop(pid: int, timeout_s: float = 40.0) -> bool:
    """SIGTERM an agent rbee started; True once it is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            pid_file().unlink(missing_ok=True)
            return True
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    return False


def stop_recorded() -> int:
    """`rbee nodes stop localhost`: stop the agent rbee started; refuse any other."""
    pid = recorded_pid()
    if pid is None:
        pid_file().unlink(missing_ok=True)
        raise RbeeError(
            ErrorCode.AGENT_NOT_INSTALLED,
            "No local agent started by rbee is running",
            hint="An agent started by hand or by systemd is stopped where it was started.",
        )
    if not stop(pid):
        raise RbeeError(ErrorCode.INTERNAL_ERROR, f"The local agent (pid {pid}) did not stop")
    return pid


async def find_or_start_async(settings: OperatorSettings) -> LocalAgent:
    return await asyncio.to_thread(find_or_start, settings)
