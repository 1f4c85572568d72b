"""The agent on `localhost`: found if running, started detached if not (B09).

rbee starts the local agent itself and leaves it running so the next request is warm. It
records what it started in a pid file; `--ephemeral` (or the setting) stops, on exit, only
an agent this very run started, and `rbee nodes stop localhost` stops only an agent rbee
started. An agent started by hand or by systemd is never stopped by rbee.

The local agent reads the same config file as `rbee-agent serve` run by hand
(`<XDG config>/rbee/agent.toml`), so both agree on the API key. When `$RBEE_CONFIG` points
elsewhere (tests, or a second profile), everything lives beside that file instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from rbee_agent.auth import new_api_key
from rbee_agent.protocol import ErrorCode, RbeeError
from rbee_agent.settings import default_config_file
from rbee_agent.tomlfile import read_toml, write_private_toml
from rbee_tui.config import CONFIG_ENV, OperatorSettings, state_dir


@dataclass(frozen=True)
class LocalAgent:
    url: str
    api_key: str
    pid: int | None
    started_here: bool


def agent_config_file() -> Path:
    if os.environ.get(CONFIG_ENV):
        return state_dir() / "local-agent" / "agent.toml"
    return default_config_file()


def pid_file() -> Path:
    return state_dir() / "local-agent.pid"


def ensure_key(path: Path) -> str:
    """The local agent's key; generated (0600) before the first start so both sides know it."""
    data: dict[str, object] = read_toml(path, "the local agent config")
    key = data.get("api_key")
    if isinstance(key, str) and key:
        return key
    key = new_api_key()
    if os.environ.get(CONFIG_ENV):
        home = path.parent
        data.setdefault("data_dir", str(home / "data"))
        data.setdefault("log_dir", str(home / "logs"))
    write_private_toml(path, {**data, "api_key": key})
    return key


def _healthy(url: str, timeout: float = 0.5) -> bool:
    try:
        return httpx.get(f"{url}/v1/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def recorded_pid() -> int | None:
    try:
        pid = int(pid_file().read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


_START_LOCK = threading.Lock()


def find_or_start(settings: OperatorSettings) -> LocalAgent:
    """Blocking (call it from a thread in async code): return a healthy local agent.

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
    config = agent_config_file()
    key = ensure_key(config)
    url = f"http://127.0.0.1:{settings.local_agent_port}"
    if _healthy(url):
        return LocalAgent(url, key, recorded_pid(), started_here=False)
    log_path = state_dir() / "local-agent.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "rbee_agent", "serve", "--config", str(config),
           "--port", str(settings.local_agent_port), "--host", "127.0.0.1"]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, close_fds=True)
    deadline = time.monotonic() + settings.agent_start_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise RbeeError(
                ErrorCode.AGENT_UNREACHABLE,
                f"The local agent exited with code {proc.returncode} while starting: "
                f"{tail[-1] if tail else 'no output'}",
                hint=f"See {log_path}.",
                details={"log": str(log_path), "last_lines": tail},
            )
        if _healthy(url):
            pid_file().write_text(f"{proc.pid}\n")
            return LocalAgent(url, key, proc.pid, started_here=True)
        time.sleep(0.05)
    raise RbeeError(
        ErrorCode.AGENT_UNREACHABLE,
        f"The local agent did not answer at {url} within {settings.agent_start_timeout_s:g} s",
        hint=f"See {log_path}.",
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
