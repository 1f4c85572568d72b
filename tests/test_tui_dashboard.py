"""Pilot tests of the dashboard's newer behaviours (B161, B164-B172) on the scripted source."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from rich.text import Text

from rbee_tui.node_source import NodeSnapshot
from rbee_tui.remote_agent import LogTail
from rbee_tui.screens.dashboard import DashboardScreen
from rbee_tui.screens.logs import LogsScreen
from rbee_tui.screens.modals import ConfirmScreen, HelpScreen
from rbee_tui.screens.models import ModelsScreen
from rbee_tui.widgets.graphs import HistoryGraph
from rbee_tui.widgets.log_view import LogView
from rbee_tui.widgets.node_detail import node_text, vram_bar
from rbee_tui.widgets.notes import note_for
from rbee_tui.widgets.tables import KeyedTable, NodesTable, WorkersTable
from rbee_tui.widgets.top_bar import TopBar
from tests.tui_support import (
    NOW,
    Notifications,
    fill,
    make_app,
    node_info,
    until,
    wait_for_workers,
    worker,
)

SIZE = (120, 36)


def cell(table: NodesTable | WorkersTable, row: str, column: str) -> str:
    value = table.get_cell(row, column)
    return value.plain if isinstance(value, Text) else str(value)


def detail_text(app: object) -> str:
    return str(app.dashboard.query_one("#detail").render())  # type: ignore[attr-defined]


async def test_b161_tok_s_follows_the_streaming_worker_per_node_and_per_worker() -> None:
    app, source = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await fill(app, source, 5)  # the busy worker serves 30 tokens per 2-s poll
        await pilot.press("j")
        nodes, workers = app.dashboard.query_one(NodesTable), app.dashboard.query_one(
            WorkersTable)
        assert cell(nodes, "gpu1", "TOK/S") == "15.0"
        assert cell(workers, "w2-77c1", "TOK/S") == "15.0"
        assert cell(workers, "w1-a3f2", "TOK/S") == "0.0"
        assert cell(nodes, "localhost", "TOK/S") == "0.0"


async def test_b161_slots_free_reads_like_the_cli() -> None:
    app, source = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await fill(app, source, 1)
        await pilot.press("j")
        workers = app.dashboard.query_one(WorkersTable)
        # `rbee workers list` prints slots_available/slots_total; so does SLOTS FREE.
        assert "SLOTS FREE" in [str(c.label) for c in workers.columns.values()]
        assert cell(workers, "w2-77c1", "SLOTS FREE") == "0/1"
        assert cell(workers, "w1-a3f2", "SLOTS FREE") == "1/1"


async def test_b161_graphs_run_from_zero_to_capacity_with_the_scale_written() -> None:
    app, source = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await fill(app, source, 10)
        await pilot.press("j")
        graphs = [g for g in app.dashboard.query(HistoryGraph) if g.display]
        titles = [g.graph.title for g in graphs if g.graph]
        assert titles == ["RAM", "GPU0 VRAM", "GPU0 util", "GPU1 VRAM", "GPU1 util"]
        ram = graphs[0].graph
        assert ram is not None and ram.top == 64 * 1024 and len(ram.values) == 10
        lines = [t.plain for t in ram.lines(40, 5)]
        assert lines[0].startswith("RAM") and "of 64.0 GB" in lines[0]
        assert lines[1].startswith("64.0┤") and lines[-1].startswith("   0┤")
        util = graphs[2].graph
        assert util is not None and util.top == 100.0
        assert util.lines(30, 4)[1].plain.startswith("100┤")


@pytest.mark.parametrize(("size", "graph_rows"), [((200, 60), 40), ((80, 24), 0)])
async def test_b164_the_layout_uses_the_room_it_gets(size: tuple[int, int],
                                                   graph_rows: int) -> None:
    app, source = make_app()
    async with app.run_test(size=size) as pilot:
        await fill(app, source, 3)
        await pilot.press("j")
        await pilot.pause()
        box = app.dashboard.query_one("#graphs")
        if graph_rows:
            assert box.display and box.size.height >= graph_rows
        else:  # 80 columns: the graphs give way to the detail pane
            assert not box.display
        footer = " ".join(str(k.render()) for k in app.screen.query("FooterKey"))
        assert "Help" in footer and "Quit" in footer


async def test_b165_each_gpu_has_its_bar_with_worker_shares_and_sparklines() -> None:
    app, source = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await fill(app, source, 6)
        await pilot.press("j")
        text = detail_text(app)
        assert "GPU0 NVIDIA RTX 4090" in text and "GPU1 NVIDIA RTX 4090" in text
        assert "w1-a3f2 1.4" in text and "w2-77c1 5.1" in text  # each worker's VRAM, GB
        assert "util" in text and "temp" in text and "power" in text
    gpu = node_info("n", 1).gpus[0].model_copy(update={"vram_used_mb": 12282,
                                                       "vram_total_mb": 24564})
    share = worker("w", "m", "idle", 0).model_copy(update={"vram_mb": 6141})
    bar = vram_bar(gpu, [share], width=20)
    assert bar.plain == "▇" * 10 + "░" * 10  # 5 cells the worker's, 5 other use, then free
    assert [span.style for span in bar.spans][:2] == ["magenta", "green"]


def test_b178_the_detail_says_whether_llama_cpp_can_use_the_gpus() -> None:
    def detail(gpus: int, offload: bool | None) -> str:
        info = node_info("gpu9", gpus).model_copy(update={"gpu_offload": offload})
        return node_text(NodeSnapshot(name="gpu9", status="up", info=info)).plain

    assert "llama.cpp on gpu9 is CPU-only: its GPUs sit idle. Press i and install with " \
        "cuda (rbee nodes install gpu9 --backend cuda)" in detail(2, False)
    assert "llama.cpp offloads to the GPU" in detail(2, True)
    assert "llama.cpp is a CPU-only build" in detail(0, False)
    assert "llama.cpp" not in detail(2, None), "an agent that does not say: nothing claimed"


async def test_b166_numbers_are_drawn_in_frames_and_a_dead_node_at_once() -> None:
    app, source = make_app()
    app.fleet.frame_s = 3600  # the frame timer never fires in this test
    async with app.run_test(size=SIZE) as pilot:
        await fill(app, source, 1)  # the first poll of each node shows at once
        await pilot.pause()
        nodes = app.dashboard.query_one(NodesTable)
        assert cell(nodes, "gpu1", "CPU") == "37%"
        busier = source.snapshot_of("gpu1")
        assert busier.info is not None
        busier = NodeSnapshot(name="gpu1", status="up", info=busier.info.model_copy(
            update={"cpu_percent": 99.0}), workers=busier.workers, polled_at=NOW + 2)
        app.fleet.apply(busier)
        await pilot.pause()
        assert cell(nodes, "gpu1", "CPU") == "37%", "a number waits for the next frame"
        source.down["localhost"] = "no answer within 5 s"
        await app._poll("localhost")
        await pilot.pause()
        assert "down" in cell(nodes, "localhost", "STATUS"), "a dead node does not wait"
        assert cell(nodes, "gpu1", "CPU") == "99%", "and the frame carries what was pending"


async def test_b167_command_mode_and_the_breadcrumb() -> None:
    app, source = make_app()
    notes = Notifications(app)
    async with app.run_test(size=SIZE) as pilot:
        await fill(app, source, 1)
        await pilot.press("colon", *"models gpu1", "enter")
        await wait_for_workers(pilot, "models")
        assert isinstance(app.screen, ModelsScreen) and app.screen.node == "gpu1"
        assert app.screen.query_one(TopBar).crumbs == ("rbee", "gpu1", "models")
        await pilot.press("colon", *"logz", "enter")
        await notes.wait_for("Unknown command ':logz'", "Did you mean :logs?")
        await pilot.press("colon", *"nodes", "enter")
        assert app.screen is app.dashboard
        await pilot.press("colon", *"workers gpu1", "enter")
        assert app.dashboard.selected_node() == "gpu1"
        assert app.dashboard.focused is app.dashboard.query_one(WorkersTable)
        assert app.dashboard.query_one(TopBar).crumbs == ("rbee", "gpu1")


async def test_b168_every_table_filters_and_esc_clears() -> None:
    app, source = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await fill(app, source, 1)
        nodes = app.dashboard.query_one(NodesTable)
        await pilot.press("slash", *"gpu", "enter")
        assert [k.value for k in nodes.rows] == ["gpu1"]
        assert app.dashboard.selected_node() == "gpu1"
        await pilot.press("escape")
        assert [k.value for k in nodes.rows] == ["localhost", "gpu1", "lab-a100"]
        assert app.dashboard.selected_node() == "gpu1", "the cursor stays on its node"
        await pilot.press("tab", "slash", *"qwen", "enter")
        workers = app.dashboard.query_one(WorkersTable)
        assert [k.value for k in workers.rows] == ["w2-77c1"]
        await pilot.press("escape")
        assert [k.value for k in workers.rows] == ["w1-a3f2", "w2-77c1"]
        await pilot.press("m")
        await wait_for_workers(pilot, "models")
        models = app.screen.query_one("#models", KeyedTable)
        await pilot.press("slash", *"qwen")
        assert [k.value for k in models.rows] == ["qwen2.5-7b-instruct"]
        await pilot.press("escape")  # in the filter box: clears it
        assert len(models.rows) == 2
        await pilot.press("escape")  # nothing to clear: back
        assert isinstance(app.screen, DashboardScreen)


async def test_b169_help_shows_this_screens_keys_then_the_global_ones() -> None:
    app, source = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await fill(app, source, 1)
        await pilot.press("j", "l")
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        sections = [title for title, _ in app.screen.sections]
        assert sections == ["On this screen: Logs", "Everywhere"]
        text = app.screen.text()
        assert "Wrap long lines" in text and "Search the log" in text
        assert "Add a node" not in text  # the dashboard's keys are not this screen's


async def test_b169_stopping_a_busy_agent_or_worker_says_what_it_costs() -> None:
    app, source = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await fill(app, source, 1)
        await pilot.press("j", "s")
        assert isinstance(app.screen, ConfirmScreen)
        question = app.screen.question
        assert "Its 2 worker(s) stop with it (qwen2.5-7b-instruct, smollm2-135m)" in question
        assert "1 request(s) in progress will be cut off" in question
        await pilot.press("n")
        await pilot.press("tab", "j", "x")
        assert isinstance(app.screen, ConfirmScreen)
        assert ("busy: 1 request(s) in progress and 2 queued will be cut off"
                in app.screen.question)
        await pilot.press("n")
        await wait_for_workers(pilot)
    assert not [r for r in source.requests if r.startswith("DELETE")]


async def test_b170_the_row_says_starting_agent_while_the_local_agent_starts() -> None:
    app, source = make_app()
    started = asyncio.Event()
    original = source.poll

    async def starting(name: str) -> NodeSnapshot:
        if name == "localhost" and source.on_connecting is not None:
            source.on_connecting(name, "starting agent…")
            await started.wait()
        return await original(name)

    source.poll = starting  # type: ignore[method-assign]
    async with app.run_test(size=SIZE) as pilot:
        app.poll_now("localhost")
        nodes = app.dashboard.query_one(NodesTable)
        await until(pilot, lambda: "localhost" in nodes.rows and "starting" in cell(
            nodes, "localhost", "STATUS"))
        assert cell(nodes, "localhost", "NOTE") == "starting agent…"
        started.set()
        await wait_for_workers(pilot, "poll-localhost")
        assert cell(nodes, "localhost", "STATUS") == "● up"
        assert cell(nodes, "localhost", "NOTE") == ""


async def test_b171_notes_say_what_to_do_and_the_detail_has_the_whole_error() -> None:
    app, source = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await fill(app, source, 1)
        wrong_key = NodeSnapshot(
            name="gpu1", status="down", code="INVALID_API_KEY", polled_at=NOW,
            reason="The API key sent to /v1/workers is not valid for the agent of node "
                   "'gpu1' at 127.0.0.1:9200 (it was installed with another key)",
            hint="Reinstall the agent (rbee nodes install gpu1) or put its key in the config")
        app.fleet.apply(wrong_key)
        await pilot.press("j")
        nodes = app.dashboard.query_one(NodesTable)
        assert cell(nodes, "gpu1", "NOTE") == (
            "the agent's key does not match: press i to reinstall or e to fix the key")
        text = detail_text(app)
        for words in ("(it was installed with another key)", "put its key in the config",
                      "press i to reinstall"):
            assert words in text
    down = NodeSnapshot(name="n", status="down", code="AGENT_NOT_INSTALLED")
    assert note_for(down, local=False) == "no agent installed: press i to install it"
    assert "press s to start it" in note_for(
        NodeSnapshot(name="n", status="down", code="CONNECTION_FAILED"), local=True)
    assert note_for(NodeSnapshot(name="n", status="up"), local=False) == ""


async def test_b171_a_dead_agents_last_lines_are_read_over_ssh(monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    asked: list[str] = []

    async def fetch(node: object, settings: object, *, lines: int) -> list[LogTail]:
        asked.append(node.name)  # type: ignore[attr-defined]
        return [LogTail("/home/ops/.local/share/rbee-agent/logs/agent.log",
                        ["INFO rbee.agent: agent 0.1.0 on http://127.0.0.1:9200",
                         "ERROR rbee.agent: [Errno 98] address already in use"])]

    monkeypatch.setattr("rbee_tui.remote_agent.fetch_agent_logs", fetch)
    app, source = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await fill(app, source, 1)
        await pilot.press("G", "l")  # lab-a100 is down
        assert isinstance(app.screen, LogsScreen)
        await wait_for_workers(pilot, "logs")
        text = app.screen.query_one(LogView).text
    assert asked == ["lab-a100"]
    assert "The agent on lab-a100 does not answer: Cannot reach the agent" in text
    assert "last lines of /home/ops/.local/share/rbee-agent/logs/agent.log on lab-a100 " \
           "(over SSH)" in text
    assert "address already in use" in text


async def test_b171_localhosts_last_lines_come_from_its_log_file(tmp_path: Path) -> None:
    from rbee_tui.screens.logs import local_agent_log

    log = local_agent_log()
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("INFO starting\nERROR rbee.agent: cannot bind 127.0.0.1:9200\n")
    app, source = make_app()
    source.down["localhost"] = "Cannot reach the local agent at 127.0.0.1:9200"
    async with app.run_test(size=SIZE) as pilot:
        await fill(app, source, 1)
        await pilot.press("l")
        await wait_for_workers(pilot, "logs")
        text = app.screen.query_one(LogView).text
    assert f"Its last lines, from {log}:" in text and "cannot bind 127.0.0.1:9200" in text


async def test_b172_workers_show_queue_vram_and_layers_on_gpu() -> None:
    app, source = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await fill(app, source, 1)
        await pilot.press("j")
        workers = app.dashboard.query_one(WorkersTable)
        assert cell(workers, "w2-77c1", "QUEUE") == "2"
        assert cell(workers, "w2-77c1", "VRAM MB") == "5200"
        assert cell(workers, "w2-77c1", "GPU LAYERS") == "24/30"
        assert cell(workers, "w2-77c1", "DEVICE") == "cuda:1"
        assert cell(workers, "w1-a3f2", "GPU LAYERS") == "30/30"
