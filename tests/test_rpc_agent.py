"""B201, B204-B206: two real agents on this machine; one runs an RPC server, the other a
split worker that puts SmolLM2's last layers on it (no SSH here: tests/test_rpc_split.py
adds the tunnel)."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import psutil
import pytest

from tests.agent_support import AgentProc
from tests.ssh_support import pid_alive

PROMPT = "The capital of France is"


def start_rpc(agent: AgentProc) -> dict[str, Any]:
    r = agent.post("/v1/rpc-servers", json={"device": "cpu"})
    assert r.status_code == 201, r.text
    return dict(r.json())


def peer_of(server: dict[str, Any], name: str = "peer") -> dict[str, Any]:
    return {"node": name, "endpoint": f"127.0.0.1:{server['port']}",
            "free_mb": server["free_mb"]}


def greedy(agent: AgentProc, worker_id: str, max_tokens: int = 24) -> str:
    r = agent.post(f"/v1/workers/{worker_id}/inference",
                   json={"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
                         "stream": False})
    assert r.status_code == 200, r.text
    text: str = r.json()["text"]
    return text


def gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_b201_rpc_servers_start_list_in_node_and_stop(
        start_agent: Callable[..., AgentProc]) -> None:
    agent = start_agent("peer")
    server = start_rpc(agent)
    assert server["state"] == "ready" and server["free_mb"] > 0
    listens = [(c.laddr.ip, c.laddr.port) for c in
               psutil.Process(server["pid"]).net_connections("tcp")
               if c.status == psutil.CONN_LISTEN]
    assert listens == [("127.0.0.1", server["port"])], "loopback only (B200)"
    node = agent.get("/v1/node").json()
    assert [s["id"] for s in node["rpc_servers"]] == [server["id"]]
    stopped = agent.delete(f"/v1/rpc-servers/{server['id']}")
    assert stopped.status_code == 200 and stopped.json()["state"] == "stopped"
    assert gone(server["pid"])
    assert agent.get("/v1/rpc-servers").json() == []
    assert agent.get(f"/v1/rpc-servers/{server['id']}").status_code == 404


def test_b201_an_rpc_server_dies_with_its_agent(start_agent: Callable[..., AgentProc]) -> None:
    agent = start_agent("peer")
    server = start_rpc(agent)
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait(10)
    assert gone(server["pid"]), "no orphan RPC server after the agent was killed"


def test_b201_an_rpc_server_offers_at_most_what_it_was_asked(
        start_agent: Callable[..., AgentProc]) -> None:
    agent = start_agent("peer")
    r = agent.post("/v1/rpc-servers", json={"device": "cpu", "mem_mb": 100})
    assert r.status_code == 201 and r.json()["free_mb"] == 100
    assert agent.get(f"/v1/rpc-servers/{r.json()['id']}").json()["free_mb"] == 100


def test_b201_a_gpu_the_node_lacks_is_refused(start_agent: Callable[..., AgentProc]) -> None:
    agent = start_agent("peer")
    r = agent.post("/v1/rpc-servers", json={"device": "cuda7"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "DEVICE_NOT_FOUND"
    bad = agent.post("/v1/rpc-servers", json={"device": "0.0.0.0"})
    assert bad.status_code == 400


def test_b204_split_worker_equals_single_node_and_lists_layers_per_node(
        start_agent: Callable[..., AgentProc]) -> None:
    head, peer = start_agent("head"), start_agent("peer")
    single = head.spawn()
    head.wait_state(single["id"], "idle")
    expected = greedy(head, single["id"])
    server = start_rpc(peer)
    split = head.spawn(rpc=[peer_of(server)], new=True)
    assert split["id"] != single["id"]
    ready = head.wait_state(split["id"], "idle")
    layers = {p["node"]: p["layers"] for p in ready["split"]}
    assert set(layers) == {None, "peer"} and sum(layers.values()) == 30
    assert layers["peer"] > 0
    assert greedy(head, split["id"]) == expected
    again = head.spawn()
    assert again["id"] == single["id"], "a plain spawn is never handed the split worker"


def test_b205_split_asked_layers_and_refused_when_the_nodes_cannot_hold_it(
        start_agent: Callable[..., AgentProc]) -> None:
    head = start_agent("head", **{"ram-reserve-mb": str(psutil.virtual_memory().available
                                                         // 2**20 - 20)})
    r = head.post("/v1/workers", json={"model_ref": "smollm2-135m", "rpc": [
        {"node": "tiny", "endpoint": "127.0.0.1:9", "free_mb": 10}]})
    assert r.status_code == 507, r.text
    error = r.json()["error"]
    assert error["code"] == "INSUFFICIENT_RAM"
    assert "does not fit on these nodes together" in error["message"]
    assert "tiny needs" in error["message"] and "head node needs" in error["message"]
    assert [n["node"] for n in error["details"]["nodes"]] == ["head node", "tiny"]
    outside = head.post("/v1/workers", json={"model_ref": "smollm2-135m", "rpc": [
        {"node": "lan", "endpoint": "10.0.0.5:50052", "free_mb": 10}]})
    assert outside.status_code == 400, "RPC traffic only through a loopback tunnel end"


def test_b206_peer_killed_mid_stream_ends_the_stream_naming_it_and_cleans_up(
        start_agent: Callable[..., AgentProc]) -> None:
    head, peer = start_agent("head"), start_agent("peer")
    server = start_rpc(peer)
    split = head.spawn(rpc=[peer_of(server, "gpu-box")], gpu_layers=15)
    ready = head.wait_state(split["id"], "idle")
    assert {p["node"]: p["layers"] for p in ready["split"]} == {None: 15, "gpu-box": 15}
    events: list[dict[str, Any]] = []
    with httpx.stream("POST", f"{head.url}/v1/workers/{split['id']}/inference",
                      headers=head.headers, timeout=120,
                      json={"prompt": "Once upon a time", "max_tokens": 2000,
                            "temperature": 0}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            events.append(json.loads(line[6:]))
            if len(events) == 3:
                psutil.Process(server["pid"]).kill()
    assert "token" in events[0]
    errors = [e["error"] for e in events if "error" in e]
    assert len(errors) == 1, events[-3:]
    assert "'gpu-box'" in errors[0]["message"] and "RPC" in errors[0]["message"]
    assert gone(ready["pid"]), "the split worker is gone on the head"
    info = head.get(f"/v1/workers/{split['id']}").json()
    assert info["state"] == "failed" and "'gpu-box'" in info["error"]["message"]
    listed = peer.get("/v1/rpc-servers").json()
    assert [s["state"] for s in listed] == ["failed"]
    assert peer.delete(f"/v1/rpc-servers/{server['id']}").status_code == 200
    assert peer.get("/v1/rpc-servers").json() == []


@pytest.mark.parametrize("weights,total,expected", [
    ([1, 1], 30, [15, 15]), ([3, 1], 30, [23, 7]), ([0, 0], 3, [2, 1]),
    ([5, 0, 5], 31, [16, 0, 15]),
])
def test_b204_layers_follow_free_memory(weights: list[int], total: int,
                                       expected: list[int]) -> None:
    from rbee_agent.split_plan import shares

    assert shares(total, weights) == expected


def test_b209_an_rpc_server_nobody_uses_is_stopped(
        start_agent: Callable[..., AgentProc]) -> None:
    agent = start_agent("peer", **{"rpc-unused-stop-s": "3", "idle-check-s": "0.1"})
    server = start_rpc(agent)
    with socket.create_connection(("127.0.0.1", server["port"])):  # a client holds it
        deadline = time.monotonic() + 30
        while agent.get(f"/v1/rpc-servers/{server['id']}").json()["clients"] != 1:
            assert time.monotonic() < deadline, "the client was never seen"
            time.sleep(0.05)
    assert gone(server["pid"]), "stopped once no client held it"
    assert agent.get("/v1/rpc-servers").json() == []


def test_b204_a_split_over_three_nodes(start_agent: Callable[..., AgentProc]) -> None:
    head, one, two = start_agent("head"), start_agent("one"), start_agent("two")
    single = head.spawn()
    head.wait_state(single["id"], "idle")
    expected = greedy(head, single["id"])
    peers = [peer_of(start_rpc(one), "one"), peer_of(start_rpc(two), "two")]
    split = head.spawn(rpc=peers)
    ready = head.wait_state(split["id"], "idle")
    layers = {p["node"]: p["layers"] for p in ready["split"]}
    assert set(layers) == {None, "one", "two"} and sum(layers.values()) == 30
    assert min(layers.values()) >= 8, "about a third each: the nodes offer about the same"
    assert greedy(head, split["id"]) == expected
