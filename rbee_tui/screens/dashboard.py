"""The dashboard (B70): nodes, the selected node's workers, its detail and history, live.

It subscribes to `Fleet.changed` and redraws only what a frame's update touched: the rows
of the nodes that changed, and the lower panes when the selected node is one of them.
Layout follows the terminal: at 80 columns the graphs give way to the detail pane; at 160
and more they sit in two columns and take every spare row (B164).
"""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import DataTable, Footer, Input, Static

from rbee_agent.protocol import WorkerInfo
from rbee_tui.fleet import Fleet, FleetUpdate
from rbee_tui.messages import OpenChat, PollNow
from rbee_tui.node_source import NodeSnapshot
from rbee_tui.node_stats import NodeStats
from rbee_tui.screens.base import ESSENTIAL, RbeeScreen
from rbee_tui.screens.modals import ConfirmScreen
from rbee_tui.widgets.graphs import HistoryGraph, ScaledGraph
from rbee_tui.widgets.node_detail import node_text
from rbee_tui.widgets.notes import note_for
from rbee_tui.widgets.tables import Cell, KeyedTable, NodesTable, RpcRow, WorkersTable
from rbee_tui.widgets.top_bar import TopBar

MB_PER_GB = 1024.0


def graphs_for(stats: NodeStats) -> list[ScaledGraph]:
    """RAM, then per GPU its VRAM and utilisation, each on a 0..capacity scale."""
    graphs = [ScaledGraph("RAM", tuple(stats.ram_used_mb), stats.ram_total_mb, "GB",
                          MB_PER_GB)]
    for index, gpu in sorted(stats.gpus.items()):
        graphs.append(ScaledGraph(f"GPU{index} VRAM", tuple(gpu.vram_used_mb),
                                  gpu.vram_total_mb, "GB", MB_PER_GB, style="magenta"))
        graphs.append(ScaledGraph(f"GPU{index} util", tuple(gpu.utilization_percent), 100.0,
                                  "%", digits=0, style="cyan"))
    return graphs


class DashboardScreen(RbeeScreen[None]):
    BINDINGS = [
        *ESSENTIAL,
        Binding("q", "app.quit", "Quit", id="app.quit",
                tooltip="Leave rbee (agents keep running)"),
        Binding("c,enter", "app.chat", "Chat", id="dashboard.chat",
                tooltip="Chat on the selected node (Enter on a worker: with its model)"),
        Binding("slash", "filter", "Filter", id="dashboard.filter",
                tooltip="Filter the focused table (nodes or workers); esc clears it"),
        Binding("a", "app.add_node", "Add node", id="dashboard.add",
                tooltip="Add a node: SSH is tested before it is saved"),
        Binding("e", "app.edit_node", "Edit", show=False, id="dashboard.edit",
                tooltip="Edit the selected node"),
        Binding("d", "app.delete_node", "Delete", show=False, id="dashboard.delete",
                tooltip="Remove the selected node from the registry (asks first)"),
        Binding("i", "app.install_agent", "Install", show=False, id="dashboard.install",
                tooltip="Install or upgrade the agent on the selected node over SSH"),
        Binding("s", "app.toggle_agent", "Start/stop", show=False, id="dashboard.agent",
                tooltip="Start the agent if it is down; stop it if it is up (asks first, "
                        "saying which workers stop with it)"),
        Binding("m", "app.models", "Models", id="dashboard.models",
                tooltip="The selected node's model catalog"),
        Binding("w", "app.spawn_worker", "Spawn", show=False, id="dashboard.spawn",
                tooltip="Start a worker on the selected node"),
        Binding("x", "stop_worker", "Stop worker", show=False, id="dashboard.stop_worker",
                tooltip="Stop the worker selected in the workers table (asks first)"),
        Binding("l", "app.logs", "Logs", id="dashboard.logs",
                tooltip="The selected node's agent and worker logs, live"),
        Binding("escape", "clear_filter", "Clear filter", show=False,
                id="dashboard.clear_filter", tooltip="Clear the table's filter"),
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

    def __init__(self, fleet: Fleet) -> None:
        super().__init__()
        self.fleet = fleet
        # What the lower panes show now: a Static update lays out the whole screen, so they
        # are redrawn only when the selected node's data moved.
        self._shown: tuple[str | None, NodeSnapshot | None, str | None] | None = None

    def compose(self) -> ComposeResult:
        yield TopBar()
        yield Input(id="filter", classes="filter")
        yield NodesTable(id="nodes")
        yield WorkersTable(id="workers")
        with Horizontal(id="lower"):
            with VerticalScroll(id="detail-pane"):
                yield Static(id="detail")
            yield Vertical(id="graphs")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#filter", Input).display = False
        self.query_one(NodesTable).border_title = "Nodes"
        self.query_one("#graphs").border_title = "History · last 5 min"
        self.query_one(NodesTable).focus()
        self.fleet.changed.subscribe(self, self.on_fleet_update)
        self.refresh_view()

    def crumbs(self) -> list[str]:
        name = self.selected_node()
        return [name] if name else []

    # ------------------------------------------------------------------ data

    def on_fleet_update(self, update: FleetUpdate) -> None:
        nodes = self.query_one(NodesTable)
        if update.registry:
            self.refresh_view()
            return
        names = self.fleet.names()
        with self.app.batch_update():
            for name in update.names:
                cells = self.node_cells(name)
                # No row to update: a new node, or one the filter hid that now matches.
                if (not nodes.sync_one(name, cells) and name in names
                        and nodes.matches((name, cells))):
                    self.refresh_view()
                    return
            if self.selected_node() in update.names:
                self.refresh_lower()
            self._status()

    def node_cells(self, name: str) -> list[Cell]:
        snapshot = self.fleet.snapshot(name)
        activity = self.fleet.activity.get(name)
        note = note_for(snapshot, self.fleet.config.node(name).is_local, activity)
        return NodesTable.cells(snapshot, self.fleet.stats_of(name).rate, note, activity)

    def refresh_view(self) -> None:
        with self.app.batch_update():
            self.query_one(NodesTable).sync(
                [(n, self.node_cells(n)) for n in self.fleet.names()])
            self.refresh_lower()
            self._status()

    def _status(self) -> None:
        names = self.fleet.names()
        self.top_bar().status = f"{self.fleet.up_count()}/{len(names)} nodes up"

    @on(DataTable.RowSelected, "#nodes")
    def _node_chosen(self) -> None:
        self.app.post_message(OpenChat(self.selected_node() or "localhost"))

    @on(DataTable.RowSelected, "#workers")
    def _worker_chosen(self) -> None:
        node, worker = self.selected_node(), self.selected_worker()
        if node and worker:
            self.app.post_message(OpenChat(node, worker.model_id))

    @on(DataTable.RowHighlighted, "#nodes")
    def _node_highlighted(self, _: DataTable.RowHighlighted) -> None:
        self.refresh_lower()

    def selected_node(self) -> str | None:
        return self.query_one(NodesTable).selected_key()

    def refresh_lower(self) -> None:
        name = self.selected_node()
        polled = self.fleet.snapshots.get(name) if name else None
        activity = self.fleet.activity.get(name) if name else None
        workers = self.query_one(WorkersTable)
        if self._shown != (name, polled, activity):
            self._shown = (name, polled, activity)
            snapshot = self.fleet.snapshot(name) if name else None
            stats = self.fleet.stats_of(name) if name else None
            note = note_for(snapshot, self.fleet.config.node(name).is_local, activity) if (
                snapshot and name) else ""
            self.query_one("#detail", Static).update(node_text(snapshot, stats, note))
            self.query_one("#detail-pane").border_title = name or "no node"
            workers.border_title = f"Workers on {name}" if name else "Workers"
            self.show_graphs(stats)
            self.show_crumbs()
        snapshot = self.fleet.snapshot(name) if name else None
        rates = self.fleet.stats_of(name).worker_rates if name else {}
        workers.show(snapshot.workers if snapshot else (), rates, self.fleet.clock(),
                     name or "", self.rpc_rows(name) if name else [])

    def rpc_rows(self, name: str) -> list[RpcRow]:
        """The node's RPC servers, each beside the split worker on another node that names
        this node in its split (B212); several are paired in the order they started."""
        info = self.fleet.snapshot(name).info
        servers = sorted(info.rpc_servers if info else [], key=lambda s: s.started_at)
        users = sorted(((head, w) for head in self.fleet.names() if head != name
                        for w in self.fleet.snapshot(head).workers
                        if any(p.node == name for p in w.split)),
                       key=lambda hw: hw[1].started_at)
        return [RpcRow(server, name, *(users[i] if i < len(users) else (None, None)))
                for i, server in enumerate(servers)]

    def show_graphs(self, stats: NodeStats | None) -> None:
        graphs = graphs_for(stats) if stats and stats.ram_total_mb else []
        box = self.query_one("#graphs", Vertical)
        widgets = list(box.query(HistoryGraph))
        missing = len(graphs) - len(widgets)
        if missing > 0:
            new = [HistoryGraph() for _ in range(missing)]
            box.mount_all(new)
            widgets.extend(new)
        for i, (widget, graph) in enumerate(
                zip(widgets, [*graphs, *[None] * len(widgets)], strict=False)):
            widget.display = graph is not None
            widget.set_class(i == 0, "-first")  # RAM spans both columns of a wide grid
            widget.show(graph)
        box.set_class(len(graphs) > 3, "-many")

    # ------------------------------------------------------------------ actions

    def _table(self) -> KeyedTable:
        focused = self.focused
        if isinstance(focused, KeyedTable):
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

    def focus_table(self, which: str) -> None:
        """`:nodes` / `:workers`: put the cursor in that table."""
        table = self.query_one(WorkersTable if which == "workers" else NodesTable)
        table.focus()

    def action_clear_filter(self) -> None:
        self.clear_filter()

    def filter_applied(self, table: KeyedTable) -> None:
        if isinstance(table, NodesTable):
            self.refresh_lower()

    def selected_worker(self) -> WorkerInfo | None:
        node, key = self.selected_node(), self.query_one(WorkersTable).selected_key()
        if node is None or key is None:
            return None
        return next((w for w in self.fleet.snapshot(node).workers if w.id == key), None)

    def action_stop_worker(self) -> None:
        node = self.selected_node()
        worker = self.selected_worker()
        key = self.query_one(WorkersTable).selected_key()
        rpc = next((r for r in self.rpc_rows(node) if r.server.id == key), None) if node else None
        if rpc is not None:  # B212: an RPC server lives and ends with its split worker
            where = (f"worker {rpc.worker.id} on {rpc.head}" if rpc.worker and rpc.head
                     else "a split worker on another node")
            self.notify(f"RPC server {rpc.server.id} serves {where}: stop that worker (x on "
                        "its row) and its RPC servers stop with it.", severity="warning")
            return
        if node is None or worker is None:
            self.notify("Select a worker first (tab moves to the workers table).",
                        severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.stop_worker(node, worker.id)

        self.app.push_screen(ConfirmScreen(worker_stop_question(node, worker), yes="Stop"),
                             answered)

    @work(group="workers", exit_on_error=False)
    async def stop_worker(self, node: str, worker_id: str) -> None:
        client = await self.fleet.source.client(node)
        await client.stop_worker(worker_id)
        self.notify(f"Worker {worker_id} on {node} stopped.")
        self.app.post_message(PollNow(node))


def worker_stop_question(node: str, worker: WorkerInfo) -> str:
    """The confirmation for `x`, with what stopping costs (B169)."""
    busy = worker.active_requests or (worker.state == "busy")
    lines = [f"Stop worker {worker.id} ({worker.model_id}) on {node}?"]
    if busy:
        requests = max(1, worker.active_requests)
        queued = f" and {worker.queued} queued" if worker.queued else ""
        lines.append(f"It is busy: {requests} request(s) in progress{queued} will be cut off.")
    else:
        lines.append(f"It is {worker.state}; {worker.model_id} is unloaded and must load "
                     "again for the next request.")
    peers = [p.node for p in worker.split if p.node]
    if peers:
        lines.append(f"It is split over {', '.join(peers)}: the RPC servers there stop "
                     "with it.")
    return "\n".join(lines)
