"""The gateway panel (B195, B196): the OpenAI endpoint for every node, inside the dashboard.

It shows where the gateway listens, its key (masked; `y` copies it, `v` shows it), requests
per second and each node's share of them, and it starts or stops the gateway in the
dashboard's own process (`s`), with the dashboard's SSH forwards and the key file of `rbee
serve`. A port that is taken, or a missing web server, is said here in words, with what to
do. What the panel shows comes from a `GatewayControl` (rbee_gateway/inprocess.py), read
once a second while the panel is open.
"""

from __future__ import annotations

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Footer, Static

from rbee_agent.protocol import RbeeError
from rbee_gateway.inprocess import RATE_WINDOW_S, GatewayControl, GatewayStatus, NodeTraffic
from rbee_tui.screens.base import ESSENTIAL, RbeeScreen, error_text
from rbee_tui.widgets.tables import Cell, KeyedTable
from rbee_tui.widgets.top_bar import TopBar

LABEL_WIDTH = 10
SHARE_WIDTH = 10


def masked(key: str) -> str:
    """Enough of the key to tell it from another, not enough to use it."""
    return key[:4] + "•" * 12 + key[-4:] if len(key) > 12 else "•" * len(key)


def state_cell(node: NodeTraffic) -> Text:
    if node.up:
        return Text("● up", style="bold green")
    if node.up is False:
        return Text("● down", style="bold red")
    return Text("○ not asked yet", style="dim")


def share_cell(share: float) -> Text:
    """A node's part of the requests: one colour, since a big share is not a warning."""
    filled = round(share * SHARE_WIDTH)
    return Text.assemble(("█" * filled, "cyan"), ("░" * (SHARE_WIDTH - filled), "dim"),
                         f" {share:.0%}")


class GatewayNodesTable(KeyedTable):
    COLUMNS = ("NODE", "STATE", "REQUESTS", "SHARE", "IN FLIGHT", "NOTE")
    FILTERED = ("NODE", "STATE", "NOTE")

    def on_mount(self) -> None:  # after KeyedTable's (Textual calls each class's handler)
        self.show_cursor = False  # nothing to do with a row: a cursor would hide its bar

    @staticmethod
    def cells(status: GatewayStatus, node: NodeTraffic) -> list[Cell]:
        share = status.share(node)
        return [node.name, state_cell(node), str(node.requests),
                share_cell(share), str(node.in_flight),
                Text(node.problem or "", style="red")]


def facts(status: GatewayStatus, reveal: bool) -> Text:
    """The panel's head: running or not, URL, key, key file, traffic."""
    text = Text()

    def row(label: str, *parts: str | tuple[str, str]) -> None:
        text.append(f"\n{label:<{LABEL_WIDTH}}", style="dim")
        text.append_text(Text.assemble(*parts))

    where = ("this machine only" if status.host in ("127.0.0.1", "::1", "localhost")
             else "the network: anyone who can reach it and has the key can use every node")
    if status.running:
        text.append("● running", style="bold green")
        text.append(f" · listening on {status.host} ({where})")
    else:
        text.append("○ stopped", style="bold")
        text.append(" · s starts it here, as `rbee serve` would", style="dim")
    row("URL", status.url, ("" if status.running else "  (when started)", "dim"))
    if status.key is None:
        row("API key", ("cannot be read", "red"))
    else:
        row("API key", status.key if reveal else masked(status.key),
            ("   y copies it · v " + ("hides" if reveal else "shows") + " it", "dim"))
    row("Key file", str(status.key_file))
    if status.running:
        row("Traffic", f"{status.requests_per_s:.1f} requests/s",
            (f" (last {RATE_WINDOW_S:g} s)", "dim"),
            f" · {status.requests} requests since it started")
    else:
        row("Traffic", ("-", "dim"))
    return text


def usage(status: GatewayStatus) -> Text:
    return Text.assemble(
        ("Any OpenAI client: ", "dim"),
        f'OpenAI(base_url="{status.url}", api_key=<the key>)',
        ("\nmodel@node pins a node (", "dim"), "smollm2-135m@localhost",
        ("); GET /v1/models lists every node's models; rbee serve runs the same from a "
         "shell.", "dim"))


class GatewayScreen(RbeeScreen[None]):
    HELP_TITLE = "Gateway"
    DEFAULT_CSS = """
    GatewayScreen #gateway-box {
        height: auto;
        border: round $primary 40%;
        border-title-color: $primary;
        padding: 0 1;
    }
    GatewayScreen #gateway-facts, GatewayScreen #gateway-problem {
        height: auto;
    }
    GatewayScreen #gateway-problem {
        color: $error;
    }
    GatewayScreen #gateway-buttons {
        height: auto;
        margin-top: 1;
    }
    GatewayScreen #gateway-nodes {
        height: auto;
        max-height: 1fr;
        border: round $primary 40%;
        border-title-color: $primary;
    }
    GatewayScreen #gateway-usage {
        height: auto;
        padding: 0 1;
        color: $text-muted;
    }
    """
    BINDINGS = [
        *ESSENTIAL,
        Binding("escape,q", "back", "Back", id="gateway.back",
                tooltip="Back to the dashboard (the gateway keeps running)"),
        Binding("s", "start_stop", "Start/stop", id="gateway.toggle",
                tooltip="Start the gateway in this dashboard (as rbee serve would), or stop "
                        "it (replies still streaming get 5 s to finish)"),
        Binding("y", "copy_key", "Copy key", id="gateway.copy_key",
                tooltip="Copy the gateway's API key to the clipboard"),
        Binding("u", "copy_url", "Copy URL", id="gateway.copy_url",
                tooltip="Copy the base URL for OpenAI clients to the clipboard"),
        Binding("v", "reveal", "Show key", show=False, id="gateway.reveal",
                tooltip="Show or hide the whole key"),
    ]

    def __init__(self, control: GatewayControl) -> None:
        super().__init__()
        self.control = control
        self.reveal = False
        self.toggling = False

    def crumbs(self) -> list[str]:
        return ["gateway"]

    def compose(self) -> ComposeResult:
        yield TopBar()
        with Vertical(id="gateway-box"):
            yield Static(id="gateway-facts")
            yield Static(id="gateway-problem")
            with Horizontal(id="gateway-buttons"):
                yield Button("Start", id="gateway-toggle", variant="primary", compact=True)
        yield GatewayNodesTable(id="gateway-nodes")
        yield Static(id="gateway-usage")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#gateway-box").border_title = "OpenAI gateway · every node, one URL"
        self.query_one(GatewayNodesTable).border_title = "Requests by node"
        self.show_status()
        self.set_interval(1.0, self.show_status)

    def show_status(self) -> None:
        status = self.control.status()
        self.query_one("#gateway-facts", Static).update(facts(status, self.reveal))
        problem = self.query_one("#gateway-problem", Static)
        problem.update(Text(error_text(status.problem)) if status.problem else "")
        problem.display = status.problem is not None
        button = self.query_one("#gateway-toggle", Button)
        button.label = "Stop" if status.running else "Start"
        button.variant = "error" if status.running else "primary"
        button.disabled = self.toggling
        self.query_one(GatewayNodesTable).sync(
            [(n.name, GatewayNodesTable.cells(status, n)) for n in status.nodes])
        self.query_one("#gateway-usage", Static).update(usage(status))
        self.top_bar().status = ("running" if status.running else
                                 "could not start" if status.problem else "stopped")

    # ------------------------------------------------------------------ actions

    @on(Button.Pressed, "#gateway-toggle")
    def _pressed(self) -> None:
        self.action_start_stop()

    def action_start_stop(self) -> None:
        if not self.toggling:
            self._toggle()

    @work(exclusive=True, group="gateway-toggle", exit_on_error=False)
    async def _toggle(self) -> None:
        running = self.control.status().running
        self.toggling = True
        self.top_bar().status = "stopping…" if running else "starting…"
        try:
            if running:
                await self.control.stop()
                self.notify("Gateway stopped.")
            else:
                await self.control.start()
                self.notify(f"Gateway running on {self.control.status().url}")
        except RbeeError:
            pass  # the panel says why (GatewayStatus.problem), where it is being looked at
        finally:
            self.toggling = False
            self.show_status()

    def _copy(self, what: str, text: str) -> None:
        self.app.copy_to_clipboard(text)
        self.notify(f"Copied the gateway's {what} to the clipboard.")

    def action_copy_key(self) -> None:
        key = self.control.status().key
        if key is None:
            self.notify("The gateway's key cannot be read; see the panel.", severity="warning")
            return
        self._copy("API key", key)

    def action_copy_url(self) -> None:
        self._copy("URL", self.control.status().url)

    def action_reveal(self) -> None:
        self.reveal = not self.reveal
        self.show_status()

    def action_back(self) -> None:
        if not self.clear_filter():
            self.app.pop_screen()
