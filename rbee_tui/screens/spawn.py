"""Spawn a worker (B74): model from the node's catalog, backend, device; live progress."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Input, Label, ProgressBar, Select

from rbee_agent.protocol import BACKENDS, RbeeError
from rbee_tui.events import Finished, PhaseStarted, Progress
from rbee_tui.ops import workers
from rbee_tui.screens.base import RbeeModal

if TYPE_CHECKING:
    from rbee_tui.app import RbeeApp


class SpawnScreen(RbeeModal[None]):
    BINDINGS = [Binding("escape", "dismiss", "Close", id="spawn.close",
                        tooltip="Close (a started worker keeps loading)")]

    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    @property
    def rbee(self) -> RbeeApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(f"Spawn a worker on {self.node}", classes="question")
            yield Select([], prompt="model", id="spawn-model")
            yield Select([(b, b) for b in BACKENDS], value="cpu", allow_blank=False,
                         id="spawn-backend")
            yield Input("0", placeholder="device", id="spawn-device", type="integer")
            yield ProgressBar(id="spawn-progress", show_eta=False)
            yield Label("", id="spawn-status")
            with Horizontal(classes="buttons"):
                yield Button("Spawn", variant="primary", id="spawn-go")
                yield Button("Close", id="spawn-close")

    def on_mount(self) -> None:
        self.load_models()

    @work(exclusive=True, group="spawn-models", exit_on_error=False)
    async def load_models(self) -> None:
        reply = await self.rbee.source.models(self.node)
        picker = self.query_one("#spawn-model", Select)
        picker.set_options([(m.id, m.id) for m in reply.models])
        if reply.models:
            picker.value = reply.models[0].id

    @on(Button.Pressed, "#spawn-close")
    def _close(self) -> None:
        self.dismiss()

    @on(Button.Pressed, "#spawn-go")
    def _go(self) -> None:
        model = self.query_one("#spawn-model", Select).value
        backend = self.query_one("#spawn-backend", Select).value
        device = self.query_one("#spawn-device", Input).value or "0"
        if not isinstance(model, str) or not isinstance(backend, str):
            self.query_one("#spawn-status", Label).update("Pick a model first.")
            return
        self.spawn(model, backend, int(device))

    @work(exclusive=True, group="spawn", exit_on_error=False)
    async def spawn(self, model: str, backend: str, device: int) -> None:
        status = self.query_one("#spawn-status", Label)
        bar = self.query_one("#spawn-progress", ProgressBar)
        spec = workers.SpawnSpec(node=self.node, model_ref=model, backend=backend,
                                 device=device)
        try:
            workers.validate_spawn(spec, self.rbee.config)
            client = await self.rbee.source.open_client(self.node)
            async with client:
                async for event in workers.spawn(client, spec, self.rbee.config.settings):
                    if isinstance(event, PhaseStarted):
                        status.update(event.message)
                    elif isinstance(event, Progress):
                        bar.update(total=event.total, progress=event.done)
                    elif isinstance(event, Finished):
                        status.update(f"[green]{event.message}[/green]")
        except RbeeError as err:
            status.update(f"[red]{err.message}[/red]")
            self.rbee.show_error(err)
        self.rbee.poll_now(self.node)
