"""The gateway in the dashboard (B195-B197): the panel, its toggle, and the "any node" chat.

The real tests run the dashboard against two real agents (`localhost` and `b`, reached over
direct HTTP, so no agent of this machine is started), start the gateway with the panel's
toggle, and stream a chat from it with the official `openai` SDK; the "any node" chat gets
a reply from the bundled model on the node the gateway's routing picks. The snapshot runs
on a scripted gateway, as the other snapshots run on a scripted node source.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import tomli_w
from textual.widgets import Label, Select, Static

from rbee_agent.protocol import RbeeError
from rbee_gateway.any_node import ANY_NODE
from rbee_gateway.inprocess import GatewayStatus, NodeTraffic, RateMeter
from rbee_gateway.routing import Fleet as RoutingFleet
from rbee_tui.app import RbeeApp
from rbee_tui.config import load_config, validate_node_name
from rbee_tui.links import NodeLinks
from rbee_tui.node_source import LiveNodeSource
from rbee_tui.palette import RbeeCommands
from rbee_tui.screens.chat import ChatScreen
from rbee_tui.screens.gateway import GatewayNodesTable, GatewayScreen, masked
from tests.agent_support import AgentProc, start_agent
from tests.gateway_support import FAST, direct
from tests.support import free_port
from tests.tui_support import (
    Notifications,
    fill,
    frames,
    make_app,
    until,
    wait_for_workers,
)

SIZE = (120, 36)
MODEL = "smollm2-135m"
KEY = "k3YxQ9pLm2vT8wZr4nB6cD1eF5gH7jK0aSdFgHjKlZx"  # the scripted gateway's key


# ---------------------------------------------------------------- a scripted gateway


class ScriptedGateway:
    """A `GatewayControl` with fixed numbers, for the snapshot (no port, no clock)."""

    def __init__(self) -> None:
        self.running = True

    def status(self) -> GatewayStatus:
        nodes = (NodeTraffic("localhost", True, None, 32, 0),
                 NodeTraffic("gpu1", True, None, 96, 1),
                 NodeTraffic("lab-a100", False, "Cannot reach the agent of node 'lab-a100' "
                             "at 127.0.0.1:9200", 0, 0))
        return GatewayStatus(running=self.running, url="http://127.0.0.1:8080/v1",
                             host="127.0.0.1", key=KEY,
                             key_file=Path("/home/ops/.config/rbee/gateway.key"),
                             requests=128 if self.running else 0,
                             requests_per_s=2.4 if self.running else 0.0, nodes=nodes)

    async def start(self) -> None:
        self.running = True

    async def stop(self) -> None:
        self.running = False

    def router(self) -> RoutingFleet:
        raise AssertionError("the snapshot does not route")

    async def aclose(self) -> None:
        pass


def scripted_gateway_app() -> RbeeApp:
    app, _ = make_app()
    app._gateway = ScriptedGateway()
    return app


def text_of(screen: GatewayScreen, selector: str) -> str:
    return str(screen.query_one(selector, Static).render())


# ---------------------------------------------------------------- B195 (scripted)


@pytest.mark.parametrize("size", [SIZE, (80, 24)], ids=["120x36", "80x24"])
def test_b195_snapshot_gateway_panel(snap_compare: Callable[..., bool],
                                     size: tuple[int, int]) -> None:
    app = scripted_gateway_app()

    async def before(pilot: Any) -> None:
        await fill(app, app.source)  # type: ignore[attr-defined]
        await pilot.press("o")
        await frames(app.screen)

    assert snap_compare(app, terminal_size=size, run_before=before)


async def test_b195_the_panel_opens_by_key_command_and_palette() -> None:
    app = scripted_gateway_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("o")
        assert isinstance(app.screen, GatewayScreen)
        panel = app.screen
        facts = text_of(panel, "#gateway-facts")
        assert "http://127.0.0.1:8080/v1" in facts and masked(KEY) in facts
        assert KEY not in facts and "2.4 requests/s" in facts
        table = panel.query_one(GatewayNodesTable)
        assert [str(c) for c in table.get_row("gpu1")][:3] == ["gpu1", "● up", "96"]
        assert "75%" in str(table.get_row("gpu1")[3])  # 96 of 128
        await pilot.press("y")
        assert app.clipboard == KEY
        await pilot.press("u")
        assert app.clipboard == "http://127.0.0.1:8080/v1"
        await pilot.press("v")
        assert KEY in text_of(panel, "#gateway-facts")
        await pilot.press("escape")
        assert app.screen is app.dashboard
        await pilot.press("colon", *"gateway", "enter")
        assert isinstance(app.screen, GatewayScreen)
        await pilot.press("escape")
        hits = {str(hit.text): hit async for hit in RbeeCommands(app.screen).search("gateway")}
        assert "Gateway" in hits
        hits["Gateway"].command()
        await pilot.pause()
        assert isinstance(app.screen, GatewayScreen)


async def test_b196_a_taken_port_is_said_in_the_panel() -> None:
    app, _ = make_app()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    app.config.settings.gateway_port = taken.getsockname()[1]
    notes = Notifications(app)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("o", "s")
            await wait_for_workers(pilot, "gateway-toggle")
            panel = app.screen
            assert isinstance(panel, GatewayScreen)
            problem = text_of(panel, "#gateway-problem")
            assert f"Port {taken.getsockname()[1]} on 127.0.0.1 is already in use" in problem
            assert "gateway_port" in problem  # what to do about it
            assert "○ stopped" in text_of(panel, "#gateway-facts")
            assert not app.gateway.status().running
            assert "Traceback" not in notes.text() and "Error" not in notes.text()
    finally:
        taken.close()


async def test_b196_a_failed_autostart_is_a_warning() -> None:
    app, _ = make_app()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    app.config.settings.gateway_port = taken.getsockname()[1]
    app.config.settings.gateway_autostart = True
    notes = Notifications(app)
    try:
        async with app.run_test(size=SIZE):
            said = await notes.wait_for("The gateway did not start")
            assert "already in use" in said and "gateway_port" in said
            assert not app.gateway.status().running
    finally:
        taken.close()


def test_b195_requests_per_second_over_the_last_window() -> None:
    now = [100.0]
    meter = RateMeter(window_s=10.0, clock=lambda: now[0])
    meter.reset()
    for second in range(1, 21):  # 3 requests a second for 20 s
        now[0] = 100.0 + second
        meter.sample(3 * second)
    assert meter.rate(60) == pytest.approx(3.0)
    now[0] = 125.0  # then 5 s of nothing: the window still holds 5 s of traffic
    meter.sample(60)
    assert meter.rate(60) == pytest.approx(1.5, rel=0.2)


# ---------------------------------------------------------------- the real thing


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AgentProc, AgentProc]]:
    home = tmp_path_factory.mktemp("tui-gateway")
    a = start_agent(home / "a", key="key-a")
    b = start_agent(home / "b", key="key-b")
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def live_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, a: AgentProc,
             b: AgentProc, **settings: Any) -> RbeeApp:
    """The dashboard over two real agents, its gateway on a free port, its key file in
    `tmp_path` (where `rbee serve` with this config would keep it)."""
    path = tmp_path / "rbee" / "config.toml"
    path.parent.mkdir(parents=True)
    path.write_bytes(tomli_w.dumps({
        "settings": {**FAST, "gateway_port": free_port(), **settings},
        "nodes": {"localhost": direct(a), "b": direct(b)}}).encode())
    monkeypatch.setenv("RBEE_CONFIG", str(path))
    config = load_config()
    links = NodeLinks(config)
    return RbeeApp(config, LiveNodeSource(config, links), links, poll=False, save_theme=False)


def stop_workers(*agents: AgentProc) -> None:
    for agent in agents:
        for worker in agent.get("/v1/workers").json()["workers"]:
            agent.delete(f"/v1/workers/{worker['id']}")


async def test_b196_the_toggle_starts_a_gateway_the_openai_sdk_streams_from(
        agents: tuple[AgentProc, AgentProc], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = agents
    app = live_app(tmp_path, monkeypatch, a, b)
    port = app.config.settings.gateway_port
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("o")
        panel = app.screen
        assert isinstance(panel, GatewayScreen)
        key = (tmp_path / "rbee" / "gateway.key").read_text().strip()  # rbee serve's file
        facts = text_of(panel, "#gateway-facts")
        assert f"http://127.0.0.1:{port}/v1" in facts and "○ stopped" in facts
        assert masked(key) in facts and key not in facts
        await pilot.press("y")
        assert app.clipboard == key

        await pilot.press("s")
        await wait_for_workers(pilot, "gateway-toggle")
        assert "● running" in text_of(panel, "#gateway-facts")
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key,
                                    max_retries=0, timeout=120)
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=8, stream=True)
        node = raw.headers["x-rbee-node"]
        text = "".join([c.choices[0].delta.content or "" async for c in raw.parse()
                        if c.choices])
        assert text.strip() and node in ("localhost", "b")
        with pytest.raises(openai.AuthenticationError):
            await client.with_options(api_key="wrong").models.list()

        panel.show_status()
        facts = text_of(panel, "#gateway-facts")
        assert "1 requests since it started" in facts and "0.0 requests/s" not in facts
        row = panel.query_one(GatewayNodesTable).get_row(node)
        assert str(row[2]) == "1" and "100%" in str(row[3])

        await pilot.press("s")
        await wait_for_workers(pilot, "gateway-toggle")
        assert "○ stopped" in text_of(panel, "#gateway-facts")
        with pytest.raises(openai.APIConnectionError):
            await client.models.list()
        await client.close()


async def test_b196_autostart_serves_from_the_first_frame_and_stops_with_the_dashboard(
        agents: tuple[AgentProc, AgentProc], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = agents
    app = live_app(tmp_path, monkeypatch, a, b, gateway_autostart=True)
    port = app.config.settings.gateway_port
    notes = Notifications(app)
    async with app.run_test(size=SIZE):
        await notes.wait_for(f"Gateway running on http://127.0.0.1:{port}/v1")
        key = app.gateway.status().key
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key,
                                    max_retries=0)
        ids = [m.id async for m in client.models.list()]
        assert MODEL in ids and f"{MODEL}@b" in ids
    with pytest.raises(openai.APIConnectionError):  # the dashboard left: so did the gateway
        await client.models.list()
    await client.close()


async def test_b197_any_node_chat_is_routed_and_names_the_node(
        agents: tuple[AgentProc, AgentProc], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = agents
    stop_workers(a, b)
    worker = b.spawn()
    b.wait_state(worker["id"], "idle")  # the routing sends the chat where a worker is warm
    app = live_app(tmp_path, monkeypatch, a, b)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("c")
        chat = app.screen
        assert isinstance(chat, ChatScreen)
        picker: Select[str] = chat.query_one("#chat-node", Select)
        picker.value = ANY_NODE
        await until(pilot, lambda: chat.any_node)
        await wait_for_workers(pilot, "chat-models")
        chat.conversation.settings.temperature = 0.0
        await pilot.press(*"Say hello.", "enter")
        await until(pilot, lambda: len(chat.history) == 2 and chat.generating is None,
                    limit_s=120)
        status = str(chat.query_one("#chat-status", Label).render())
        assert chat.answered_by == "b" and status.startswith("b · "), status
        assert chat.history[1].role == "assistant" and chat.history[1].content.strip()
        assert a.get("/v1/workers").json()["workers"] == []  # nothing ran on localhost
        served = b.get(f"/v1/workers/{worker['id']}").json()["tokens_served"]
        assert served > 0


async def test_b197_a_node_that_does_not_answer_is_skipped_before_the_first_token(
        agents: tuple[AgentProc, AgentProc], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The routing put `b` first (warm worker); `b` stops answering; the reply comes from
    localhost, and `b` is down for the next request."""
    a, b = agents
    stop_workers(a)
    if not any(w["state"] == "idle" for w in b.get("/v1/workers").json()["workers"]):
        b.wait_state(b.spawn()["id"], "idle")
    app = live_app(tmp_path, monkeypatch, a, b)
    async with app.run_test(size=SIZE) as pilot:
        routing = app.router()
        await routing.refresh_stale()
        assert routing.candidates(MODEL)[0] == "b"
        dead = app.config.node("b")
        dead.agent_port = free_port()  # b's agent is not there any more
        app.open_chat(ANY_NODE)
        await until(pilot, lambda: isinstance(app.screen, ChatScreen))
        chat = app.screen
        assert isinstance(chat, ChatScreen)
        await pilot.press(*"Hi", "enter")
        await until(pilot, lambda: len(chat.history) == 2 and chat.generating is None,
                    limit_s=120)
        assert chat.answered_by == "localhost"
        assert routing.states["b"].up is False


def test_b197_any_node_is_no_node_name() -> None:
    with pytest.raises(RbeeError):
        validate_node_name(ANY_NODE)
