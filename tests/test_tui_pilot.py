"""Pilot tests of the dashboard (B70-B78) on the scripted source, and chat on a real agent."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from textual.binding import Binding
from textual.widgets import Input, Label, Markdown

from rbee_tui.app import RbeeApp
from rbee_tui.config import load_config
from rbee_tui.links import NodeLinks
from rbee_tui.node_source import LiveNodeSource
from rbee_tui.screens.chat import ChatScreen
from rbee_tui.screens.dashboard import DashboardScreen
from rbee_tui.screens.modals import ConfirmScreen, HelpScreen
from rbee_tui.widgets.tables import NodesTable, WorkersTable
from tests.cli_support import RbeeEnv
from tests.tui_support import fill, make_app

SIZE = (120, 36)


async def test_b70_dead_node_turns_red_and_recovers_by_itself() -> None:
    app, source = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await fill(app, source, 1)
        await pilot.pause()
        table = app.dashboard.query_one(NodesTable)
        assert "down" in str(table.get_cell("lab-a100", "STATUS"))
        assert "Cannot reach" in str(table.get_cell("lab-a100", "NOTE"))
        source.down.clear()
        await app._poll("lab-a100")
        await pilot.pause()
        assert "up" in str(table.get_cell("lab-a100", "STATUS"))
        source.down["gpu1"] = "no answer within 5 s"
        await app._poll("gpu1")
        await pilot.pause()
        assert "down" in str(table.get_cell("gpu1", "STATUS"))
        assert table.get_cell("gpu1", "WORKERS") == "-"


async def test_b70_rows_update_by_key_and_the_cursor_stays() -> None:
    app, source = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await fill(app, source, 2)
        await pilot.pause()
        table = app.dashboard.query_one(NodesTable)
        await pilot.press("j")
        assert table.selected_key() == "gpu1"
        keys_before = [k.value for k in table.rows]
        await fill(app, source, 3)
        await pilot.pause()
        await pilot.pause()
        assert [k.value for k in table.rows] == keys_before
        assert table.selected_key() == "gpu1"
        workers = app.dashboard.query_one(WorkersTable)
        assert [k.value for k in workers.rows] == ["w1-a3f2", "w2-77c1"]
        assert len(app.history["gpu1"]) == 5


async def test_b70_polls_pause_while_a_modal_is_open() -> None:
    app, source = make_app()
    app.poll_enabled = True
    app.config.settings.poll_interval_s = 0.05
    polled: list[str] = []
    original = source.poll

    async def counting(name: str):  # type: ignore[no-untyped-def]
        polled.append(name)
        return await original(name)

    source.poll = counting  # type: ignore[method-assign]
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(0.3)
        assert len(polled) >= 6
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.pause(0.1)
        during = len(polled)
        await pilot.pause(0.4)
        assert len(polled) == during, "polled while a modal was open"
        await pilot.press("escape")
        await pilot.pause(0.8)
        assert len(polled) > during


def test_b76_every_binding_has_an_id_and_a_tooltip() -> None:
    from rbee_tui.screens import chat, download, install, logs, modals, models, node_form, spawn

    classes = [RbeeApp, DashboardScreen, chat.ChatScreen, models.ModelsScreen,
               logs.LogsScreen, modals.ConfirmScreen, modals.HelpScreen,
               node_form.NodeFormScreen, install.InstallScreen, spawn.SpawnScreen,
               download.DownloadScreen]
    for cls in classes:
        for binding in cls.BINDINGS:
            assert isinstance(binding, Binding)
            assert binding.id and binding.tooltip, f"{cls.__name__}: {binding.key}"


async def test_b76_help_lists_the_screens_keys() -> None:
    app, _ = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("question_mark")
        text = str(app.screen.query_one("#help-text").render())
        for words in ("Add a node: SSH is tested", "Install or upgrade the agent",
                      "Show every key"):
            assert words in text


async def test_b76_palette_finds_nodes_and_actions() -> None:
    from rbee_tui.app import RbeeCommands

    app, _ = make_app()
    async with app.run_test(size=SIZE):
        provider = RbeeCommands(app.screen)
        labels = [str(hit.text) async for hit in provider.search("gpu1")]
        assert "Chat on gpu1" in labels and "Models on gpu1" in labels


async def test_b71_delete_node_asks_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEE_CONFIG", str(tmp_path / "config.toml"))
    app, _ = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await fill(app, app.source, 1)  # type: ignore[arg-type]
        await pilot.pause()
        await pilot.press("G", "d")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert "lab-a100" in app.config.nodes
        await pilot.press("d", "y")
        await pilot.pause()
        assert "lab-a100" not in app.config.nodes
    assert "lab-a100" not in load_config().nodes and "gpu1" in load_config().nodes


async def test_b73_model_delete_asks_then_calls_the_agent() -> None:
    app, source = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await fill(app, source, 1)
        await pilot.pause()
        await pilot.press("j", "m")
        await pilot.pause(0.2)
        await pilot.press("j", "d")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await pilot.pause(0.3)
    assert "DELETE /v1/models/qwen2.5-7b-instruct" in source.requests


async def test_b73_download_shows_progress_then_reloads_the_catalog() -> None:
    from rbee_tui.screens.download import DownloadScreen

    app, source = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await fill(app, source, 1)
        await pilot.pause()
        await pilot.press("j", "m")
        await pilot.pause(0.2)
        await pilot.press("n")
        assert isinstance(app.screen, DownloadScreen)
        await pilot.press(*"not a ref", "enter")
        assert "Use hf:" in str(app.screen.query_one("#download-status", Label).render())
        app.screen.query_one("#download-ref", Input).value = "hf:bees/Tiny-GGUF"
        await pilot.press("enter")
        for _ in range(40):
            await pilot.pause(0.05)
            if app.screen.done:  # type: ignore[attr-defined]
                break
        status = str(app.screen.query_one("#download-status", Label).render())
        assert "tiny downloaded to /srv/rbee/models/hf/tiny.gguf" in status
        bar = app.screen.query_one("#download-progress")
        assert bar.percentage == 1.0  # type: ignore[attr-defined]
        await pilot.press("escape")
        await pilot.pause(0.2)
    assert "POST /v1/models/download" in source.requests


async def test_b74_stop_worker_from_the_workers_table() -> None:
    app, source = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await fill(app, source, 1)
        await pilot.pause()
        await pilot.press("j", "tab", "x")
        await pilot.pause(0.3)
    assert "DELETE /v1/workers/w1-a3f2" in source.requests


async def test_b78_errors_become_notifications() -> None:
    app, source = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await fill(app, source, 1)
        await pilot.pause()
        await pilot.press("G", "m")  # lab-a100 is down: its catalog cannot load
        await pilot.pause(0.3)
        messages = [n.message for n in app._notifications]
        assert any("Cannot reach the agent of node 'lab-a100'" in m for m in messages)


async def test_b77_theme_choice_is_persisted(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEE_CONFIG", str(tmp_path / "config.toml"))
    app, _ = make_app()
    app.save_theme = True
    async with app.run_test(size=SIZE) as pilot:
        assert app.theme == "rbee"
        assert "rbee-light" in app.available_themes
        app.theme = "rbee-light"
        await pilot.pause()
    assert load_config().settings.theme == "rbee-light"


async def test_b77_broken_user_theme_falls_back_with_a_notification(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RBEE_CONFIG", str(tmp_path / "config.toml"))
    themes = tmp_path / "themes"
    themes.mkdir()
    (themes / "broken.toml").write_text('name = "broken"\nprimary = "not-a-colour"\n')
    (themes / "mine.toml").write_text('name = "mine"\nprimary = "#336699"\n')
    app, _ = make_app()
    app.config.settings.theme = "broken"
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert app.theme == "rbee" and "mine" in app.available_themes
        messages = " ".join(n.message for n in app._notifications)
        assert "broken.toml was skipped" in messages and "not available" in messages


# ---------------------------------------------------------------- the real thing


async def test_b72_chat_streams_real_tokens_and_esc_cancels(rbee: RbeeEnv,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    monkeypatch.setenv("RBEE_CONFIG", str(rbee.config))
    config = load_config()
    links = NodeLinks(config)
    app = RbeeApp(config, LiveNodeSource(config, links), links, save_theme=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("c")
        assert isinstance(app.screen, ChatScreen)
        chat = app.screen
        await pilot.press(*"Count: 1, 2, 3, 4,", "enter")
        for _ in range(300):
            await pilot.pause(0.1)
            status = str(chat.query_one("#chat-status", Label).render())
            if "tokens/s" in status and "tokens ·" in status:
                break
        else:
            raise AssertionError(f"no tokens streamed: {status}")
        await pilot.press("escape")
        for _ in range(50):
            await pilot.pause(0.1)
            if chat.generating is None:
                break
        assert chat.generating is None
        status = str(chat.query_one("#chat-status", Label).render())
        assert "stopped after" in status
        reply = chat.query(Markdown).last()
        assert reply.source.strip()
        # The slot is free: a second question streams and finishes.
        await pilot.press(*"Hi", "enter")
        for _ in range(300):
            await pilot.pause(0.1)
            if chat.generating is None and len(chat.history) == 4:
                break
        assert [m.role for m in chat.history] == ["user", "assistant", "user", "assistant"]
        assert isinstance(chat.query_one("#chat-input"), Input)
    await asyncio.sleep(0)
