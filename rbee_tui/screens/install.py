"""Install or upgrade the agent on a node (B06, B71): a live step log, then the result.

The log wraps (B163): a long pip line, an error or the summary is shown whole. When the
install ends the dialog turns into its result: the summary (or the error and its hint) on
top and the Close button focused, so Enter closes it.
"""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Label, Static

from rbee_agent.protocol import RbeeError
from rbee_tui.config import Config, Node
from rbee_tui.events import Finished
from rbee_tui.ops import nodes as node_ops
from rbee_tui.screens.base import RbeeModal
from rbee_tui.widgets.event_log import EventLog, describe_error


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
            yield Static("", id="install-status")
            yield EventLog(id="install-log", max_lines=2000)
            with Horizontal(classes="buttons"):
                yield Button("Close", id="install-close")

    def on_mount(self) -> None:
        self.query_one("#install-status").display = False
        self.install()

    @work(exclusive=True, group="install", exit_on_error=False)
    async def install(self) -> None:
        from rbee_tui import ssh

        log = self.query_one("#install-log", EventLog)
        status = self.query_one("#install-status", Static)
        try:
            async for event in ssh.install_agent(self.node, self.config.settings,
                                                 api_key=self.node.api_key):
                log.show(event)
                if isinstance(event, Finished):
                    status.update(f"[green]✓ {event.message}[/green]")
                    self.result = node_ops.installed(self.node, event)
        except RbeeError as err:
            log.show_error(err)
            status.update(describe_error(err))
        status.display = True
        self.query_one("#install-close", Button).focus()

    @on(Button.Pressed, "#install-close")
    def action_close(self) -> None:
        self.dismiss(self.result)
