"""Add a model to a node (B73, B174): download `hf:org/repo[/file.gguf]`, or register a GGUF
file already on the node with `file:///abs/path.gguf`.

Both go through the agent's download route (the one flow the CLI uses too): for a `file:`
reference the agent adds the file to its catalog in place and answers at once. The progress
bar follows the bytes and stops (hidden) on an error, which the event log shows whole; on
success the dialog closes and a notification says where the model is.
"""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.validation import Function
from textual.widgets import Button, Input, Label, ProgressBar
from textual.worker import Worker

from rbee_agent.model_refs import parse_model_ref
from rbee_agent.protocol import RbeeError
from rbee_tui.events import Event, Finished, Progress
from rbee_tui.fleet import Fleet
from rbee_tui.links import reporting_to
from rbee_tui.orchestrator import download_flow
from rbee_tui.screens.base import RbeeModal, form_row
from rbee_tui.widgets.event_log import EventLog

ACCEPTED = "hf:org/repo, hf:org/repo/file.gguf, or file:///abs/path.gguf (a file on the node)"


def _valid_ref(text: str) -> bool:
    try:
        parse_model_ref(text)
    except RbeeError:
        return False
    return True


class DownloadScreen(RbeeModal[bool]):
    BINDINGS = [Binding("escape", "close", "Close", id="download.close",
                        tooltip="Close; a download under way is cancelled")]

    def __init__(self, fleet: Fleet, node: str) -> None:
        super().__init__()
        self.fleet = fleet
        self.node = node
        self.running: Worker[None] | None = None
        self.done = False

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog form"):
            yield Label(f"Add a model to {self.node}", classes="question")
            yield form_row("Reference", Input(
                placeholder="hf:org/repo  ·  file:///path/model.gguf", id="download-ref",
                validators=[Function(_valid_ref, "not a model reference")]))
            yield Label(f"Accepted: {ACCEPTED}", classes="hint")
            yield ProgressBar(id="download-progress", show_eta=True)
            yield Label("", id="download-status")
            yield EventLog(id="download-log")
            with Horizontal(classes="buttons"):
                yield Button("Add (enter)", variant="primary", id="download-go")
                yield Button("Close", id="download-close")

    def on_mount(self) -> None:
        self.query_one("#download-progress").display = False
        self.query_one("#download-log").display = False
        self.query_one("#download-ref", Input).focus()

    @on(Button.Pressed, "#download-go")
    @on(Input.Submitted, "#download-ref")
    def _go(self) -> None:
        ref = self.query_one("#download-ref", Input).value.strip()
        if not _valid_ref(ref):
            self.query_one("#download-status", Label).update(f"[red]Use {ACCEPTED}[/red]")
            return
        if self.running is None:
            self.running = self.download(ref)

    @work(exclusive=True, group="download", exit_on_error=False)
    async def download(self, ref: str) -> None:
        status = self.query_one("#download-status", Label)
        bar = self.query_one("#download-progress", ProgressBar)
        log = self.query_one("#download-log", EventLog)
        log.display = True
        log.reset()
        bar.display = True
        bar.update(total=None, progress=0)
        status.update("")
        try:
            with reporting_to(log.show):  # a cold start or a retry on the way (B177)
                client = await self.fleet.source.open_client(self.node)
                async with client:
                    async for event in download_flow(client, ref):
                        self._show(event)
        except RbeeError as err:
            bar.display = False  # an indeterminate bar would keep moving after the failure
            log.show_error(err)
            status.update("[red]failed[/red]: see above")
        finally:
            self.running = None

    def _show(self, event: Event) -> None:
        self.query_one("#download-log", EventLog).show(event)
        bar = self.query_one("#download-progress", ProgressBar)
        status = self.query_one("#download-status", Label)
        if isinstance(event, Progress):
            bar.update(total=event.total or None, progress=event.done)
            status.update(f"{event.done:.1f} / {event.total:.1f} MB  {event.message}")
        elif isinstance(event, Finished):
            bar.update(progress=bar.total or 1, total=bar.total or 1)
            status.update(f"[green]{event.message}[/green]")
            self.done = True
            self.notify(event.message, title=f"Model added to {self.node}")
            self.dismiss(True)

    @on(Button.Pressed, "#download-close")
    def action_close(self) -> None:
        if self.running is not None:
            self.running.cancel()
        self.dismiss(self.done)
