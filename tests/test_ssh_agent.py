"""Starting, stopping and reading the agent over SSH (B07), and install failures (B06).

Against the in-process asyncssh server. A "fake install" points the node's venv at this test
run's venv (rbee is installed there), so the real agent starts and stops without pip; the
real pip install runs once, in test_ssh_install.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from rbee_agent import __version__
from rbee_agent.protocol import ErrorCode, RbeeError
from rbee_tui.events import Event, Finished, PhaseDone, PhaseStarted
from rbee_tui.remote_agent import AgentLayout, unit_text
from rbee_tui.ssh import (
    agent_status,
    check_connection,
    fetch_agent_logs,
    install_agent,
    restart_agent,
    start_agent,
    stop_agent,
)
from tests.ssh_support import AsyncSshServer, SshEnv, fake_install, fast_settings, pid_alive
from tests.support import free_port

pytest_plugins = ["tests.ssh_fixtures"]  # ssh_env, asyncssh_server, sshd, tiny_http…


async def run_flow(flow: AsyncIterator[Event]) -> list[Event]:
    return [event async for event in flow]


async def failing(flow: AsyncIterator[Event]) -> tuple[list[Event], RbeeError]:
    events: list[Event] = []
    with pytest.raises(RbeeError) as caught:
        async for event in flow:
            events.append(event)
    return events, caught.value


@pytest.fixture
async def trusted(ssh_env: SshEnv, asyncssh_server: AsyncSshServer) -> AsyncSshServer:
    await run_flow(check_connection(ssh_env.node(asyncssh_server.port), fast_settings(),
                                    accept_new_host_key=True))
    return asyncssh_server


def phases(events: list[Event]) -> list[str]:
    return [e.phase for e in events if isinstance(e, PhaseStarted)]


# ------------------------------------------------------------------ B07


async def test_b07_agent_missing_names_the_install_command(ssh_env: SshEnv,
                                                           trusted: AsyncSshServer) -> None:
    node = ssh_env.node(trusted.port)
    for flow in (start_agent(node, fast_settings()), stop_agent(node, fast_settings()),
                 restart_agent(node, fast_settings())):
        _, err = await failing(flow)
        assert err.code == ErrorCode.AGENT_NOT_INSTALLED
        assert err.hint == "Install it with: rbee nodes install gpu1"
        assert node.install_path in err.message
    status = await agent_status(node, fast_settings())
    assert (status.installed, status.running, status.pid) == (False, False, None)


async def test_b07_start_restart_stop_a_detached_agent(ssh_env: SshEnv,
                                                       trusted: AsyncSshServer) -> None:
    node = ssh_env.node(trusted.port, agent_port=free_port())
    root = fake_install(Path(node.install_path), node.agent_port)
    settings = fast_settings()
    pids: list[int] = []
    try:
        events = await run_flow(start_agent(node, settings))
        assert phases(events) == ["ssh", "start", "health"]
        done = events[-1]
        assert isinstance(done, Finished)
        assert done.data["agent_version"] == __version__ and done.data["manager"] == "process"
        pid = done.data["pid"]
        pids.append(pid)
        assert pid_alive(pid) and (root / "agent.pid").read_text().strip() == str(pid)

        # starting again is a no-op: one agent per node
        again = await run_flow(start_agent(node, settings))
        assert again[-1].data["pid"] == pid  # type: ignore[union-attr]
        assert any(isinstance(e, PhaseDone) and "Already running" in e.message for e in again)

        events = await run_flow(restart_agent(node, settings))
        assert phases(events) == ["ssh", "stop", "start", "health"]
        new_pid = events[-1].data["pid"]  # type: ignore[union-attr]
        pids.append(new_pid)
        assert new_pid != pid and not pid_alive(pid) and pid_alive(new_pid)

        status = await agent_status(node, settings)
        assert (status.running, status.pid, status.version) == (True, new_pid, __version__)

        events = await run_flow(stop_agent(node, settings))
        assert events[-1] == Finished("The agent of node 'gpu1' stopped",
                                      data={"stopped": True, "pid": new_pid})
        assert not pid_alive(new_pid) and not (root / "agent.pid").exists()
        again = await run_flow(stop_agent(node, settings))
        assert again[-1].data == {"stopped": False, "pid": None}  # type: ignore[union-attr]
    finally:
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, 9)


async def test_b07_an_agent_that_dies_on_start_shows_its_output(
        ssh_env: SshEnv, trusted: AsyncSshServer) -> None:
    node = ssh_env.node(trusted.port, agent_port=free_port())
    fake_install(Path(node.install_path), node.agent_port, idle_timeout_s=-5)
    events, err = await failing(start_agent(node, fast_settings()))
    assert phases(events) == ["ssh", "start", "health"]
    assert err.code == ErrorCode.AGENT_UNREACHABLE
    assert "exited while starting" in err.message
    assert "Invalid agent setting 'idle_timeout_s'" in err.message
    assert err.details["log"].endswith("logs/agent.out")
    assert any("idle_timeout_s" in line for line in err.details["log_tail"])
    # the same output, fetched on its own (B07: a node whose agent won't start)
    tails = await fetch_agent_logs(node, fast_settings(), lines=5)
    assert tails[0].source == err.details["log"]
    assert any("idle_timeout_s" in line for line in tails[0].lines)


async def test_b07_stop_waits_then_kills_and_spares_strangers(
        ssh_env: SshEnv, trusted: AsyncSshServer) -> None:
    from rbee_tui.ssh import RemoteAgent, connect

    node = ssh_env.node(trusted.port)
    root = fake_install(ssh_env.install, 9)
    stubborn = await asyncio.create_subprocess_exec(sys.executable, "-c", IGNORES_SIGTERM,
                                                    "rbee_agent", stdout=asyncio.subprocess.PIPE)
    stranger = await asyncio.create_subprocess_exec("sleep", "30")
    try:
        assert stubborn.stdout is not None
        assert await stubborn.stdout.readline() == b"ready\n"  # its SIGTERM handler is set
        async with connect(node, fast_settings()) as conn:
            agent = await RemoteAgent.open(conn)
            (root / "agent.pid").write_text(f"{stranger.pid}\n")
            assert await agent.stop(timeout_s=0.3) is None  # not an agent: left alone
            assert stranger.returncode is None and not (root / "agent.pid").exists()
            (root / "agent.pid").write_text(f"{stubborn.pid}\n")
            started = time.monotonic()
            assert await agent.stop(timeout_s=0.5) == stubborn.pid
            waited = time.monotonic() - started
        assert await stubborn.wait() == -signal.SIGKILL  # SIGTERM was ignored: SIGKILL
        assert 0.5 <= waited < 3
        assert stranger.returncode is None
    finally:
        for proc in (stubborn, stranger):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


IGNORES_SIGTERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
                  "print('ready', flush=True); time.sleep(30)"


def test_b07_systemd_unit_runs_the_agent_from_the_venv() -> None:
    layout = AgentLayout("/home/ann/rbee agent", 9201)
    text = unit_text(layout, stop_timeout_s=40)
    assert layout.unit_name == "rbee-agent-9201.service"
    assert ('ExecStart="/home/ann/rbee agent/venv/bin/python" "-m" "rbee_agent" "serve" '
            '"--config" "/home/ann/rbee agent/agent.toml"') in text
    assert "KillSignal=SIGTERM" in text and "TimeoutStopSec=40" in text
    assert "WantedBy=default.target" in text


# ------------------------------------------------------------------ B06 failures (fast)


async def test_b06_old_python_is_refused_before_anything_is_uploaded(
        ssh_env: SshEnv, trusted: AsyncSshServer, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = ssh_env.tmp / "oldbin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text("#!/bin/sh\necho version=3.9.18\necho path=/usr/bin/python3.9\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")  # the server's commands see it
    node = ssh_env.node(trusted.port)
    events, err = await failing(install_agent(node, fast_settings()))
    assert phases(events) == ["ssh", "python"]
    assert err.code == ErrorCode.INSTALL_FAILED
    assert "'python'" in err.message and "3.9.18" in err.message and "3.11" in err.message
    assert err.hint and "python3-venv" in err.hint
    assert not ssh_env.install.exists()


async def test_b06_a_failing_step_is_named_with_the_remote_stderr(
        ssh_env: SshEnv, trusted: AsyncSshServer) -> None:
    blocker = ssh_env.tmp / "not-a-dir"
    blocker.write_text("")
    node = ssh_env.node(trusted.port, install_path=str(blocker / "rbee"))
    events, err = await failing(install_agent(node, fast_settings()))
    assert phases(events) == ["ssh", "python", "upload"]
    assert err.code == ErrorCode.INSTALL_FAILED
    assert err.details["step"] == "upload" and "'upload'" in err.message
    assert any("Not a directory" in line for line in err.details["stderr_tail"])
    assert "mkdir" in err.details["command"]
    assert err.hint and str(blocker / "rbee") in err.hint


async def test_b06_config_keeps_the_key_and_extra_settings(ssh_env: SshEnv,
                                                           trusted: AsyncSshServer) -> None:
    """The config step alone (an upgrade keeps the node's key unless told otherwise)."""
    from rbee_tui.install import _Steps
    from rbee_tui.remote_agent import RemoteAgent
    from rbee_tui.ssh import connect

    node = ssh_env.node(trusted.port, agent_port=9333)
    root = ssh_env.install
    root.mkdir()
    (root / "agent.toml").write_text('api_key = "old-key"\nworker_slots = 4\nport = 1\n')
    (root / "agent.toml").chmod(0o644)
    async with connect(node, fast_settings()) as conn:
        steps = _Steps(conn, await RemoteAgent.open(conn))
        assert await steps.config(None, False) == ("old-key", True)
        text = (root / "agent.toml").read_text()
        assert stat.S_IMODE((root / "agent.toml").stat().st_mode) == 0o600
        assert "worker_slots = 4" in text and "port = 9333" in text
        assert 'host = "127.0.0.1"' in text and f'data_dir = "{root}/data"' in text
        assert f'log_dir = "{root}/logs"' in text
        key, reused = await steps.config(None, True)
        assert not reused and key != "old-key" and len(key) >= 32
        assert await steps.config("given-key", False) == ("given-key", False)
    assert (root / "data").is_dir() and (root / "logs").is_dir()
