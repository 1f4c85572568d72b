"""Download a model to a node (B73): a reference, then a progress bar until it is verified."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.validation import Function
from textual.widgets import Button, Input, Label, ProgressBar
from textual.worker import Worker

from rbee_agent.model_refs import parse_model_ref
from rbee_agent.protocol import RbeeError
from rbee_tui.events import Finished, Progress
from rbee_tui.orchestrator import download_flow
from rbee_tui.screens.base import RbeeModal

if TYPE_CHECKING:
    from rbee_tui.app import RbeeApp


def _valid_ref(text: str) -> bool:
    try:
        parse_model_ref(text)
    except RbeeError:
        return False
    return True


class DownloadScreen(RbeeModal[bool]):
    BINDINGS = [Binding("escape", "close", "Close", id="download.close",
                        tooltip="Close; a download under way is cancelled")]

    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node
        self.running: Worker[None] | None = None
        self.done = False

    @property
    def rbee(self) -> RbeeApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(f"Download a model to {self.node}", classes="question")
            yield Input(placeholder="hf:org/repo[/file.gguf][@revision]", id="download-ref",
                        validators=[Function(_valid_ref, "not a model reference")])
            yield ProgressBar(id="download-progress", show_eta=True)
            yield Label("", id="download-status")
            with Horizontal(classes="buttons"):
                yield Button("Download", variant="primary", id="download-go")
                yield Button("Close", id="download-close")

    def on_mount(self) -> None:
        self.query_one("#download-progress").display = False

    @on(Button.Pressed, "#download-go")
    @on(Input.Submitted, "#download-ref")
    def _go(self) -> None:
        ref = self.query_one("#download-ref", Input).value.strip()
        if not _valid_ref(ref):
            self.query_one("#download-status", Label).update(
                "[red]Use hf:org/repo, hf:org/repo/file.gguf or file:///path.gguf[/red]")
            return
        self.running = self.download(ref)

    @work(exclusive=True, group="download", exit_on_error=False)
    async def download(self, ref: str) -> None:
        status = self.query_one("#download-status", Label)
        bar = self.query_one("#download-progress", ProgressBar)
        bar.display = True
        try:
            client = await self.rbee.source.open_client(self.node)
            async with client:
                async for event in download_flow(client, ref):
                    if isinstance(event, Progress):
                        bar.update(total=event.total or None, progress=event.done)
                        status.update(f"{event.done:.1f} / {event.total:.1f} MB  "
                                      f"{event.message}")
                    elif isinstance(event, Finished):
                        bar.update(progress=bar.total or 1, total=bar.total or 1)
                        status.update(f"[green]{event.message}[/green]")
                        self.done = True
        except RbeeError as err:
            status.update(f"[red]{err.message}[/red]")
            self.rbee.show_error(err)
        finally:
            self.running = None

    @on(Button.Pressed, "#download-close")
    def action_close(self) -> None:
        if self.running is not None:
            self.running.cancel()
        self.dismiss(self.done)
