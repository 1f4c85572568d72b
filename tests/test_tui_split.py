"""B210-B212: a split spawned from the dashboard's spawn dialog, on two real agents: rbee's
local agent (the head) and a test agent reached only through the loopback sshd (the peer),
as in tests/test_rpc_split.py. The RPC traffic goes through the SSH tunnel the dashboard's
own process holds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import psutil
import pytest
from textual.widgets import Input, Label

from rbee_agent.protocol import WorkerInfo
from rbee_tui.app import RbeeApp
from rbee_tui.config import load_config
from rbee_tui.links import NodeLinks
from rbee_tui.node_source import LiveNodeSource
from rbee_tui.screens.chat import ChatScreen
from rbee_tui.screens.modals import ConfirmScreen
from rbee_tui.screens.spawn import SpawnScreen
from rbee_tui.widgets.event_log import EventLog
from rbee_tui.widgets.tables import NodesTable, WorkersTable
from tests.agent_support import AgentProc
from tests.cli_support import RbeeEnv
from tests.ssh_support import pid_alive
from tests.test_rpc_split import peer, rpc_servers, wait_for, workers_of  # noqa: F401
from tests.tui_support import Notifications, until

pytest_plugins = ["tests.ssh_fixtures"]

SIZE = (160, 48)
QUESTION = "What is the capital of France?"
LOAD_S = 240.0  # a cold local agent, an RPC server, and a model loaded over the tunnel


@pytest.fixture
async def app(rbee: RbeeEnv, peer: AgentProc,  # noqa: F811
              monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RbeeApp]:
    monkeypatch.setenv("RBEE_CONFIG", str(rbee.config))
    config = load_config()
    config.settings.poll_interval_s = 0.5
    links = NodeLinks(config)
    yield RbeeApp(config, LiveNodeSource(config, links), links, save_theme=False)


async def spawn_split(app: RbeeApp, pilot: object) -> WorkerInfo:
    """From the dashboard on localhost: `w`, "Split over: peer", Enter; the dialog closes
    once the split worker serves, held by the app."""
    await until(pilot, lambda: all(app.fleet.snapshot(n).status == "up"
                                   for n in ("localhost", "peer")), limit_s=LOAD_S)
    app.select_node("localhost")
    await pilot.press("w")  # type: ignore[attr-defined]
    dialog = app.screen
    assert isinstance(dialog, SpawnScreen)
    await until(pilot, lambda: dialog.models)
    dialog.query_one("#spawn-split", Input).value = "peer"
    await until(pilot, lambda: "peer: " in str(dialog.query_one("#spawn-plan", Label).render()))
    plan = str(dialog.query_one("#spawn-plan", Label).render())
    assert "localhost: " in plan and " layers, ~" in plan, plan
    assert "leaving rbee, stops the split" in plan
    dialog.query_one("#spawn-model", Input).focus()
    await pilot.press("enter")  # type: ignore[attr-defined]
    await until(pilot, lambda: app.screen is app.dashboard, limit_s=LOAD_S)
    [held] = app.splits.held
    assert held.split.worker is not None
    return held.split.worker


def cell(app: RbeeApp, key: str, column: str) -> str:
    value = app.dashboard.query_one(WorkersTable).get_cell(key, column)
    return str(getattr(value, "plain", value))


async def select_worker(app: RbeeApp, pilot: object, worker_id: str) -> None:
    app.select_node("localhost")
    table = app.dashboard.query_one(WorkersTable)
    await until(pilot, lambda: worker_id in table.rows)
    table.focus()
    assert table.select_key(worker_id)


async def ask(app: RbeeApp, pilot: object, worker_id: str | None) -> str:
    """A greedy reply in the chat: on the split worker's row (Enter), or on localhost."""
    app.select_node("localhost")
    if worker_id is None:
        await pilot.press("c")  # type: ignore[attr-defined]
    else:
        await select_worker(app, pilot, worker_id)
        await pilot.press("enter")  # type: ignore[attr-defined]
    chat = app.screen
    assert isinstance(chat, ChatScreen)
    await pilot.press("ctrl+n")  # type: ignore[attr-defined]  # not the saved one
    await until(pilot, lambda: not chat.history)
    chat.conversation.settings.temperature = 0.0
    chat.conversation.settings.max_tokens = 24
    await pilot.press(*QUESTION, "enter")  # type: ignore[attr-defined]
    await until(pilot, lambda: chat.generating is None and len(chat.history) == 2,
                limit_s=LOAD_S)
    await pilot.press("escape")  # type: ignore[attr-defined]
    return chat.history[-1].content


async def test_b211_a_split_from_the_dialog_serves_shows_on_both_nodes_and_x_ends_it(
        app: RbeeApp, rbee: RbeeEnv, peer: AgentProc) -> None:  # noqa: F811
    notes = Notifications(app)
    async with app.run_test(size=SIZE) as pilot:
        worker = await spawn_split(app, pilot)
        layers = {p.node or "localhost": p.layers for p in worker.split}
        assert set(layers) == {"localhost", "peer"} and all(layers.values())
        [server] = rpc_servers(peer)
        assert server["clients"] >= 1, "the split worker holds the RPC server"

        # B212: the head shows the split worker with its split, the peer its RPC server.
        shown = f"split: localhost {layers['localhost']}, peer {layers['peer']}"
        await until(pilot, lambda: worker.id in app.dashboard.query_one(WorkersTable).rows)
        assert cell(app, worker.id, "DEVICE") == shown
        app.select_node("peer")
        await until(pilot, lambda: server["id"] in app.dashboard.query_one(WorkersTable).rows,
                    limit_s=30)
        serves = f"rpc cpu for localhost/{worker.id} ({layers['peer']} layers)"
        await until(pilot, lambda: cell(app, server["id"], "DEVICE") == serves, limit_s=30)
        assert cell(app, server["id"], "MODEL") == "smollm2-135m"
        nodes = app.dashboard.query_one(NodesTable)
        await until(pilot, lambda: str(nodes.get_cell("peer", "WORKERS")) == "0 · 1 rpc")
        table = app.dashboard.query_one(WorkersTable)
        table.focus()
        assert table.select_key(server["id"])
        await pilot.press("x")  # an RPC server ends with its split worker, not by itself
        await until(pilot, lambda: any(f"serves worker {worker.id} on localhost" in m
                                       for m in notes.messages))
        assert app.screen is app.dashboard and rpc_servers(peer) != []

        split_text = await ask(app, pilot, worker.id)
        assert split_text.strip()
        head_pid = rbee.agent_pid()
        assert head_pid is not None
        [process] = workers_of(head_pid)
        assert "--rpc" in process.cmdline(), "the chat went through the split worker"

        # x on the split worker: the question says what stops with it; then nothing is left.
        await select_worker(app, pilot, worker.id)
        await pilot.press("x")
        assert isinstance(app.screen, ConfirmScreen)
        assert "split over peer: the RPC servers there stop with it" in app.screen.question
        await pilot.press("y")
        await until(pilot, lambda: not app.splits.held, limit_s=60)
        await until(pilot, lambda: any("its RPC servers are stopped too" in m
                                       for m in notes.messages))
        assert rpc_servers(peer) == [], "the peer's RPC server is stopped"
        assert wait_for(lambda: not pid_alive(process.pid), "the split worker to stop")
        assert not pid_alive(server["pid"])

        # The same question on one node gives the same greedy text.
        single_text = await ask(app, pilot, None)
        assert single_text == split_text
        [single] = workers_of(head_pid)
        assert "--rpc" not in single.cmdline()


async def test_b211_leaving_the_dashboard_stops_the_split_it_holds(
        app: RbeeApp, rbee: RbeeEnv, peer: AgentProc) -> None:  # noqa: F811
    async with app.run_test(size=SIZE) as pilot:
        await spawn_split(app, pilot)
        [server] = rpc_servers(peer)
        head_pid = rbee.agent_pid()
        assert head_pid is not None
        [process] = workers_of(head_pid)
    # The app has exited: its split worker and the peer's RPC server are gone.
    assert wait_for(lambda: not pid_alive(process.pid), "the split worker to stop")
    assert rpc_servers(peer) == [] and not pid_alive(server["pid"])


async def test_b211_a_peer_that_dies_ends_the_held_split_naming_it(
        app: RbeeApp, rbee: RbeeEnv, peer: AgentProc) -> None:  # noqa: F811
    notes = Notifications(app)
    async with app.run_test(size=SIZE) as pilot:
        await spawn_split(app, pilot)
        [server] = rpc_servers(peer)
        head_pid = rbee.agent_pid()
        assert head_pid is not None
        [process] = workers_of(head_pid)
        psutil.Process(server["pid"]).kill()
        await until(pilot, lambda: any("Node 'peer' of the split lost its RPC server" in m
                                       for m in notes.messages), limit_s=60)
        await until(pilot, lambda: not app.splits.held, limit_s=60)
        assert wait_for(lambda: not pid_alive(process.pid), "the split worker to stop")
        assert rpc_servers(peer) == [], "the failed RPC server is cleaned up on the peer"


async def test_b210_a_peer_that_cannot_serve_is_named_in_the_dialog(
        app: RbeeApp, peer: AgentProc) -> None:  # noqa: F811
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: all(app.fleet.snapshot(n).status == "up"
                                       for n in ("localhost", "peer")), limit_s=LOAD_S)
        app.select_node("localhost")
        await pilot.press("w")
        dialog = app.screen
        assert isinstance(dialog, SpawnScreen)
        await until(pilot, lambda: dialog.models)
        dialog.query_one("#spawn-split", Input).value = "nosuch"
        dialog.query_one("#spawn-model", Input).focus()
        await pilot.press("enter")
        status = dialog.query_one("#spawn-status", Label)
        assert "split: other registered nodes, comma-separated: peer" in str(status.render())
        dialog.query_one("#spawn-split", Input).value = "peer"
        dialog.query_one("#spawn-split-device", Input).value = "cuda3"
        await pilot.press("enter")
        await until(pilot, lambda: "failed" in str(status.render()), limit_s=LOAD_S)
        log = dialog.query_one(EventLog)
        assert "Node 'peer' could not start an RPC server: No GPU 3" in "\n".join(log.plain)
        assert app.screen is dialog and not app.splits.held
        assert rpc_servers(peer) == []
