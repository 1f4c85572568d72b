"""Spawn a worker (B74, B173): model, backend, device, context size, slots, GPU layers;
live progress in the event log; the dialog closes once the worker is up.

Every field is a labelled text box on one line (Enter submits from any of them); the model
box suggests the node's catalog as you type, the backend box the backends.
"""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.suggester import SuggestFromList
from textual.validation import Function, Integer
from textual.widgets import Button, Input, Label, ProgressBar

from rbee_agent.protocol import BACKENDS, ErrorCode, RbeeError
from rbee_tui.events import Finished, Progress
from rbee_tui.fleet import Fleet
from rbee_tui.links import reporting_to
from rbee_tui.messages import PollNow
from rbee_tui.ops import workers
from rbee_tui.screens.base import RbeeModal, form_row
from rbee_tui.widgets.event_log import EventLog


def _gpu_layers_ok(text: str) -> bool:
    try:
        workers.parse_gpu_layers(text)
    except ValueError:
        return False
    return True


def _optional_int(low: int, high: int) -> Function:
    def ok(text: str) -> bool:
        return not text.strip() or (text.strip().isdigit() and low <= int(text) <= high)

    return Function(ok, f"empty, or a whole number from {low} to {high}")


class SpawnScreen(RbeeModal[None]):
    BINDINGS = [Binding("escape", "dismiss", "Close", id="spawn.close",
                        tooltip="Close (a started worker keeps loading)")]

    def __init__(self, fleet: Fleet, node: str) -> None:
        super().__init__()
        self.fleet = fleet
        self.node = node
        self.models: list[str] = []

    def _backends(self) -> list[str]:
        info = self.fleet.snapshot(self.node).info
        return list(info.backends) if info else list(BACKENDS)

    def compose(self) -> ComposeResult:
        backends = self._backends()
        backend = "cuda" if "cuda" in backends else backends[0] if backends else "cpu"
        with VerticalScroll(classes="dialog form"):
            yield Label(f"Spawn a worker on {self.node}", classes="question")
            yield form_row("Model", Input(placeholder="a catalog id or a reference",
                                          id="spawn-model"))
            yield form_row("Backend", Input(
                backend, id="spawn-backend", placeholder=", ".join(backends),
                suggester=SuggestFromList(list(BACKENDS), case_sensitive=False),
                validators=[Function(lambda v: v.strip() in BACKENDS,
                                     f"one of {', '.join(BACKENDS)}")]))
            yield form_row("Device", Input(
                "0", id="spawn-device", type="integer", placeholder="GPU index",
                validators=[Integer(0, 63)]))
            yield form_row("Context size", Input(
                "", id="spawn-ctx", placeholder="tokens; empty: the model's",
                validators=[_optional_int(16, 1_048_576)]))
            yield form_row("Slots", Input(
                "", id="spawn-slots", placeholder="requests at once; empty: 1",
                validators=[_optional_int(1, 64)]))
            yield form_row("GPU layers", Input(
                "", id="spawn-gpu-layers", placeholder="all, auto or a number; empty: all",
                validators=[Function(_gpu_layers_ok, "all, auto, or a number of layers")]))
            yield ProgressBar(id="spawn-progress", show_eta=False)
            yield Label("", id="spawn-status")
            yield EventLog(id="spawn-log")
            with Horizontal(classes="buttons"):
                yield Button("Spawn (enter)", variant="primary", id="spawn-go")
                yield Button("Close", id="spawn-close")

    def on_mount(self) -> None:
        self.query_one("#spawn-progress").display = False
        self.query_one("#spawn-log").display = False
        self.query_one("#spawn-model", Input).focus()
        self.load_models()

    @work(exclusive=True, group="spawn-models", exit_on_error=False)
    async def load_models(self) -> None:
        reply = await self.fleet.source.models(self.node)
        self.models = [m.id for m in reply.models]
        box = self.query_one("#spawn-model", Input)
        box.suggester = SuggestFromList(self.models, case_sensitive=False)
        if self.models:
            box.placeholder = f"e.g. {self.models[0]}  (catalog: {', '.join(self.models)})"
            if not box.value:
                box.value = self.models[0]

    @on(Button.Pressed, "#spawn-close")
    def _close(self) -> None:
        self.dismiss()

    def spec(self) -> workers.SpawnSpec:
        problems = [f"{box.id.removeprefix('spawn-')}: {'; '.join(r.failure_descriptions)}"
                    for box in self.query(Input) if box.id
                    if (r := box.validate(box.value)) is not None and not r.is_valid]
        values = {box.id: box.value.strip() for box in self.query(Input)}
        if not values["spawn-model"]:
            problems.insert(0, "model: pick one from the catalog")
        if problems:
            raise RbeeError(ErrorCode.INVALID_REQUEST, "; ".join(problems))
        ctx, slots = values["spawn-ctx"], values["spawn-slots"]
        return workers.SpawnSpec(
            node=self.node, model_ref=values["spawn-model"], backend=values["spawn-backend"],
            device=int(values["spawn-device"] or 0),
            ctx_size=int(ctx) if ctx else None, slots=int(slots) if slots else None,
            gpu_layers=workers.parse_gpu_layers(values["spawn-gpu-layers"]))

    @on(Button.Pressed, "#spawn-go")
    @on(Input.Submitted)
    def _go(self) -> None:
        try:
            spec = self.spec()
        except RbeeError as err:
            self.query_one("#spawn-status", Label).update(f"[red]{err.message}[/red]")
            return
        self.spawn(spec)

    @work(exclusive=True, group="spawn", exit_on_error=False)
    async def spawn(self, spec: workers.SpawnSpec) -> None:
        status = self.query_one("#spawn-status", Label)
        bar = self.query_one("#spawn-progress", ProgressBar)
        log = self.query_one("#spawn-log", EventLog)
        log.display = True
        log.reset()
        status.update("")
        try:
            workers.validate_spawn(spec, self.fleet.config)
            with reporting_to(log.show):  # a cold start or a retry on the way (B177)
                client = await self.fleet.source.open_client(self.node)
                async with client:
                    async for event in workers.spawn(client, spec,
                                                     self.fleet.config.settings):
                        log.show(event)
                        if isinstance(event, Progress):
                            bar.display = True
                            bar.update(total=event.total, progress=event.done)
                        elif isinstance(event, Finished):
                            self.notify(event.message, title=f"Worker on {self.node}")
                            self.app.post_message(PollNow(self.node))
                            self.dismiss()
                            return
        except RbeeError as err:
            bar.display = False
            log.show_error(err)
            status.update("[red]failed[/red]: see above")
        self.app.post_message(PollNow(self.node))
