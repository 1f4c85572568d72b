"""The operator's SSH layer: what the CLI and the TUI call to reach nodes over SSH.

One import for every SSH-backed flow and helper; the work is split by idea:
- `ssh_conn`: connections (retries per B01, failure classification per B02), commands,
  SFTP and local port forwards (`connect`, `Dialer`, `SshConnection`).
- `ssh_hostkeys`: rbee's own known_hosts (`state_dir()/known_hosts`).
- `ssh_forward`: `AgentForward`, a working local URL for a node's agent (B10).
- `remote_agent`: status, start, stop, restart and log tails of a node's agent (B07).
- `install`: `install_agent`, install or upgrade in place (B06); `wheel` builds the package.
- here: `check_connection`, the B01 connection test.

Flows are async generators of `rbee_tui.events` and raise `RbeeError`; nothing here prints.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from rbee_tui.config import Node, OperatorSettings
from rbee_tui.events import Attempt, Event, Finished, PhaseDone, PhaseStarted
from rbee_tui.install import install_agent
from rbee_tui.remote_agent import (
    AgentLayout,
    AgentStatus,
    LogTail,
    RemoteAgent,
    agent_status,
    fetch_agent_logs,
    restart_agent,
    start_agent,
    stop_agent,
)
from rbee_tui.ssh_conn import (
    AGENT_VERSION_PY,
    VENV_DIR,
    CommandResult,
    Dialer,
    SshConnection,
    connect,
    parse_facts,
    shell_path,
    ssh_user,
    version_tuple,
)
from rbee_tui.ssh_forward import AgentForward
from rbee_tui.ssh_hostkeys import known_hosts_path
from rbee_tui.wheel import required_python

__all__ = [
    "AgentForward", "AgentLayout", "AgentStatus", "CommandResult", "Dialer", "LogTail",
    "RemoteAgent", "SshConnection", "agent_status", "check_connection", "connect",
    "fetch_agent_logs", "install_agent", "known_hosts_path", "probe", "restart_agent",
    "start_agent", "stop_agent",
]


PROBE = r"""
AGENT_VERSION="__AGENT_VERSION_PY__"
echo "hostname=$(hostname 2>/dev/null || uname -n)"
echo "uname=$(uname -srm 2>/dev/null)"
echo "home=$HOME"
echo "python_path=$(command -v python3 2>/dev/null)"
echo "python=$(python3 -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null)"
d=__INSTALL__
echo "install_path=$d"
if [ -x "$d/__VENV__/bin/python" ]; then
  echo "agent_version=$("$d/__VENV__/bin/python" -c "$AGENT_VERSION" 2>/dev/null)"
fi
"""


async def probe(conn: SshConnection) -> dict[str, Any]:
    """What the node is: hostname, uname, python3 version, installed agent version."""
    script = PROBE.replace("__INSTALL__", shell_path(conn.node.install_path)) \
                  .replace("__VENV__", VENV_DIR).replace("__AGENT_VERSION_PY__", AGENT_VERSION_PY)
    facts = parse_facts((await conn.run_script(script, what="Probing the node")).stdout)
    python = facts.get("python") or None
    needed = required_python()
    agent = facts.get("agent_version") or None
    return {
        "host": conn.node.ssh_host, "port": conn.node.ssh_port, "user": ssh_user(conn.node),
        "hostname": facts.get("hostname", ""), "uname": facts.get("uname", ""),
        "home": facts.get("home", ""),
        "python": python, "python_path": facts.get("python_path") or None,
        "python_required": ".".join(map(str, needed)),
        "python_ok": python is not None and version_tuple(python)[:2] >= needed,
        "install_path": facts.get("install_path", conn.node.install_path),
        "agent_installed": agent is not None, "agent_version": agent,
    }


def describe(facts: dict[str, Any]) -> str:
    python = facts["python"] or "missing"
    if facts["python"] and not facts["python_ok"]:
        python += f" (rbee needs {facts['python_required']} or newer)"
    agent = (f"rbee {facts['agent_version']}" if facts["agent_installed"]
             else "not installed")
    return (f"{facts['user']}@{facts['hostname'] or facts['host']} answered "
            f"({facts['uname']}); python3 {python}; agent {agent}")


async def check_connection(node: Node, settings: OperatorSettings, *,
                           accept_new_host_key: bool = False) -> AsyncIterator[Event]:
    """B01/B02: test the node's SSH connection.

    Events: PhaseStarted("ssh"), one Attempt per try (HostKeyUnknown before an unknown
    host key's error), PhaseDone("ssh"), PhaseStarted/PhaseDone("probe"), then Finished
    whose data holds host, port, user, hostname, uname, home, python, python_path,
    python_required, python_ok, install_path, agent_installed, agent_version, attempts.
    """
    dialer = Dialer(node, settings, accept_new_host_key=accept_new_host_key)
    attempts = 0
    async for event in dialer.phase_events():
        attempts += isinstance(event, Attempt)
        yield event
    async with dialer.opened as conn:
        yield PhaseStarted("probe", "Checking python3 and the agent on the node")
        facts = await probe(conn)
        yield PhaseDone("probe", describe(facts))
    yield Finished(describe(facts), data={**facts, "attempts": attempts})
