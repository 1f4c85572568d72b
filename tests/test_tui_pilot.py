"""Pilot tests of the dashboard (B70-B78) on the scripted source, and chat on a real agent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
from rbee_tui.widgets.event_log import EventLog
from rbee_tui.widgets.tables import NodesTable, WorkersTable
from tests.cli_support import RbeeEnv
from tests.tui_support import Notifications, fill, make_app, until, wait_for_workers

SIZE = (120, 36)


async def test_b70_dead_node_turns_red_and_recovers_by_itself() -> None:
    app, source = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await fill(app, source, 1)
        await pilot.pause()
        table = app.dashboard.query_one(NodesTable)
        assert "down" in str(table.get_cell("lab-a100", "STATUS"))
        assert "press s to start it" in str(table.get_cell("lab-a100", "NOTE"))
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
        assert [k.value for k in table.rows] == keys_before
        assert table.selected_key() == "gpu1"
        workers = app.dashboard.query_one(WorkersTable)
        assert [k.value for k in workers.rows] == ["w1-a3f2", "w2-77c1"]
        assert len(app.fleet.stats_of("gpu1").ram_used_mb) == 5


async def test_b70_polls_pause_while_a_modal_is_open() -> None:
    from textual.screen import ModalScreen

    app, _ = make_app()
    app.poll_enabled = True
    app.config.settings.poll_interval_s = 0.01
    polls: list[bool] = []  # one per poll started: was a modal open?
    ticks_in_modal: list[str] = []
    poll_now, next_poll = app.poll_now, app._next_poll

    def modal() -> bool:
        return bool(app.screen_stack) and isinstance(app.screen_stack[-1], ModalScreen)

    def counting_poll(name: str) -> None:
        polls.append(modal())
        poll_now(name)

    def counting_tick(name: str) -> None:
        if modal():
            ticks_in_modal.append(name)
        next_poll(name)

    app.poll_now = counting_poll  # type: ignore[method-assign]
    app._next_poll = counting_tick  # type: ignore[method-assign]
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: len(polls) >= 6)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        # Every node's poll timer fires twice while the help is open, and starts nothing.
        await until(pilot, lambda: len(ticks_in_modal) >= 2 * len(app.config.names()))
        assert not any(polls), "polled while a modal was open"
        await pilot.press("escape")
        resumed = len(polls)
        await until(pilot, lambda: len(polls) > resumed + 3)


def test_b76_every_binding_has_an_id_and_a_tooltip() -> None:
    from rbee_tui.screens import (
        chat,
        chat_list,
        chat_settings,
        download,
        install,
        logs,
        modals,
        models,
        node_form,
        spawn,
    )
    from rbee_tui.widgets.chat_input import ChatInput

    classes = [RbeeApp, DashboardScreen, chat.ChatScreen, models.ModelsScreen,
               logs.LogsScreen, modals.ConfirmScreen, modals.HelpScreen, modals.PromptScreen,
               modals.CommandScreen, node_form.NodeFormScreen, install.InstallScreen,
               spawn.SpawnScreen, download.DownloadScreen, chat_list.ChatListScreen,
               chat_settings.ChatSettingsScreen, ChatInput]
    for cls in classes:
        for binding in [*cls.BINDINGS, *getattr(cls, "HELP_BINDINGS", [])]:
            assert isinstance(binding, Binding)
            assert binding.id and binding.tooltip, f"{cls.__name__}: {binding.key}"


async def test_b76_help_lists_the_screens_keys() -> None:
    app, _ = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        text = app.screen.text()
        for words in ("Add a node: SSH is tested", "Install or upgrade the agent",
                      "Show every key"):
            assert words in text


async def test_b76_palette_finds_nodes_and_actions() -> None:
    from rbee_tui.palette import RbeeCommands

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
        writes = saves_off_the_ui_thread(monkeypatch, "rbee_tui.ops.nodes.save_config")
        await pilot.press("d", "y")
        await wait_for_workers(pilot, "node-remove")
        assert "lab-a100" not in app.config.nodes
        assert "lab-a100" not in app.dashboard.query_one(NodesTable).rows
    assert writes == [False], "removed by ops.nodes.remove, in a thread"
    assert "lab-a100" not in load_config().nodes and "gpu1" in load_config().nodes


def saves_off_the_ui_thread(monkeypatch: pytest.MonkeyPatch, target: str) -> list[bool]:
    """Wrap `save_config` where `target` names it: one entry per call, True when it ran on
    the thread of the app's event loop (it takes a file lock: it must not)."""
    import threading

    from rbee_tui import config as config_module

    calls: list[bool] = []

    def save(config: Any, path: Any = None) -> Path:
        calls.append(threading.current_thread() is threading.main_thread())
        return config_module.save_config(config, path)

    monkeypatch.setattr(target, save)
    return calls


async def test_b73_model_delete_asks_then_calls_the_agent() -> None:
    app, source = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await fill(app, source, 1)
        await pilot.pause()
        await pilot.press("j", "m")
        await wait_for_workers(pilot, "models")
        await pilot.press("j", "d")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await wait_for_workers(pilot, "models-delete")
    assert "DELETE /v1/models/qwen2.5-7b-instruct" in source.requests


async def test_b73_download_shows_progress_then_closes_and_reloads_the_catalog() -> None:
    from rbee_tui.screens.download import DownloadScreen

    app, source = make_app()
    notes = Notifications(app)
    async with app.run_test(size=SIZE) as pilot:
        await fill(app, source, 1)
        await pilot.pause()
        await pilot.press("j", "m")
        await wait_for_workers(pilot, "models")
        await pilot.press("n")
        dialog = app.screen
        assert isinstance(dialog, DownloadScreen)
        await pilot.press(*"not a ref", "enter")
        assert "Use hf:" in str(dialog.query_one("#download-status", Label).render())
        dialog.query_one("#download-ref", Input).value = "hf:bees/Tiny-GGUF"
        events = dialog.query_one(EventLog)
        await pilot.press("enter")
        await wait_for_workers(pilot, "download")
        assert app.screen is not dialog, "the dialog closes after success"
        assert dialog.done
        log = "\n".join(events.plain)
        assert "tiny downloaded to /srv/rbee/models/hf/tiny.gguf" in log
        await notes.wait_for("tiny downloaded to /srv/rbee/models/hf/tiny.gguf")
    assert "POST /v1/models/download" in source.requests


async def test_b74_stop_worker_from_the_workers_table_after_confirming() -> None:
    app, source = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await fill(app, source, 1)
        await pilot.pause()
        await pilot.press("j", "tab", "x")
        assert isinstance(app.screen, ConfirmScreen)
        assert "unloaded" in app.screen.question
        await pilot.press("y")
        await wait_for_workers(pilot, "workers")
    assert "DELETE /v1/workers/w1-a3f2" in source.requests


async def test_b78_errors_become_notifications() -> None:
    app, source = make_app()
    notes = Notifications(app)
    async with app.run_test(size=SIZE) as pilot:
        await fill(app, source, 1)
        await pilot.pause()
        await pilot.press("G", "m")  # lab-a100 is down: its catalog cannot load
        await wait_for_workers(pilot, "models")
        await notes.wait_for("Cannot reach the agent of node 'lab-a100'")


async def test_b77_theme_choice_is_persisted(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEE_CONFIG", str(tmp_path / "config.toml"))
    app, _ = make_app()
    app.save_theme = True
    async with app.run_test(size=SIZE) as pilot:
        assert app.theme == "rbee"
        assert "rbee-light" in app.available_themes
        writes = saves_off_the_ui_thread(monkeypatch, "rbee_tui.app.save_config")
        app.theme = "rbee-light"
        await wait_for_workers(pilot, "save-theme")
    assert writes == [False]
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
    notes = Notifications(app)
    app.config.settings.theme = "broken"
    async with app.run_test(size=SIZE):
        await notes.wait_for("broken.toml was skipped", "not available")
        assert app.theme == "rbee" and "mine" in app.available_themes


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
        # Greedy, and a question whose answer is long (512 tokens): the reply is still
        # streaming when the test looks, however fast the machine is.
        chat.conversation.settings.temperature = 0.0
        await pilot.press(*"Count from 1 to 1000, one number after another, separated by "
                          "commas.", "enter")

        def status() -> str:
            return str(chat.query_one("#chat-status", Label).render())

        await until(pilot, lambda: "tokens/s" in status() and "tokens ·" in status(),
                    limit_s=60)
        await pilot.press("escape")
        await until(pilot, lambda: chat.generating is None)
        assert "stopped after" in status()
        reply = chat.query(Markdown).last()
        assert reply.source.strip()
        # The slot is free: a second question streams and finishes.
        await pilot.press(*"Hi", "enter")
        await until(pilot, lambda: chat.generating is None and len(chat.history) == 4,
                    limit_s=60)
        assert [m.role for m in chat.history] == ["user", "assistant", "user", "assistant"]
        # Esc with nothing streaming goes back; the conversation was saved on the way.
        await pilot.press("escape")
        assert app.screen is app.dashboard
        saved = app.chats.latest("localhost", chat.model)
        assert saved is not None and [m.role for m in saved.messages] == [
            "user", "assistant", "user", "assistant"]
