"""Logs (B75): the node's agent log, or one worker's, following live."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Footer, Header, Log

from rbee_tui.screens.base import RbeeScreen

if TYPE_CHECKING:
    from rbee_tui.app import RbeeApp


class LogsScreen(RbeeScreen[None]):
    BINDINGS = [
        Binding("escape,q", "app.pop_screen", "Back", id="logs.back",
                tooltip="Back to the dashboard"),
        Binding("w", "next_source", "Agent/worker", id="logs.source",
                tooltip="Cycle between the agent's log and each worker's"),
        Binding("G", "bottom", "Follow", id="logs.follow", tooltip="Jump to the newest line"),
    ]

    def __init__(self, node: str, lines: int = 200) -> None:
        super().__init__()
        self.node = node
        self.lines = lines
        self.source_name: str | None = None  # None = the agent

    @property
    def rbee(self) -> RbeeApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Log(id="log", highlight=True, max_lines=5000)
        yield Footer()

    def on_mount(self) -> None:
        self.follow()

    def _title(self) -> None:
        self.sub_title = f"{self.source_name or 'agent'} log on {self.node} (following)"

    @work(exclusive=True, group="logs", exit_on_error=False)
    async def follow(self) -> None:
        self._title()
        log = self.query_one(Log)
        log.clear()
        client = await self.rbee.source.open_client(self.node)
        async with client:
            async for entry in client.follow_logs(self.source_name, self.lines):
                log.write_line(entry.line)

    def action_next_source(self) -> None:
        workers = [w.id for w in self.rbee.snapshot(self.node).workers]
        sources: list[str | None] = [None, *workers]
        index = sources.index(self.source_name) if self.source_name in sources else 0
        self.source_name = sources[(index + 1) % len(sources)]
        self.follow()

    def action_bottom(self) -> None:
        self.query_one(Log).scroll_end(animate=False)
