"""Snapshots of every screen (B70-B79) with deterministic data from the scripted source.

Look at the SVGs under tests/__snapshots__/ when you accept a change: they are claims about
what a person sees.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from textual.pilot import Pilot
from textual.widgets import Input

from rbee_tui.screens import chat
from tests.tui_support import fill, make_app

SIZE = (120, 36)


def settle(app_fill: bool = True) -> Callable[[Pilot[None]], object]:
    async def run_before(pilot: Pilot[None]) -> None:
        app = pilot.app
        if app_fill:
            await fill(app, app.source)  # type: ignore[attr-defined]
        for box in app.screen.query(Input):
            box.cursor_blink = False
        await pilot.pause()

    return run_before


def test_snapshot_dashboard(snap_compare: Callable[..., bool]) -> None:
    app, _ = make_app()
    assert snap_compare(app, terminal_size=SIZE, run_before=settle(), press=["j"])


def test_snapshot_help(snap_compare: Callable[..., bool]) -> None:
    app, _ = make_app()
    assert snap_compare(app, terminal_size=SIZE, run_before=settle(), press=["question_mark"])


def test_snapshot_node_form(snap_compare: Callable[..., bool]) -> None:
    app, _ = make_app()

    async def before(pilot: Pilot[None]) -> None:
        await settle()(pilot)  # type: ignore[misc]
        await pilot.press("a")
        await pilot.pause()
        for box in pilot.app.screen.query(Input):
            box.cursor_blink = False
        await pilot.press(*"gpu2", "tab", *"10.0.0.22", "tab", "tab", *"ops")
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=before)


def test_snapshot_models(snap_compare: Callable[..., bool]) -> None:
    app, _ = make_app()

    async def before(pilot: Pilot[None]) -> None:
        await settle()(pilot)  # type: ignore[misc]
        await pilot.press("j", "m")
        await pilot.pause(0.3)

    assert snap_compare(app, terminal_size=SIZE, run_before=before)


def test_snapshot_logs(snap_compare: Callable[..., bool]) -> None:
    app, _ = make_app()

    async def before(pilot: Pilot[None]) -> None:
        await settle()(pilot)  # type: ignore[misc]
        await pilot.press("j", "l")
        await pilot.pause(0.3)

    assert snap_compare(app, terminal_size=SIZE, run_before=before)


def test_snapshot_chat_mid_stream(snap_compare: Callable[..., bool],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # A clock that ticks 10 ms per reading, so the tokens/s readout is the same every run.
    ticks = itertools.count()
    monkeypatch.setattr(chat.time, "perf_counter", lambda: next(ticks) * 0.01)
    app, _ = make_app(hold_stream=True)

    async def before(pilot: Pilot[None]) -> None:
        await settle()(pilot)  # type: ignore[misc]
        await pilot.press("j", "c")
        await pilot.pause(0.3)
        for box in pilot.app.screen.query(Input):
            box.cursor_blink = False
        await pilot.press(*"What is the capital of France?", "enter")
        await pilot.pause(0.5)

    assert snap_compare(app, terminal_size=SIZE, run_before=before)
