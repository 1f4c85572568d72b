"""Operator truthfulness over real SSH (B140, B143, B145, B149): OpenSSH's sshd on loopback
for the `rbee` command, the in-process asyncssh server where a test must shape the node."""

from __future__ import annotations

import getpass
import json
import re
import shutil
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
import tomli_w

from rbee_agent.protocol import ErrorCode, RbeeError
from rbee_tui.events import Event, OutputLine, Progress
from rbee_tui.install import _build_cuda, _Steps
from rbee_tui.remote_agent import RemoteAgent
from rbee_tui.ssh import check_connection, connect
from rbee_tui.ssh import start_agent as ssh_start_agent
from tests.agent_support import AgentProc
from tests.cli_support import RbeeEnv
from tests.ssh_support import (
    AsyncSshServer,
    OpenSshd,
    SshEnv,
    fake_install,
    fast_settings,
    start_sshd,
)
from tests.support import free_port

pytest_plugins = ["tests.ssh_fixtures"]

FAST = {"ssh_connect_timeout_s": 5.0, "ssh_retry": {"attempts": 3, "backoff_s": [0.05]}}


def add_args(env: SshEnv, port: int, name: str, *extra: str) -> list[str]:
    return ["nodes", "add", "--name", name, "--ssh-host", "127.0.0.1", "--ssh-port",
            str(port), "--ssh-user", getpass.getuser(), "--ssh-key", str(env.key),
            "--install-path", str(env.install), *extra]


def registry(rbee: RbeeEnv) -> dict:
    return tomllib.loads(rbee.config.read_text()).get("nodes", {})


# ------------------------------------------------------------------ B145


def test_b145_twenty_parallel_nodes_add_leave_twenty_nodes(rbee: RbeeEnv, ssh_env: SshEnv,
                                                           sshd: OpenSshd) -> None:
    rbee.write_config(FAST)
    first = rbee.run(*add_args(ssh_env, sshd.port, "n0", "--accept-new-host-key"))
    assert first.returncode == 0, first.stderr
    procs = [rbee.popen(*add_args(ssh_env, sshd.port, f"p{i}")) for i in range(20)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    assert all(code == 0 for code, _ in results), [err for code, err in results if code]
    assert sorted(registry(rbee)) == sorted(["n0", *(f"p{i}" for i in range(20))])
    leftovers = [p.name for p in rbee.config.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == [], "no temp file (they hold keys) outlives a save"


# ------------------------------------------------------------------ B143


def test_b143_a_dead_agent_is_started_over_ssh_and_inference_updates_last_contact(
        rbee: RbeeEnv, ssh_env: SshEnv, sshd: OpenSshd) -> None:
    rbee.write_config(FAST)
    port = free_port()
    added = rbee.run(*add_args(ssh_env, sshd.port, "n1", "--accept-new-host-key"),
                     "--agent-port", str(port))
    assert added.returncode == 0, added.stderr
    assert added.stderr.count("answered (") == 1
    fake_install(ssh_env.install, port)
    config = tomllib.loads(rbee.config.read_text())
    config["nodes"]["n1"]["api_key"] = "test-key-123456"
    rbee.config.write_bytes(tomli_w.dumps(config).encode())
    try:
        listed = rbee.run("models", "list", "--node", "n1", "--json")
        assert listed.returncode == 0, listed.stderr
        assert "the agent of node 'n1' does not answer: starting it over SSH" in listed.stderr
        assert any(m["id"] == "smollm2-135m" for m in json.loads(listed.stdout))
        before = registry(rbee)["n1"]["last_connected"]
        time.sleep(0.01)
        infer = rbee.run("infer", "--node", "n1", "--prompt", "Hi", "--max-tokens", "3")
        assert infer.returncode == 0, infer.stderr
        assert "starting it over SSH" not in infer.stderr, "it answers now"
        after = registry(rbee)["n1"]
        assert after["last_connected"] > before and after["status"] == "agent up"
        check = rbee.run("nodes", "check", "n1")
        assert check.returncode == 0, check.stderr
        assert check.stderr.count("answered (") == 1, "the SSH summary is said once"
        assert check.stderr.count("✓ n1: agent") == 1 and "no GPU" in check.stderr
    finally:
        stopped = rbee.run("nodes", "stop", "n1")
    assert stopped.returncode == 0, stopped.stderr


# ------------------------------------------------------------------ B149


def test_b149_install_with_cuda_on_a_node_without_nvcc_names_the_package(
        rbee: RbeeEnv, ssh_env: SshEnv) -> None:
    # a node whose PATH and CUDA_HOME hold no nvcc (this machine may have one elsewhere)
    server = start_sshd(ssh_env.tmp / "sshd-no-cuda", [ssh_env.key],
                        env={"PATH": "/usr/bin:/bin", "CUDA_HOME": "/nonexistent"})
    if Path("/opt/cuda/bin/nvcc").exists() or Path("/usr/bin/nvcc").exists():
        pytest.skip("nvcc is in a place every node searches: the error cannot be provoked")
    try:
        rbee.write_config(FAST)
        assert rbee.run(*add_args(ssh_env, server.port, "n1", "--accept-new-host-key")
                        ).returncode == 0
        r = rbee.run("nodes", "install", "n1", "--backend", "cuda")
    finally:
        server.stop()
    assert r.returncode == 1
    assert "failed at step 'gpu': the CUDA compiler nvcc is not on the node" in r.stderr
    assert "sudo apt install nvidia-cuda-toolkit" in r.stderr
    assert "rbee nodes install n1 --backend cuda" in r.stderr
    assert "Uploading" not in r.stderr and not (ssh_env.install / "wheels").exists(), \
        "it fails before anything is changed on the node"


async def test_b149_a_node_with_nvcc_is_found_over_real_ssh(ssh_env: SshEnv, sshd: OpenSshd
                                                           ) -> None:
    if not (shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()):  # noqa: ASYNC240
        pytest.skip("this machine has no nvcc to find")
    async with connect(ssh_env.node(sshd.port), fast_settings(),
                       accept_new_host_key=True) as conn:
        facts = await _Steps(conn, await RemoteAgent.open(conn)).gpu()
    assert facts["nvcc"].endswith("/nvcc")
    assert re.fullmatch(r"\d+\.\d+", facts["nvcc_version"]), facts


@pytest.fixture
async def trusted(ssh_env: SshEnv, asyncssh_server: AsyncSshServer) -> AsyncSshServer:
    async for _ in check_connection(ssh_env.node(asyncssh_server.port), fast_settings(),
                                    accept_new_host_key=True):
        pass
    return asyncssh_server


async def test_b149_nvcc_found_and_the_build_log_streams_with_progress(
        ssh_env: SshEnv, trusted: AsyncSshServer, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = ssh_env.tmp / "cuda" / "bin"
    bin_dir.mkdir(parents=True)
    nvcc = bin_dir / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    nvcc.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path('/usr/bin')}:{Path('/bin')}")
    async with connect(ssh_env.node(trusted.port), fast_settings()) as conn:
        steps = _Steps(conn, await RemoteAgent.open(conn))
        facts = await steps.gpu()
        assert facts["nvcc"] == str(nvcc) and facts["nvcc_version"] == "12.4"
        log = "[  9%] Building C object a.o\nwarning: x\n[ 55%] Building CUDA object b.o\n" \
              "[100%] Linking CXX shared library libllama.so\n"
        monkeypatch.setattr(_Steps, "cuda_command", lambda self, nvcc: f"printf '%s' '{log}'")
        events: list[Event] = [e async for e in _build_cuda(conn, steps, str(nvcc))]
    assert [e.line for e in events if isinstance(e, OutputLine)] == log.splitlines()
    assert [e.done for e in events if isinstance(e, Progress)] == [9, 55, 100]


# ------------------------------------------------------------------ B140


async def test_b140_a_remote_agent_whose_port_is_taken_is_not_reported_started(
        ssh_env: SshEnv, trusted: AsyncSshServer,
        start_agent: Callable[..., AgentProc]) -> None:
    squatter = start_agent("squatter")  # another agent, another key, on the node's port
    node = ssh_env.node(trusted.port, agent_port=squatter.port)
    fake_install(Path(node.install_path), squatter.port)
    events: list[Event] = []
    with pytest.raises(RbeeError) as caught:
        async for event in ssh_start_agent(node, fast_settings()):
            events.append(event)
    err = caught.value
    assert err.code == ErrorCode.AGENT_UNREACHABLE
    assert "exited while starting" in err.message
    assert f"port {squatter.port} on the node is held by another agent" in err.message
    if shutil.which("ss"):  # the owner, as the node's `ss` shows it
        assert f"(pid {squatter.proc.pid}, user " in err.message
    assert err.details["port_held"] is True
    assert squatter.proc.poll() is None
