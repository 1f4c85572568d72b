"""A real agent install over SSH (B06, B07, B10): OpenSSH sshd on loopback, the current
user, a temporary install path, pip into a fresh venv (its cache keeps llama-cpp-python's
wheel: no 6-minute build), then health through a port forward, an upgrade in place, a stop.
"""

from __future__ import annotations

import os
import stat
import time
import tomllib
from pathlib import Path

import httpx

from rbee_agent import __version__
from rbee_tui.events import Event, Finished, OutputLine, PhaseStarted
from rbee_tui.ssh import AgentForward, check_connection, install_agent, stop_agent
from tests.ssh_support import OpenSshd, SshEnv, fast_settings, pid_alive
from tests.support import free_port

INSTALL_BUDGET_S = 120  # a cached llama-cpp-python wheel keeps it far below this

pytest_plugins = ["tests.ssh_fixtures"]  # ssh_env, asyncssh_server, sshd, tiny_http…


async def collect(flow: object) -> list[Event]:
    return [event async for event in flow]  # type: ignore[attr-defined]


async def test_b06_install_over_openssh_then_health_upgrade_and_stop(
        ssh_env: SshEnv, sshd: OpenSshd) -> None:
    node = ssh_env.node(sshd.port, agent_port=free_port())
    settings = fast_settings()
    await collect(check_connection(node, settings, accept_new_host_key=True))
    pids: list[int] = []
    try:
        started = time.monotonic()
        events = await collect(install_agent(node, settings))
        took = time.monotonic() - started
        print(f"\nfirst install over SSH took {took:.1f} s")
        assert [e.phase for e in events if isinstance(e, PhaseStarted)] == [
            "ssh", "python", "upload", "venv", "pip", "config", "start", "health"]
        pip = [e.line for e in events if isinstance(e, OutputLine) and e.phase == "pip"]
        assert not any("Building wheel for llama-cpp-python" in line for line in pip), \
            "llama-cpp-python was rebuilt: pip's wheel cache was not used"
        assert took < INSTALL_BUDGET_S
        done = events[-1]
        assert isinstance(done, Finished)
        key = done.data["api_key"]
        pids.append(done.data["pid"])
        assert done.data["agent_version"] == __version__
        assert done.data["api_key_reused"] is False
        assert key not in done.message

        root = Path(node.install_path)
        config_file = root / "agent.toml"
        assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
        config = tomllib.loads(config_file.read_text())
        assert config["api_key"] == key and config["host"] == "127.0.0.1"
        assert config["port"] == node.agent_port and config["data_dir"] == str(root / "data")
        assert (root / "venv" / "bin" / "rbee-agent").exists()

        # B10: the agent answers through a forward over the node's SSH connection
        forward = AgentForward(node, settings)
        try:
            url = await forward.url()
            async with httpx.AsyncClient(timeout=10) as http:
                health = (await http.get(url + "/v1/health")).json()
                assert health["version"] == __version__
                authed = await http.get(url + "/v1/node",
                                        headers={"Authorization": f"Bearer {key}"})
                assert authed.status_code == 200, authed.text
        finally:
            await forward.aclose()

        # B06: re-running upgrades in place: the old agent stops, the key stays
        again = await collect(install_agent(node, settings))
        phases = [e.phase for e in again if isinstance(e, PhaseStarted)]
        assert phases == ["ssh", "python", "upload", "stop", "venv", "pip", "config", "start",
                          "health"]
        redone = again[-1]
        assert isinstance(redone, Finished)
        pids.append(redone.data["pid"])
        assert redone.data["api_key"] == key and redone.data["api_key_reused"] is True
        assert redone.data["pid"] != pids[0] and not pid_alive(pids[0])

        stopped = await collect(stop_agent(node, settings))
        assert stopped[-1].data == {"stopped": True, "pid": pids[1]}  # type: ignore[union-attr]
        assert not pid_alive(pids[1])
    finally:
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, 9)
