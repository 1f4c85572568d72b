"""`rbee nodes …` end to end (B01-B08, B10): a real OpenSSH sshd on loopback, a real agent
install into a temporary path, and `rbee infer` through the SSH port forward."""

from __future__ import annotations

import getpass
import json
import re
import stat
import tomllib

import tomli_w

from rbee_agent import __version__
from tests.cli_support import RbeeEnv
from tests.ssh_support import OpenSshd, SshEnv
from tests.support import free_port

pytest_plugins = ["tests.ssh_fixtures"]

FAST = {"ssh_connect_timeout_s": 2.0, "ssh_backoff_ms": [0, 20, 40]}


def add_args(env: SshEnv, port: int, name: str = "n1") -> list[str]:
    return ["nodes", "add", "--name", name, "--ssh-host", "127.0.0.1", "--ssh-port", str(port),
            "--ssh-user", getpass.getuser(), "--ssh-key", str(env.key),
            "--install-path", str(env.install)]


def registry(rbee: RbeeEnv) -> dict:
    return tomllib.loads(rbee.config.read_text()).get("nodes", {})


def test_b01_b06_b10_add_install_then_infer_through_the_forward(
    rbee: RbeeEnv, ssh_env: SshEnv, sshd: OpenSshd
) -> None:
    rbee.write_config(FAST)
    refused = rbee.run(*add_args(ssh_env, sshd.port))
    assert refused.returncode == 1 and "host key" in refused.stderr.lower()
    assert "--accept-new-host-key" in refused.stderr and "n1" not in registry(rbee)
    added = rbee.run(*add_args(ssh_env, sshd.port), "--accept-new-host-key")
    assert added.returncode == 0, added.stderr
    assert "attempt 1/3" in added.stderr
    node = registry(rbee)["n1"]
    assert node["status"] == "reachable" and node["last_connected"] > 0
    assert stat.S_IMODE(rbee.config.stat().st_mode) == 0o600

    port = free_port()
    edit = rbee.run("nodes", "edit", "n1", "--agent-port", str(port))
    assert edit.returncode == 0, edit.stderr
    try:
        install = rbee.run("nodes", "install", "n1", timeout=300)
        assert install.returncode == 0, install.stderr
        for step in ("Checking python3", "Uploading rbee", "pip install rbee[agent]",
                     "agent.toml", "Starting the agent", "Waiting for the agent"):
            assert step in install.stderr, step
        node = registry(rbee)["n1"]
        assert node["agent_version"] == __version__ and len(node["api_key"]) >= 32

        infer = rbee.run("infer", "--node", "n1", "--raw", "--prompt", "The capital of France is",
                         "--max-tokens", "8", "--temperature", "0", "--json", timeout=300)
        assert infer.returncode == 0, infer.stderr
        assert "Paris" in json.loads(infer.stdout)["text"]
        listed = json.loads(rbee.run("workers", "list", "--node", "n1", "--json").stdout)
        assert listed and listed[0]["model_id"] == "smollm2-135m"
        check = rbee.run("nodes", "check", "n1", "--json")
        assert check.returncode == 0 and json.loads(check.stdout)["agent_version"] == __version__
        assert check.stderr.count("answered (") == 1, "the SSH summary is said once"
    finally:
        stop = rbee.run("nodes", "stop", "n1")
    assert stop.returncode == 0, stop.stderr
    config = tomllib.loads(rbee.config.read_text())
    config["settings"]["cold_start"] = False  # else the agent is started again (B143)
    rbee.config.write_bytes(tomli_w.dumps(config).encode())
    down = rbee.run("infer", "--node", "n1", "--prompt", "x")
    assert down.returncode == 1 and "rbee nodes start n1" in down.stderr


def test_b01_missing_key_file_is_refused_before_connecting(rbee: RbeeEnv, ssh_env: SshEnv
                                                          ) -> None:
    args = add_args(ssh_env, free_port())
    args[args.index("--ssh-key") + 1] = str(ssh_env.tmp / "no-such-key")
    r = rbee.run(*args)
    assert r.returncode == 1 and "no-such-key" in r.stderr and "attempt" not in r.stderr
    assert "n1" not in registry(rbee)


def test_b02_unreachable_host_is_its_own_message_and_nothing_is_saved(
    rbee: RbeeEnv, ssh_env: SshEnv, closed_port: int
) -> None:
    rbee.write_config(FAST)
    r = rbee.run(*add_args(ssh_env, closed_port))
    assert r.returncode == 1
    assert r.stderr.count("attempt") >= 3 and f"127.0.0.1:{closed_port}" in r.stderr
    assert "n1" not in registry(rbee)


def test_b02_refused_login_explains_the_fix(rbee: RbeeEnv, ssh_env: SshEnv, sshd: OpenSshd
                                            ) -> None:
    rbee.write_config(FAST)
    args = add_args(ssh_env, sshd.port)
    args[args.index("--ssh-key") + 1] = str(ssh_env.other_key)
    r = rbee.run(*args, "--accept-new-host-key")
    assert r.returncode == 1 and "authorized_keys" in r.stderr
    assert "n1" not in registry(rbee)


def test_b03_b04_b05_duplicate_list_edit_remove(rbee: RbeeEnv, ssh_env: SshEnv,
                                                sshd: OpenSshd) -> None:
    rbee.write_config(FAST)
    assert rbee.run(*add_args(ssh_env, sshd.port), "--accept-new-host-key").returncode == 0
    dup = rbee.run(*add_args(ssh_env, sshd.port))
    assert dup.returncode == 1
    assert "rbee nodes edit n1" in dup.stderr and "rbee nodes remove n1" in dup.stderr
    listed = json.loads(rbee.run("nodes", "list", "--json").stdout)
    assert [n["name"] for n in listed] == ["localhost", "n1"]
    assert all("api_key" not in n for n in listed)
    table = rbee.run("nodes", "list").stdout  # live: n1 answers SSH, but has no agent
    assert "n1" in table and f"127.0.0.1:{sshd.port}" in table
    assert re.search(r"n1 .* down .* (Cannot reach|does not accept)", table), table
    assert registry(rbee)["n1"]["status"] == "agent down"
    assert rbee.run("nodes", "edit", "n1", "--install-path", "/opt/rbee").returncode == 0
    assert registry(rbee)["n1"]["install_path"] == "/opt/rbee"
    assert rbee.run("nodes", "remove", "n1").returncode == 2  # not a terminal: needs --yes
    assert "n1" in registry(rbee)
    assert rbee.run("nodes", "remove", "n1", "--yes").returncode == 0
    assert "n1" not in registry(rbee)
    assert rbee.run("nodes", "remove", "localhost", "--yes").returncode == 1
