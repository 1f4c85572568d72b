"""The dashboard (B70): nodes table, the selected node's detail and workers, live."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Footer, Header, Input, Label

from rbee_tui.messages import NodePolled
from rbee_tui.node_source import NodeSnapshot
from rbee_tui.screens.base import RbeeScreen
from rbee_tui.widgets.node_detail import NodeDetail
from rbee_tui.widgets.tables import NodesTable, WorkersTable

if TYPE_CHECKING:
    from rbee_tui.app import RbeeApp


class DashboardScreen(RbeeScreen[None]):
    BINDINGS = [
        Binding("c,enter", "app.chat", "Chat", id="dashboard.chat",
                tooltip="Chat with a model on the selected node"),
        Binding("a", "app.add_node", "Add node", id="dashboard.add",
                tooltip="Add a node: SSH is tested before it is saved"),
        Binding("e", "app.edit_node", "Edit", id="dashboard.edit",
                tooltip="Edit the selected node"),
        Binding("d", "app.delete_node", "Delete", id="dashboard.delete",
                tooltip="Remove the selected node from the registry (asks first)"),
        Binding("i", "app.install_agent", "Install", id="dashboard.install",
                tooltip="Install or upgrade the agent on the selected node over SSH"),
        Binding("s", "app.toggle_agent", "Start/stop", id="dashboard.agent",
                tooltip="Start the agent if it is down, stop it if it is up"),
        Binding("m", "app.models", "Models", id="dashboard.models",
                tooltip="The selected node's model catalog"),
        Binding("w", "app.spawn_worker", "Spawn", id="dashboard.spawn",
                tooltip="Start a worker on the selected node"),
        Binding("x", "stop_worker", "Stop worker", id="dashboard.stop_worker",
                tooltip="Stop the worker selected in the workers table"),
        Binding("l", "app.logs", "Logs", id="dashboard.logs",
                tooltip="The selected node's agent and worker logs, live"),
        Binding("slash", "filter", "Filter", id="dashboard.filter",
                tooltip="Show only nodes whose name contains some text"),
        Binding("j", "cursor_down", "Down", show=False, id="dashboard.down",
                tooltip="Next row"),
        Binding("k", "cursor_up", "Up", show=False, id="dashboard.up",
                tooltip="Previous row"),
        Binding("g", "cursor_top", "Top", show=False, id="dashboard.top",
                tooltip="First row"),
        Binding("G", "cursor_bottom", "Bottom", show=False, id="dashboard.bottom",
                tooltip="Last row"),
        Binding("tab", "switch_table", "Nodes/workers", show=False, id="dashboard.tab",
                tooltip="Move between the nodes table and the workers table"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.filter_text = ""
        # What the detail pane and the workers title show now: a label or Static update lays
        # out the whole screen, so they are redrawn only when the selected node's data moved.
        self._detail_shown: tuple[str | None, NodeSnapshot | None] | None = None
        self._workers_title = ""

    @property
    def rbee(self) -> RbeeApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Input(placeholder="filter nodes…", id="filter")
        yield NodesTable(id="nodes")
        with Horizontal(id="lower"):
            yield NodeDetail(id="detail")
            with Vertical(id="workers-pane"):
                yield Label("Workers", id="workers-title")
                yield WorkersTable(id="workers")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#filter", Input).display = False
        self.query_one(NodesTable).focus()
        self.refresh_view()

    @on(NodePolled)
    def _polled(self, event: NodePolled) -> None:
        # One node changed: update its row alone (a full refresh rebuilds every row, which
        # made a poll round cost O(nodes²)); a node without a row takes the full refresh.
        name = event.snapshot.name
        table = self.query_one(NodesTable)
        if self.filter_text not in name or name not in table.rows:
            self.refresh_view()
            return
        with self.app.batch_update():
            table.show_one(self.rbee.snapshot(name), self.rbee.rates)
            self.refresh_detail()
        self._count_up()

    @on(DataTable.RowHighlighted, "#nodes")
    def _node_highlighted(self, _: DataTable.RowHighlighted) -> None:
        self.refresh_detail()

    def selected_node(self) -> str | None:
        return self.query_one(NodesTable).selected_key()

    def visible(self) -> list[NodeSnapshot]:
        snaps = [self.rbee.snapshot(name) for name in self.rbee.config.names()]
        return [s for s in snaps if self.filter_text in s.name]

    def refresh_view(self) -> None:
        with self.app.batch_update():
            self.query_one(NodesTable).show(self.visible(), self.rbee.rates)
            self.refresh_detail()
        self._count_up()

    def _count_up(self) -> None:
        names = self.rbee.config.names()
        up = sum(1 for n in names if self.rbee.snapshot(n).status == "up")
        self.sub_title = f"{up}/{len(names)} nodes up"

    def refresh_detail(self) -> None:
        name = self.selected_node()
        snapshot = self.rbee.snapshot(name) if name else None
        polled = self.rbee.snapshots.get(name) if name else None
        shown = self._detail_shown
        if shown is None or shown[0] != name or shown[1] is not polled:
            self._detail_shown = (name, polled)
            self.query_one(NodeDetail).show(snapshot, self.rbee.history.get(name or "", ()))
        workers = snapshot.workers if snapshot else ()
        self.query_one(WorkersTable).show(workers, time.time())
        title = f"Workers on {name}" if name else "Workers"
        if title != self._workers_title:
            self._workers_title = title
            self.query_one("#workers-title", Label).update(title)

    # ------------------------------------------------------------------ actions

    def _table(self) -> DataTable[object]:
        focused = self.focused
        if isinstance(focused, DataTable):
            return focused
        return self.query_one(NodesTable)

    def action_cursor_down(self) -> None:
        self._table().action_cursor_down()

    def action_cursor_up(self) -> None:
        self._table().action_cursor_up()

    def action_cursor_top(self) -> None:
        self._table().move_cursor(row=0)

    def action_cursor_bottom(self) -> None:
        table = self._table()
        table.move_cursor(row=max(0, table.row_count - 1))

    def action_switch_table(self) -> None:
        nodes, workers = self.query_one(NodesTable), self.query_one(WorkersTable)
        (workers if nodes.has_focus else nodes).focus()

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.display = True
        box.focus()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value.strip()
        self.refresh_view()

    @on(Input.Submitted, "#filter")
    def _filter_done(self, _: Input.Submitted) -> None:
        box = self.query_one("#filter", Input)
        if not box.value:
            box.display = False
        self.query_one(NodesTable).focus()

    def action_stop_worker(self) -> None:
        node = self.selected_node()
        worker = self.query_one(WorkersTable).selected_key()
        if node is None or worker is None:
            self.notify("Select a worker first (tab moves to the workers table).",
                        severity="warning")
            return
        self.rbee.stop_worker(node, worker)
