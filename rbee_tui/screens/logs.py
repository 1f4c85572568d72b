"""Logs (B75, B163, B171): the node's agent log, or one worker's, following live.

`w` wraps long lines, `/` searches (n/N for the next and previous match), `G` follows the
newest line again. When the agent does not answer, the screen shows its last log lines
instead, read over SSH (or from the local agent's log file on localhost), with the reason
it could not follow them live: the place a newcomer finds out why an agent died.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Footer, Input

from rbee_agent.protocol import RbeeError
from rbee_tui.fleet import Fleet
from rbee_tui.screens.base import ESSENTIAL, RbeeScreen
from rbee_tui.widgets.log_view import LogView
from rbee_tui.widgets.top_bar import TopBar

DEAD_AGENT_LINES = 60


def local_agent_log() -> Path:
    """Where the detached local agent writes its output (rbee_tui.local_agent)."""
    from rbee_tui.config import state_dir

    return state_dir() / "local-agent.log"


def _tail(path: Path, lines: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


class LogsScreen(RbeeScreen[None]):
    HELP_TITLE = "Logs"
    BINDINGS = [
        *ESSENTIAL,
        Binding("escape,q", "back", "Back", id="logs.back",
                tooltip="End the search, or go back to the dashboard"),
        Binding("slash", "search", "Search", id="logs.search",
                tooltip="Search the log; n and N go to the next and previous match"),
        Binding("n", "next_match(1)", "Next", show=False, id="logs.next",
                tooltip="Next match of the search"),
        Binding("N", "next_match(-1)", "Previous", show=False, id="logs.previous",
                tooltip="Previous match of the search"),
        Binding("w", "wrap", "Wrap", id="logs.wrap", tooltip="Wrap long lines, or not"),
        Binding("tab", "next_source", "Agent/worker", id="logs.source",
                tooltip="Cycle between the agent's log and each worker's"),
        Binding("G,end", "bottom", "Follow", id="logs.follow",
                tooltip="Jump to the newest line and keep following"),
    ]

    def __init__(self, fleet: Fleet, node: str, lines: int = 200) -> None:
        super().__init__()
        self.fleet = fleet
        self.node = node
        self.lines = lines
        self.source_name: str | None = None  # None = the agent
        self.live = False

    def crumbs(self) -> list[str]:
        return [self.node, "logs", self.source_name or "agent"]

    def compose(self) -> ComposeResult:
        yield TopBar()
        yield LogView(id="log")
        yield Input(id="search", placeholder="search… (enter keeps it; n/N move; esc ends)")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#search", Input).display = False
        self.query_one(LogView).focus()
        self.follow()

    def _title(self) -> None:
        view = self.query_one(LogView)
        state = "following" if self.live and view.following else (
            "live" if self.live else "last lines")
        wrap = " · wrapped" if view.soft_wrap else ""
        self.show_crumbs(f"{state}{wrap}")

    @work(exclusive=True, group="logs", exit_on_error=False)
    async def follow(self) -> None:
        view = self.query_one(LogView)
        view.reset()
        self.live = True
        self._title()
        got = 0
        try:
            client = await self.fleet.source.open_client(self.node)
            async with client:
                async for entry in client.follow_logs(self.source_name, self.lines):
                    view.append(entry.line)
                    got += 1
        except RbeeError as err:
            if got:
                raise
            self.live = False
            await self.show_last_lines(err)
        self._title()

    async def show_last_lines(self, error: RbeeError) -> None:
        """The agent does not answer: its last lines, read without it (B171)."""
        view = self.query_one(LogView)
        view.append(f"The agent on {self.node} does not answer: {error.message}")
        node = self.fleet.config.node(self.node)
        if node.is_local:
            path = local_agent_log()
            lines = await asyncio.to_thread(_tail, path, DEAD_AGENT_LINES)
            view.append(f"Its last lines, from {path}:" if lines else
                        f"It has written nothing to {path}.")
            for line in lines:
                view.append(line)
            return
        from rbee_tui.remote_agent import fetch_agent_logs

        view.append("Reading its last log lines over SSH…")
        try:
            tails = await fetch_agent_logs(node, self.fleet.config.settings,
                                           lines=DEAD_AGENT_LINES)
        except RbeeError as err:
            view.append(f"Over SSH too: {err.message}")
            if err.hint:
                view.append(f"hint: {err.hint}")
            return
        for tail in tails:
            view.append(f"── last lines of {tail.source} on {self.node} (over SSH) ──")
            for line in tail.lines:
                view.append(line)

    # ------------------------------------------------------------------ keys

    def action_next_source(self) -> None:
        workers = [w.id for w in self.fleet.snapshot(self.node).workers]
        sources: list[str | None] = [None, *workers]
        index = sources.index(self.source_name) if self.source_name in sources else 0
        self.source_name = sources[(index + 1) % len(sources)]
        self.follow()

    def action_bottom(self) -> None:
        self.query_one(LogView).follow()
        self._title()

    def action_wrap(self) -> None:
        self.query_one(LogView).toggle_wrap()
        self._title()

    def action_search(self) -> None:
        box = self.query_one("#search", Input)
        box.display = True
        box.focus()

    @on(Input.Changed, "#search")
    def _search_changed(self, event: Input.Changed) -> None:
        count = self.query_one(LogView).search(event.value)
        self.top_bar().status = f"{count} matches" if event.value else ""

    @on(Input.Submitted, "#search")
    def _search_done(self, _: Input.Submitted) -> None:
        self.query_one(LogView).focus()

    def action_next_match(self, step: int) -> None:
        view = self.query_one(LogView)
        view.next_match(step)
        if view.matches:
            self.top_bar().status = (f"match {view.match_index + 1} of {len(view.matches)}"
                                     f" for '{view.query_text}'")

    def action_back(self) -> None:
        box = self.query_one("#search", Input)
        if box.display:
            box.value = ""
            box.display = False
            self.query_one(LogView).search("")
            self.query_one(LogView).focus()
            self._title()
            return
        self.app.pop_screen()
