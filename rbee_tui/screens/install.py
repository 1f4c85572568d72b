"""Install or upgrade the agent on a node (B06, B71): a live step log, then the result."""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Label, Log

from rbee_agent.protocol import RbeeError
from rbee_tui.config import Config, Node
from rbee_tui.events import Finished, OutputLine, PhaseDone, PhaseStarted
from rbee_tui.ops import nodes as node_ops
from rbee_tui.screens.base import RbeeModal


class InstallScreen(RbeeModal[Node | None]):
    BINDINGS = [Binding("escape", "close", "Close", id="install.close",
                        tooltip="Close (an install in progress is stopped)")]

    def __init__(self, config: Config, node: Node) -> None:
        super().__init__()
        self.config = config
        self.node = node
        self.result: Node | None = None

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog install"):
            yield Label(f"Installing the rbee agent on {self.node.name}", classes="question")
            yield Log(id="install-log", max_lines=2000)
            yield Label("", id="install-status")
            with Horizontal(classes="buttons"):
                yield Button("Close", id="install-close")

    def on_mount(self) -> None:
        self.install()

    @work(exclusive=True, group="install", exit_on_error=False)
    async def install(self) -> None:
        from rbee_tui import ssh

        log = self.query_one("#install-log", Log)
        status = self.query_one("#install-status", Label)
        try:
            async for event in ssh.install_agent(self.node, self.config.settings,
                                                 api_key=self.node.api_key):
                if isinstance(event, PhaseStarted):
                    log.write_line(f"→ {event.message}")
                elif isinstance(event, PhaseDone):
                    log.write_line(f"  ✓ {event.message or event.phase}")
                elif isinstance(event, OutputLine):
                    log.write_line(f"    {event.line}")
                elif isinstance(event, Finished):
                    log.write_line(f"✓ {event.message}")
                    status.update(f"[green]{event.message}[/green]")
                    self.result = node_ops.installed(self.node, event)
        except RbeeError as err:
            log.write_line(f"✗ {err.message}")
            for line in err.details.get("stderr_tail", []) or []:
                log.write_line(f"    {line}")
            if err.hint:
                log.write_line(f"  hint: {err.hint}")
            status.update(f"[red]{err.message}[/red]")

    @on(Button.Pressed, "#install-close")
    def action_close(self) -> None:
        self.dismiss(self.result)
