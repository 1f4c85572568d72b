"""`rbee serve` with the official `openai` SDK, in front of real agents (B186-B192): two
agents reached over direct HTTP, and one through a real OpenSSH sshd's port forward."""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from rbee_tui.ssh import check_connection
from tests.agent_support import AgentProc, start_agent
from tests.gateway_support import GatewayProc, direct, start_gateway
from tests.ssh_support import OpenSshd, SshEnv, fast_settings
from tests.support import LONG_PROMPT

pytest_plugins = ["tests.ssh_fixtures"]  # ssh_env, sshd

MODEL = "smollm2-135m"
HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[GatewayProc, AgentProc, AgentProc]]:
    home = tmp_path_factory.mktemp("gateway")
    a = start_agent(home / "a", key="key-a")
    b = start_agent(home / "b", key="key-b")
    gateway = start_gateway(home / "rbee", {"localhost": direct(a), "b": direct(b)})
    try:
        yield gateway, a, b
    finally:
        gateway.stop()
        a.stop()
        b.stop()


def stop_workers(*agents: AgentProc) -> None:
    for agent in agents:
        for worker in agent.get("/v1/workers").json()["workers"]:
            agent.delete(f"/v1/workers/{worker['id']}")


def node_of(raw: Any) -> str:
    return str(raw.headers["x-rbee-node"])


# ------------------------------------------------------------------ B186


def test_b186_the_sdk_streams_a_chat_through_the_gateway(fleet: Any) -> None:
    gateway, _, _ = fleet
    raw = gateway.sdk().chat.completions.with_raw_response.create(
        model=MODEL, messages=HELLO, max_tokens=16, stream=True,
        stream_options={"include_usage": True})
    chunks = list(raw.parse())
    assert node_of(raw) in ("localhost", "b")
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    plain = list(gateway.sdk().chat.completions.create(model=MODEL, messages=HELLO,
                                                       max_tokens=4, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices  # none asked: none sent


def test_b186_completion_and_a_json_schema_reply(fleet: Any) -> None:
    gateway, _, _ = fleet
    text = gateway.sdk().completions.create(model=MODEL, prompt="Bees make", max_tokens=6)
    assert text.object == "text_completion" and text.usage is not None
    schema = {"type": "object", "additionalProperties": False, "required": ["color"],
              "properties": {"color": {"type": "string", "enum": ["red", "blue"]}}}
    reply = gateway.sdk().chat.completions.create(
        model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "Pick a colour."}],
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    jsonschema.validate(json.loads(reply.choices[0].message.content or ""), schema)


def test_b186_models_of_every_node_once_and_per_node(fleet: Any) -> None:
    gateway, _, _ = fleet
    ids = [m.id for m in gateway.sdk().models.list()]
    assert ids == [MODEL, f"{MODEL}@localhost", f"{MODEL}@b"]
    assert gateway.sdk().models.retrieve(f"{MODEL}@b").owned_by == "b"


def test_b186_requests_go_to_the_node_with_a_warm_worker(fleet: Any) -> None:
    gateway, a, b = fleet
    stop_workers(a, b)
    worker = b.spawn()
    b.wait_state(worker["id"], "idle")
    for _ in range(2):
        raw = gateway.sdk().chat.completions.with_raw_response.create(
            model=MODEL, messages=HELLO, max_tokens=4)
        assert node_of(raw) == "b"
    assert a.get("/v1/workers").json()["workers"] == []  # nothing started where none was
    pinned = gateway.sdk().chat.completions.with_raw_response.create(
        model=f"{MODEL}@localhost", messages=HELLO, max_tokens=4)
    assert node_of(pinned) == "localhost" and pinned.parse().model == MODEL


def test_b189_a_client_leaving_the_gateway_cancels_on_the_worker(fleet: Any) -> None:
    gateway, a, b = fleet
    raw = gateway.sdk().completions.with_raw_response.create(
        model=MODEL, prompt=LONG_PROMPT, max_tokens=1500, temperature=0, stream=True)
    agent = {"localhost": a, "b": b}[node_of(raw)]
    stream = raw.parse()
    for seen, _ in enumerate(stream):
        if seen == 3:
            break
    stream.close()
    start = time.monotonic()
    while any(w["active_requests"] for w in agent.get("/v1/workers").json()["workers"]):
        assert time.monotonic() - start < 2.0, "the worker kept generating for a gone client"
        time.sleep(0.02)


# ------------------------------------------------------------------ B187


def test_b187_the_gateway_has_its_own_key(fleet: Any) -> None:
    gateway, a, _ = fleet
    key_file = gateway.config.parent / "gateway.key"
    assert key_file.read_text().strip() == gateway.key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    with pytest.raises(openai.AuthenticationError):
        gateway.sdk(key=a.key).models.list()  # an agent's key is not the gateway's
    with pytest.raises(openai.NotFoundError) as missing:
        gateway.sdk().chat.completions.create(model="gpt-4o", messages=HELLO)
    assert missing.value.code == "model_not_found"
    assert gateway.url.startswith("http://127.0.0.1:")
    assert gateway.get("/health", key="").json()["nodes_up"] == ["b", "localhost"]


def test_b187_a_key_file_is_used_as_given(tmp_path: Path, fleet: Any) -> None:
    _, a, _ = fleet
    key_file = tmp_path / "my.key"
    key_file.write_text("my-own-gateway-key\n")
    gateway = start_gateway(tmp_path / "rbee", {"localhost": direct(a)},
                            "--api-key-file", str(key_file))
    try:
        assert gateway.key == "my-own-gateway-key"
        assert [m.id for m in gateway.sdk().models.list()] == [MODEL, f"{MODEL}@localhost"]
        assert not (tmp_path / "rbee" / "gateway.key").exists()
    finally:
        gateway.stop()


# ------------------------------------------------------------------ B190, B192


def test_b190_gateway_metrics_parse_and_need_the_key(fleet: Any) -> None:
    gateway, _, _ = fleet
    list(gateway.sdk().chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5,
                                               stream=True))
    assert gateway.get("/metrics", key="wrong").status_code == 401
    families = gateway.metrics()
    requests = {(s.labels["route"], s.labels["status"]): s.value
                for s in families["rbee_gateway_requests"]}
    assert requests[("/v1/chat/completions", "200")] >= 1
    tokens = [s.value for s in families["rbee_gateway_tokens_generated"]
              if s.labels["model"] == MODEL]
    assert tokens and tokens[0] > 0
    ttft = [s.value for s in families["rbee_gateway_time_to_first_token_seconds"]
            if s.name.endswith("_count")]
    assert ttft and ttft[0] >= 1
    gaps = [s.value for s in families["rbee_gateway_inter_token_seconds"]
            if s.name.endswith("_count")]
    assert gaps and gaps[0] >= 1
    up = {s.labels["node"]: s.value for s in families["rbee_gateway_node_up"]}
    assert up == {"localhost": 1.0, "b": 1.0}
    routed = {s.labels["node"] for s in families["rbee_gateway_routed"]}
    assert routed <= {"localhost", "b"} and routed
    workers = [s for s in families["rbee_gateway_node_workers"]
               if s.labels["state"] == "idle"]
    assert sum(s.value for s in workers) >= 1


# ------------------------------------------------------------------ B188


@pytest.fixture
def warm_a(tmp_path: Path) -> Iterator[tuple[GatewayProc, AgentProc, AgentProc]]:
    """A gateway over two fresh agents, with a warm worker on the first (`localhost`)."""
    a = start_agent(tmp_path / "a", key="key-a")
    b = start_agent(tmp_path / "b", key="key-b")
    gateway = start_gateway(tmp_path / "rbee", {"localhost": direct(a), "b": direct(b)})
    try:
        worker = a.spawn()
        a.wait_state(worker["id"], "idle")
        yield gateway, a, b
    finally:
        gateway.stop()
        a.stop()
        b.stop()


def test_b188_failover_when_an_agent_dies(warm_a: Any, tmp_path: Path) -> None:
    gateway, a, _ = warm_a
    raw = gateway.sdk().completions.with_raw_response.create(
        model=MODEL, prompt=LONG_PROMPT, max_tokens=1500, temperature=0, stream=True)
    assert node_of(raw) == "localhost"  # the warm worker
    stream = raw.parse()
    with pytest.raises(openai.APIError) as broken:
        for seen, _ in enumerate(stream):
            if seen == 3:
                a.proc.kill()  # the node dies mid-stream
    assert "broke off" in broken.value.message
    after = gateway.sdk().chat.completions.with_raw_response.create(
        model=MODEL, messages=HELLO, max_tokens=4)
    assert node_of(after) == "b" and after.parse().choices[0].message.content
    assert gateway.get("/health").json()["nodes_up"] == ["b"]
    with pytest.raises(openai.APIError):  # pinned to a node that is down
        gateway.sdk().chat.completions.create(model=f"{MODEL}@localhost", messages=HELLO,
                                              max_tokens=4)
    # Back when its agent answers again.
    a.proc.wait()
    again = start_agent(tmp_path / "a", key="key-a", port=a.port)
    try:
        deadline = time.monotonic() + 30
        while gateway.get("/health").json()["nodes_up"] != ["b", "localhost"]:
            assert time.monotonic() < deadline, "the node was never marked up again"
            time.sleep(0.05)
        pinned = gateway.sdk().chat.completions.with_raw_response.create(
            model=f"{MODEL}@localhost", messages=HELLO, max_tokens=4)
        assert node_of(pinned) == "localhost"
    finally:
        again.stop()


def test_b188_a_node_that_cannot_be_reached_is_skipped(warm_a: Any, tmp_path: Path) -> None:
    _, a, b = warm_a
    # A gateway that trusts what it saw for a minute: it still believes `localhost` is up
    # and warm when the request comes, and finds out only by trying it.
    gateway = start_gateway(tmp_path / "trusting", {"localhost": direct(a), "b": direct(b)},
                            gateway_state_ttl_s=60.0)
    try:
        gateway.sdk().models.list()  # both nodes seen up, `localhost` with a warm worker
        a.proc.kill()
        a.proc.wait()
        raw = gateway.sdk().chat.completions.with_raw_response.create(
            model=MODEL, messages=HELLO, max_tokens=4)
        assert node_of(raw) == "b"
        assert gateway.get("/health").json()["nodes_up"] == ["b"]
        failed = gateway.metrics()["rbee_gateway_node_up"]
        assert {s.labels["node"]: s.value for s in failed} == {"localhost": 0.0, "b": 1.0}
    finally:
        gateway.stop()


# ------------------------------------------------------------------ over SSH


def test_b186_a_node_behind_openssh_is_served(ssh_env: SshEnv, sshd: OpenSshd,
                                              tmp_path: Path) -> None:
    agent = start_agent(tmp_path / "remote", key="key-remote")
    node = ssh_env.node(sshd.port, agent_port=agent.port, api_key=agent.key)
    settings = fast_settings()

    async def trust() -> None:
        async for _ in check_connection(node, settings, accept_new_host_key=True):
            pass

    asyncio.run(trust())  # the host key, remembered as `rbee nodes add` does
    config = Path(os.environ["RBEE_CONFIG"])  # where the remembered host key lives
    remote: dict[str, Any] = {"transport": "ssh", "ssh_host": "127.0.0.1",
                              "ssh_port": sshd.port, "ssh_user": getpass.getuser(),
                              "ssh_key": str(ssh_env.key), "agent_port": agent.port,
                              "api_key": agent.key}
    gateway = start_gateway(config.parent, {"localhost": direct(agent), "gpu1": remote},
                            ssh_connect_timeout_s=2.0)
    try:
        raw = gateway.sdk().chat.completions.with_raw_response.create(
            model=f"{MODEL}@gpu1", messages=HELLO, max_tokens=8, stream=True)
        assert node_of(raw) == "gpu1"
        assert "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    finally:
        gateway.stop()
        agent.stop()
