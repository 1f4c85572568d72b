"""B200, B206-B208: `rbee` splits SmolLM2 over localhost and a node reached through the real
loopback sshd of the SSH tests; the RPC traffic goes through the SSH tunnel this command
holds. Two agents on this machine: rbee's local agent (the head) and a test agent (the peer).
"""

from __future__ import annotations

import json
import signal
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest
import tomli_w

from tests.agent_support import AgentProc
from tests.cli_support import RbeeEnv
from tests.ssh_support import OpenSshd, SshEnv, pid_alive
from tests.test_ssh_operator import FAST, add_args

pytest_plugins = ["tests.ssh_fixtures"]

ARGS = ["--prompt", "The capital of France is", "--temperature", "0", "--max-tokens", "24",
        "--raw"]


@pytest.fixture
def peer(rbee: RbeeEnv, ssh_env: SshEnv, sshd: OpenSshd,
         start_agent: Callable[..., AgentProc]) -> Iterator[AgentProc]:
    """Node 'peer': an agent on this machine that rbee reaches only through sshd."""
    agent = start_agent("peer")
    rbee.write_config(FAST)
    added = rbee.run(*add_args(ssh_env, sshd.port, "peer", "--accept-new-host-key"),
                     "--agent-port", str(agent.port))
    assert added.returncode == 0, added.stderr
    config = tomllib.loads(rbee.config.read_text())
    config["nodes"]["peer"]["api_key"] = agent.key
    rbee.config.write_bytes(tomli_w.dumps(config).encode())
    yield agent


def rpc_servers(agent: AgentProc) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = agent.get("/v1/rpc-servers").json()
    return listed


def workers_of(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True)
            if "rbee_agent.worker" in " ".join(p.cmdline())]


def wait_for(check: Callable[[], Any], what: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_b208_infer_split_over_ssh_equals_the_single_node_text(
        rbee: RbeeEnv, peer: AgentProc) -> None:
    single = rbee.run("infer", "--node", "localhost", *ARGS, "--json")
    assert single.returncode == 0, single.stderr
    split = rbee.run("infer", "--split", "localhost,peer", *ARGS, "--json")
    assert split.returncode == 0, split.stderr
    assert json.loads(split.stdout)["text"] == json.loads(single.stdout)["text"]
    assert "reached from localhost at 127.0.0.1:" in split.stderr and "over SSH" in split.stderr
    assert "on localhost, " in split.stderr and " on peer" in split.stderr, "layers per node"
    assert rpc_servers(peer) == [], "the split's RPC server is stopped when it ends"
    head_pid = rbee.agent_pid()
    assert head_pid is not None
    assert len(workers_of(head_pid)) == 1, "only the single-node worker is left"


def test_b207_spawn_split_holds_the_tunnel_until_ctrl_c(rbee: RbeeEnv, peer: AgentProc
                                                        ) -> None:
    proc = rbee.popen("workers", "spawn", "--model", "smollm2-135m", "--split",
                      "localhost,peer")
    assert proc.stderr is not None
    lines: list[str] = []
    for line in proc.stderr:
        lines.append(line)
        if "Ctrl-C stops the split worker" in line:
            break
    assert proc.poll() is None, "".join(lines)
    [server] = rpc_servers(peer)
    assert server["clients"] >= 1, "the split worker holds the server through the tunnel"
    listed = rbee.run("workers", "list", "--node", "localhost")
    assert "(split: localhost" in listed.stdout, listed.stdout
    listening = [(c.laddr.ip, c.laddr.port) for c in
                 psutil.Process(server["pid"]).net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN]
    assert listening == [("127.0.0.1", server["port"])], "B200: loopback only"
    head_pid = rbee.agent_pid()
    assert head_pid is not None
    [worker] = workers_of(head_pid)
    cmdline = worker.cmdline()
    endpoint = cmdline[cmdline.index("--rpc") + 1]
    tunnel_port = int(endpoint.rsplit(":", 1)[1])
    assert tunnel_port != server["port"], "the worker goes through the tunnel, not direct"
    holders = [c.pid for c in psutil.net_connections("tcp")
               if c.status == psutil.CONN_LISTEN and c.laddr.port == tunnel_port]
    assert holders == [proc.pid], "the tunnel's local end is held by the rbee command"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130
    assert wait_for(lambda: not pid_alive(worker.pid), "the split worker to stop")
    assert wait_for(lambda: not pid_alive(server["pid"]), "the RPC server to stop")
    assert rpc_servers(peer) == []


def test_b206_peer_killed_mid_stream_names_it_and_leaves_nothing(
        rbee: RbeeEnv, peer: AgentProc) -> None:
    proc = rbee.popen("infer", "--split", "localhost,peer", "--prompt", "Once upon a time",
                      "--temperature", "0", "--max-tokens", "2000", "--raw")
    assert proc.stdout is not None and proc.stderr is not None
    got: list[str] = []
    first_tokens = threading.Event()

    def read_tokens() -> None:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(1):
            got.append(chunk)
            if len(got) >= 20:
                first_tokens.set()
        first_tokens.set()

    threading.Thread(target=read_tokens, daemon=True).start()
    assert first_tokens.wait(180), "no tokens"
    [server] = rpc_servers(peer)
    head_pid = rbee.agent_pid()
    assert head_pid is not None
    [worker] = workers_of(head_pid)
    psutil.Process(server["pid"]).kill()
    code = proc.wait(120)
    stderr = proc.stderr.read()
    assert code == 1, stderr
    assert "Node 'peer' of the split lost its RPC server" in stderr
    assert "Traceback" not in stderr
    assert wait_for(lambda: not pid_alive(worker.pid), "the split worker to be gone")
    assert rpc_servers(peer) == [], "the failed RPC server is cleaned up on the peer"
    assert workers_of(head_pid) == []


def test_b207_a_remote_head_reaches_the_peer_through_a_remote_forward(
        rbee: RbeeEnv, peer: AgentProc) -> None:
    """Head 'peer' (an SSH node), RPC server on localhost: the head's loopback comes back
    over its SSH connection to this command and on to the local RPC server."""
    single = rbee.run("infer", "--node", "peer", *ARGS, "--json")
    assert single.returncode == 0, single.stderr
    split = rbee.run("infer", "--split", "peer,localhost", *ARGS, "--json")
    assert split.returncode == 0, split.stderr
    assert json.loads(split.stdout)["text"] == json.loads(single.stdout)["text"]
    assert "reached from peer at 127.0.0.1:" in split.stderr
    assert [w["split"] for w in peer.get("/v1/workers").json()["workers"]] == [[]]


def test_b206_the_tunnel_dropped_mid_stream_names_the_node_and_leaves_nothing(
        rbee: RbeeEnv, peer: AgentProc, sshd: OpenSshd) -> None:
    proc = rbee.popen("infer", "--split", "localhost,peer", "--prompt", "Once upon a time",
                      "--temperature", "0", "--max-tokens", "2000", "--raw")
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(20), "no tokens"
    [server] = rpc_servers(peer)
    head_pid = rbee.agent_pid()
    assert head_pid is not None
    [worker] = workers_of(head_pid)
    for session in psutil.Process(sshd.proc.pid).children(recursive=True):
        session.kill()  # every SSH connection drops: the tunnel and the agent link
    code = proc.wait(120)
    stderr = proc.stderr.read()
    assert code == 1, stderr
    assert "Node 'peer' of the split cannot be reached" in stderr, stderr
    assert wait_for(lambda: not pid_alive(worker.pid), "the split worker to be gone")
    assert wait_for(lambda: not pid_alive(server["pid"]), "the RPC server to be stopped")
    assert rpc_servers(peer) == [], "stopped through a reopened SSH link"


def test_b206_load_progress_names_the_node_whose_layers_load() -> None:
    from rbee_agent.protocol import SplitPart
    from rbee_tui.ops.split import loading_where

    layout = [SplitPart(node=None, layers=10), SplitPart(node="gpu1", layers=12, endpoint="x"),
              SplitPart(node="gpu2", layers=8, endpoint="y")]
    assert loading_where(layout, "localhost", 3) == "→ localhost"
    assert loading_where(layout, "localhost", 10) == "→ gpu1"
    assert loading_where(layout, "localhost", 29) == "→ gpu2"
    assert loading_where(layout, "localhost", 30) == "10 on localhost, 12 on gpu1, 8 on gpu2"


def test_b207_stopping_the_split_worker_ends_the_held_split(rbee: RbeeEnv, peer: AgentProc
                                                            ) -> None:
    proc = rbee.popen("workers", "spawn", "--model", "smollm2-135m", "--split",
                      "localhost,peer", "--json")
    assert proc.stdout is not None and proc.stderr is not None
    text = ""
    for line in proc.stdout:  # one JSON document, printed once the split serves
        text += line
        if line.rstrip() == "}":
            break
    worker = json.loads(text)
    assert {p["node"] for p in worker["split"]} == {None, "peer"}
    [server] = rpc_servers(peer)
    stopped = rbee.run("workers", "stop", "--node", "localhost", "--id", worker["id"])
    assert stopped.returncode == 0, stopped.stderr
    assert proc.wait(60) == 0, proc.stderr.read()
    assert "its RPC servers are stopped too" in proc.stderr.read()
    assert not pid_alive(server["pid"]) and rpc_servers(peer) == []


def test_b208_a_peer_that_cannot_serve_is_named_and_nothing_is_left(
        rbee: RbeeEnv, peer: AgentProc) -> None:
    split = rbee.run("infer", "--split", "localhost,peer", "--rpc-device", "cuda3", *ARGS)
    assert split.returncode == 1
    assert "Node 'peer' could not start an RPC server: No GPU 3 on this node" in split.stderr
    assert rpc_servers(peer) == []
    head_pid = rbee.agent_pid()
    assert head_pid is None or workers_of(head_pid) == []
    usage = rbee.run("infer", "--split", "localhost", *ARGS)
    assert usage.returncode == 2 and "a split needs the head node and at least one more" \
        in usage.stderr
