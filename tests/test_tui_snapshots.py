"""Snapshots of every screen (B70-B79, B160-B178) with deterministic data from the scripted
source: at 120×36, and at 80×24 (the smallest terminal we support) for the dashboard, the
node form, the chat and the help; at 200×60 for the dashboard, whose graphs take the room.

Look at the SVGs under tests/__snapshots__/ when you accept a change (render one with
`.venv/bin/python tools/screenshots.py --png FILE.svg`): they are claims about what a person
sees. Nothing here reads the wall clock: the scripted world has its own (`NOW`), and the
chat's tokens/s readout runs on a clock that ticks 10 ms per reading.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest
from textual.pilot import Pilot

from rbee_agent.protocol import ChatMessage
from rbee_tui.chat_store import ChatStore, Conversation
from rbee_tui.node_source import NodeSnapshot
from rbee_tui.screens import chat, chat_list
from tests.tui_support import NOW, fill, frames, make_app, wait_for_workers

SIZE = (120, 36)
SMALL = (80, 24)
BIG = (200, 60)

Before = Callable[[Pilot[None]], Awaitable[None]]


def settle(*keys: str, groups: tuple[str, ...] = ()) -> Before:
    async def run_before(pilot: Pilot[None]) -> None:
        app = pilot.app
        await fill(app, app.source)  # type: ignore[attr-defined]
        await pilot.pause()
        await frames(app.dashboard)  # type: ignore[attr-defined]
        if keys:
            await pilot.press(*keys)
        if groups:  # a log or a held stream never completes: wait only for these
            await wait_for_workers(pilot, *groups)
        await frames(app.screen)

    return run_before


@pytest.mark.parametrize("size", [SIZE, SMALL, BIG], ids=["120x36", "80x24", "200x60"])
def test_snapshot_dashboard(snap_compare: Callable[..., bool], size: tuple[int, int]) -> None:
    app, _ = make_app()
    assert snap_compare(app, terminal_size=size, run_before=settle("j"))


@pytest.mark.parametrize("size", [SIZE, SMALL], ids=["120x36", "80x24"])
def test_snapshot_help(snap_compare: Callable[..., bool], size: tuple[int, int]) -> None:
    app, _ = make_app()
    assert snap_compare(app, terminal_size=size, run_before=settle("question_mark"))


@pytest.mark.parametrize("size", [SIZE, SMALL], ids=["120x36", "80x24"])
def test_snapshot_node_form(snap_compare: Callable[..., bool], size: tuple[int, int]) -> None:
    app, _ = make_app()
    keys = ("a", *"gpu2", "tab", *"10.0.0.22", "tab", "tab", *"ops")
    assert snap_compare(app, terminal_size=size, run_before=settle(*keys))


def test_snapshot_models(snap_compare: Callable[..., bool]) -> None:
    app, _ = make_app()
    assert snap_compare(app, terminal_size=SIZE, run_before=settle("j", "m", groups=("models",)))


def test_snapshot_spawn_form(snap_compare: Callable[..., bool]) -> None:
    app, _ = make_app()
    assert snap_compare(app, terminal_size=SIZE,
                        run_before=settle("j", "w", groups=("spawn-models",)))


def test_snapshot_logs(snap_compare: Callable[..., bool]) -> None:
    app, _ = make_app()

    async def before(pilot: Pilot[None]) -> None:
        await settle("j", "l")(pilot)
        view = pilot.app.screen.query_one("#log")
        while view.document.line_count < 5:  # type: ignore[attr-defined]
            await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=before)


@pytest.mark.parametrize("size", [SIZE, SMALL], ids=["120x36", "80x24"])
def test_snapshot_chat_mid_stream(snap_compare: Callable[..., bool],
                                  monkeypatch: pytest.MonkeyPatch,
                                  size: tuple[int, int], tmp_path: object) -> None:
    # A clock that ticks 10 ms per reading, so the tokens/s readout is the same every run.
    ticks = itertools.count()
    monkeypatch.setattr(chat.time, "perf_counter", lambda: next(ticks) * 0.01)
    monkeypatch.setenv("RBEE_CONFIG", f"{tmp_path}/config.toml")
    app, _ = make_app(hold_stream=True)

    async def before(pilot: Pilot[None]) -> None:
        await settle("j", "c", groups=("chat-models",))(pilot)
        await pilot.press(*"What is the capital of France?", "enter")
        screen = pilot.app.screen
        while "tokens ·" not in str(screen.query_one("#chat-status").render()):
            await pilot.pause()
        while len(screen.query_one("#conversation").children[-1].source) < 60:
            await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=before)


def test_snapshot_command_line(snap_compare: Callable[..., bool]) -> None:
    """`:` with a half-typed command: the suggestion and the list of commands (B167)."""
    app, _ = make_app()
    assert snap_compare(app, terminal_size=SIZE, run_before=settle("colon", *"chat gp"))


def test_snapshot_install_backend_choice(snap_compare: Callable[..., bool]) -> None:
    """`i` on a node with NVIDIA GPUs and a CPU-only llama.cpp: what the poll found, cpu or
    cuda, cuda first (B178)."""
    app, source = make_app()
    scripted = source.snapshot_of

    def cpu_only(name: str) -> NodeSnapshot:
        snap = scripted(name)
        if snap.info is None:
            return snap
        return replace(snap, info=snap.info.model_copy(update={"gpu_offload": False}))

    source.snapshot_of = cpu_only  # type: ignore[method-assign]
    assert snap_compare(app, terminal_size=SIZE, run_before=settle("j", "i"))


def test_snapshot_chat_settings(snap_compare: Callable[..., bool]) -> None:
    """ctrl+s in the chat: the system prompt and sampling settings of this chat (B160)."""
    app, _ = make_app()
    assert snap_compare(app, terminal_size=SIZE, run_before=settle(
        "j", "c", "ctrl+s", groups=("chat-models",)))


def test_snapshot_saved_chats(snap_compare: Callable[..., bool], tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """ctrl+o: the saved conversations, newest first (B160). Their times are the scripted
    world's, shown in UTC, so the snapshot does not follow the wall clock or the zone."""
    store = ChatStore(tmp_path / "chats.sqlite")
    chats = [("gpu1", "smollm2-135m", "What is the capital of France?", 3600),
             ("gpu1", "qwen2.5-7b-instruct", "Write a haiku about GPUs", 600),
             ("localhost", "smollm2-135m", "Summarise the rbee README in three lines", 60)]
    for node, model, question, age_s in chats:
        conversation = Conversation(0, node, model)
        store.add_message(conversation, ChatMessage(role="user", content=question))
        store.add_message(conversation, ChatMessage(role="assistant", content="…"))
        store.db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?",
                         (NOW - age_s, conversation.id))
    monkeypatch.setattr(chat_list.time, "localtime", chat_list.time.gmtime)
    app, _ = make_app()
    app._chats = store
    assert snap_compare(app, terminal_size=SIZE, run_before=settle("colon", *"chats", "enter"))
def test_snapshot_spawn_form_with_a_split(snap_compare: Callable[..., bool]) -> None:
    """B210: "Split over" names localhost; the plan shows layers and memory per node."""
    app, _ = make_app()

    async def before(pilot: Pilot[None]) -> None:
        await settle("j", "w", groups=("spawn-models",))(pilot)
        await pilot.press(*["tab"] * 6, *"localhost")
        await frames(pilot.app.screen)

    assert snap_compare(app, terminal_size=SIZE, run_before=before)
