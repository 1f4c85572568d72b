"""B160, B170: the chat keeps what you said, on the scripted agent (the real one is in
test_tui_pilot)."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest
from textual.containers import VerticalScroll
from textual.widgets import Input, Label, Markdown

from rbee_tui.chat_store import ChatStore, Conversation
from rbee_tui.screens import chat as chat_module
from rbee_tui.screens.chat import ChatScreen
from rbee_tui.screens.chat_list import ChatListScreen
from rbee_tui.screens.chat_settings import ChatSettingsScreen
from rbee_tui.screens.modals import ConfirmScreen, PromptScreen
from rbee_tui.widgets.chat_input import ChatInput
from tests.tui_support import REPLY, Notifications, fill, make_app, until, wait_for_workers

SIZE = (120, 36)


def status(chat: ChatScreen) -> str:
    return str(chat.query_one("#chat-status", Label).render())


async def open_chat(pilot, app) -> ChatScreen:  # type: ignore[no-untyped-def]
    await fill(app, app.source, 1)
    await pilot.press("j", "c")
    await wait_for_workers(pilot, "chat-models")
    assert isinstance(app.screen, ChatScreen)
    return app.screen


async def test_b160_esc_stops_a_reply_and_only_a_second_esc_leaves() -> None:
    app, _ = make_app(hold_stream=True)
    async with app.run_test(size=SIZE) as pilot:
        chat = await open_chat(pilot, app)
        await pilot.press(*"Hello", "enter")
        await until(pilot, lambda: "tokens ·" in status(chat))
        await pilot.press("escape")
        await until(pilot, lambda: chat.generating is None)
        assert app.screen is chat, "the Esc that stopped the reply did not leave"
        assert "stopped after 12 tokens" in status(chat) and "Esc again" in status(chat)
        assert [m.role for m in chat.history] == ["user", "assistant"]
        await pilot.press("escape")
        assert app.screen is app.dashboard


async def test_b160_a_conversation_survives_leaving_and_a_restart(tmp_path: Path) -> None:
    app, _ = make_app(hold_stream=False)
    async with app.run_test(size=SIZE) as pilot:
        chat = await open_chat(pilot, app)
        await pilot.press(*"What is the capital of France?", "enter")
        await wait_for_workers(pilot, "chat")
        assert chat.history[-1].content == REPLY
        await pilot.press("escape")
        await pilot.press("c")
        await wait_for_workers(pilot, "chat-models")
        again = app.screen
        assert isinstance(again, ChatScreen) and again is not chat
        shown = [m.source for m in again.query(Markdown)]
        assert shown[:2] == ["What is the capital of France?", REPLY]
    store = ChatStore.open_default()  # what the next run of rbee finds
    saved = store.latest("gpu1", "smollm2-135m")
    assert saved is not None and [m.content for m in saved.messages] == [
        "What is the capital of France?", REPLY]


async def test_b160_saved_chats_reopen_rename_export_delete(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    store = ChatStore.open_default()
    old = Conversation(0, "localhost", "qwen2.5-7b-instruct")
    from rbee_agent.protocol import ChatMessage

    store.add_message(old, ChatMessage(role="user", content="An old question"))
    store.add_message(old, ChatMessage(role="assistant", content="An old answer"))
    store.close()
    app, _ = make_app(hold_stream=False)
    async with app.run_test(size=SIZE) as pilot:
        chat = await open_chat(pilot, app)
        await pilot.press("ctrl+o")
        listing = app.screen
        assert isinstance(listing, ChatListScreen)
        assert [c.title for c in listing.conversations.values()] == ["An old question"]
        await pilot.press("r")
        assert isinstance(app.screen, PromptScreen)
        app.screen.query_one(Input).value = "Old, renamed"
        await pilot.press("enter")
        assert [c.title for c in listing.conversations.values()] == ["Old, renamed"]
        await pilot.press("e")
        assert isinstance(app.screen, PromptScreen)
        target = tmp_path / "old.md"
        app.screen.query_one(Input).value = str(target)
        await pilot.press("enter")
        assert target.read_text().startswith("# Old, renamed\n")
        assert "## qwen2.5-7b-instruct\n\nAn old answer" in target.read_text()
        await pilot.press("enter")  # reopen: the chat follows its node and model
        await pilot.pause()
        reopened = app.screen
        assert isinstance(reopened, ChatScreen) and reopened is not chat
        assert (reopened.node, reopened.model) == ("localhost", "qwen2.5-7b-instruct")
        assert [m.content for m in reopened.history] == ["An old question", "An old answer"]
        await pilot.press("ctrl+o", "d")
        assert isinstance(app.screen, ConfirmScreen)
        assert "Its 2 messages are removed for good" in app.screen.question
        await pilot.press("y")
        assert isinstance(app.screen, ChatListScreen) and not app.screen.conversations


async def test_b160_system_prompt_and_settings_go_with_the_next_request() -> None:
    app, source = make_app(hold_stream=False)
    async with app.run_test(size=SIZE) as pilot:
        chat = await open_chat(pilot, app)
        await pilot.press("ctrl+s")
        form = app.screen
        assert isinstance(form, ChatSettingsScreen)
        await pilot.press(*"Be brief.")
        form.query_one("#max_tokens", Input).value = "64"
        form.query_one("#temperature", Input).value = "3"  # out of bounds: refused
        form.query_one("#seed", Input).value = "7"
        await pilot.press("enter")
        assert app.screen is form
        assert "Temperature" in str(form.query_one("#form-error").render())
        form.query_one("#temperature", Input).value = "0.2"
        form.query_one("#temperature", Input).focus()
        await pilot.press("enter")  # Enter saves from any field
        assert app.screen is chat
        await pilot.press(*"Hi", "enter")
        await wait_for_workers(pilot, "chat")
    body = next(b for path, bodies in source.bodies.items() if path.endswith("/inference")
                for b in bodies)
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert (body["max_tokens"], body["temperature"], body["seed"]) == (64, 0.2, 7)


async def test_b160_multi_line_input_page_keys_and_copy() -> None:
    app, _ = make_app(hold_stream=False)
    async with app.run_test(size=(100, 24)) as pilot:
        chat = await open_chat(pilot, app)
        box = chat.query_one(ChatInput)
        await pilot.press(*"line one", "ctrl+j", *"line two", "enter")
        await wait_for_workers(pilot, "chat")
        assert chat.history[0].content == "line one\nline two"
        assert box.text == ""
        for n in range(3):
            await pilot.press(*f"question {n}", "enter")
            await wait_for_workers(pilot, "chat")
        transcript = chat.query_one("#conversation", VerticalScroll)
        bottom = transcript.scroll_y
        assert bottom > 0
        await pilot.press("pageup")
        await pilot.pause()
        assert transcript.scroll_y < bottom and chat.focused is box
        await pilot.press("pagedown")
        await pilot.pause()
        assert transcript.scroll_y == bottom
        await pilot.press("ctrl+y")
        assert app.clipboard == REPLY


async def test_b160_b170_until_the_first_token_the_wait_is_counted_and_the_queue_shown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ticks = itertools.count()
    monkeypatch.setattr(chat_module.time, "perf_counter", lambda: next(ticks) * 0.1)
    app, source = make_app(hold_stream=True)
    source.queued_frames = [2, 1]
    source.gate = asyncio.Event()
    async with app.run_test(size=SIZE) as pilot:
        chat = await open_chat(pilot, app)
        await pilot.press(*"Hello", "enter")
        await until(pilot, lambda: "queued, 1 ahead" in status(chat))
        first = status(chat)
        await until(pilot, lambda: status(chat) != first)  # the seconds keep counting
        assert status(chat).startswith("queued, 1 ahead · ") and status(chat).endswith(" s")
        seconds = [float(s.split(" · ")[1].removesuffix(" s")) for s in (first, status(chat))]
        assert seconds[1] > seconds[0]
        source.gate.set()
        await until(pilot, lambda: "tokens ·" in status(chat))
        await pilot.press("escape")
        await until(pilot, lambda: chat.generating is None)


async def test_b177_a_note_of_the_chat_flow_is_shown_and_kept() -> None:
    """No room for another worker: the chat says it joins the busy worker's queue."""
    app, source = make_app(hold_stream=True)
    source.spawn_refusal = "Not enough VRAM on GPU 1 for qwen2.5-7b-instruct"
    app.config.settings.spawn_when_queued = 1  # w2-77c1 has 2 waiting: try another copy
    notes = Notifications(app)
    async with app.run_test(size=SIZE) as pilot:
        await fill(app, source, 1)
        app.open_chat("gpu1", "qwen2.5-7b-instruct")
        await wait_for_workers(pilot, "chat-models")
        chat = app.screen
        assert isinstance(chat, ChatScreen)
        await pilot.press(*"Hello", "enter")
        await notes.wait_for("no room for another worker (Not enough VRAM on GPU 1 for "
                             "qwen2.5-7b-instruct): joining the queue of w2-77c1")
        await until(pilot, lambda: "tokens ·" in status(chat))
    assert source.bodies["/v1/workers"][0]["new"] is True


async def test_b177_link_steps_reach_the_flow_that_asked_and_notes_else_a_notification(
) -> None:
    """What links do on the way (here a retried connect) goes to the chat or dialog whose
    task asked; a note nobody asked for (a poll found the local agent's port moved) becomes
    a notification."""
    from rbee_agent.protocol import RbeeError
    from rbee_tui.app import RbeeApp
    from rbee_tui.events import Attempt, Event, Note
    from rbee_tui.links import NodeLinks, reporting_to
    from tests.tui_support import ScriptedSource, silent_node_config

    config = silent_node_config()
    links = NodeLinks(config)
    app = RbeeApp(config, ScriptedSource(), links, poll=False, save_theme=False)
    notes = Notifications(app)
    async with app.run_test(size=SIZE):
        seen: list[Event] = []
        client = await links.peek("lan")
        async with client:
            with reporting_to(seen.append), pytest.raises(RbeeError):
                await client.health()
        assert [(type(e), getattr(e, "number", None)) for e in seen] == [(Attempt, 1)]
        assert notes.messages == [], "the flow's sink took its steps"
        assert links.report is not None
        links.report(Note("agent", "port 9200 is held by another user's agent; this "
                                   "config's local agent now uses port 9201"))
        await notes.wait_for("now uses port 9201")
