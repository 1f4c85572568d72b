"""Install or upgrade the agent on a node (B06, B71, B178): a backend, a live step log, then
the result.

The dialog first asks for the backend, as `rbee nodes install NODE --backend cpu|cuda`
does: cpu, or cuda (llama.cpp built with CUDA on the node, which needs nvcc there). The
node's last poll picks the default: cuda when it has NVIDIA GPUs. The install itself is the
CLI's operation (`ops.nodes.install`), which also keeps the node's key in the registry; this
screen only shows its events.

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

from rbee_agent.protocol import NodeInfo, RbeeError
from rbee_tui.config import Config, Node
from rbee_tui.events import Finished
from rbee_tui.ops import nodes as node_ops
from rbee_tui.screens.base import RbeeModal
from rbee_tui.widgets.event_log import EventLog, describe_error

BACKEND_HINTS = {
    "cpu": "cpu: llama.cpp as the wheel ships it (minutes at most)",
    "cuda": "cuda: llama.cpp built with CUDA on the node: needs nvcc there; several minutes",
}


def gpu_summary(name: str, info: NodeInfo | None) -> str:
    """What the last poll said about the node's GPUs, to choose the backend by."""
    if info is None:
        return f"{name} has not answered a poll: rbee does not know its GPUs."
    if not info.gpus:
        return f"{name} has no NVIDIA GPU that the agent can see."
    cards = ", ".join(sorted({g.name for g in info.gpus}))
    offload = {True: "its llama.cpp already offloads to them",
               False: "its llama.cpp is CPU-only: choose cuda to use them",
               None: "its agent does not say whether llama.cpp can use them"}[info.gpu_offload]
    return f"{name} has {len(info.gpus)} NVIDIA GPU(s) ({cards}); {offload}."


class InstallScreen(RbeeModal[Node | None]):
    BINDINGS = [Binding("escape", "close", "Close", id="install.close",
                        tooltip="Close (an install in progress is stopped)")]

    def __init__(self, config: Config, node: Node, info: NodeInfo | None = None) -> None:
        super().__init__()
        self.config = config
        self.node = node
        self.info = info
        self.result: Node | None = None

    @property
    def suggested_backend(self) -> str:
        return "cuda" if self.info is not None and self.info.gpus else "cpu"

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog install"):
            yield Label(f"Install the rbee agent on {self.node.name}", classes="question",
                        id="install-title")
            with Vertical(id="install-choice"):
                yield Label(gpu_summary(self.node.name, self.info), classes="hint")
                for hint in BACKEND_HINTS.values():
                    yield Label(f"  {hint}", classes="hint")
                with Horizontal(classes="buttons"):
                    for backend in BACKEND_HINTS:
                        yield Button(f"Install · {backend}", id=f"install-{backend}",
                                     variant="primary" if backend == self.suggested_backend
                                     else "default")
                    yield Button("Cancel", id="install-cancel")
            yield Static("", id="install-status")
            yield EventLog(id="install-log", max_lines=2000)
            with Horizontal(classes="buttons", id="install-done"):
                yield Button("Close", id="install-close")

    def on_mount(self) -> None:
        for part in ("#install-status", "#install-log", "#install-done"):
            self.query_one(part).display = False
        self.query_one(".dialog").add_class("-choosing")  # as tall as the choice needs
        self.query_one(f"#install-{self.suggested_backend}", Button).focus()

    @on(Button.Pressed, "#install-cpu,#install-cuda")
    def _chosen(self, event: Button.Pressed) -> None:
        backend = (event.button.id or "").removeprefix("install-")
        self.query_one("#install-choice").display = False
        self.query_one(".dialog").remove_class("-choosing")
        self.query_one("#install-log").display = True
        self.query_one("#install-done").display = True
        self.query_one("#install-title", Label).update(
            f"Installing the rbee agent on {self.node.name} ({backend})")
        self.install(backend)

    @work(exclusive=True, group="install", exit_on_error=False)
    async def install(self, backend: str) -> None:
        log = self.query_one("#install-log", EventLog)
        status = self.query_one("#install-status", Static)
        try:
            async for event in node_ops.install(self.config, self.node, backend=backend):
                log.show(event)
                if isinstance(event, Finished):
                    status.update(f"[green]✓ {event.message}[/green]")
                    self.result = self.config.nodes.get(self.node.name)
        except RbeeError as err:
            log.show_error(err)
            status.update(describe_error(err))
        status.display = True
        self.query_one("#install-close", Button).focus()

    @on(Button.Pressed, "#install-close,#install-cancel")
    def action_close(self) -> None:
        self.dismiss(self.result)
