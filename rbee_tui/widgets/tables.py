"""The dashboard's live tables, updated by stable key so nothing flickers (B70, lesson 6).

Rows are keyed by node name or worker id: stale keys are removed, changed cells updated one
by one, new rows added; the cursor stays on the same key across refreshes (dolphie's way).
Every table can be filtered (`/`, B168): rows whose cells do not contain the text are hidden
until the filter is cleared.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual.cache import LRUCache
from textual.widgets import DataTable

from rbee_agent.protocol import GpuInfo, RpcServerInfo, WorkerInfo
from rbee_tui.node_source import NodeSnapshot
from rbee_tui.ops.workers import layers_on_gpu

Cell = str | Text
Row = tuple[str, Sequence[Cell]]

# Textual's DataTable keeps LRU caches of rendered cells (10,000), rows and lines (1,000 each)
# keyed by a counter that every `update_cell` bumps, so a table updated on every poll fills
# them with stale renders: ~13 MB per table at the bound (bench/tui.py). A screenful or two
# is all a repaint between updates can use.
RENDER_CACHE_SIZES = {"_cell_render_cache": 1000, "_row_render_cache": 200, "_line_cache": 200}


def bar(used: float, total: float, width: int = 10) -> Text:
    """A load bar coloured by threshold, as nvitop colours memory."""
    frac = 0.0 if total <= 0 else max(0.0, min(1.0, used / total))
    filled = round(frac * width)
    style = "green" if frac < 0.6 else "yellow" if frac < 0.85 else "red"
    return Text.assemble(("█" * filled, style), ("░" * (width - filled), "dim"))


def gb(mb: float | None) -> str:
    return "-" if mb is None else f"{mb / 1024:.1f}"


def status_cell(snapshot: NodeSnapshot, activity: str | None = None) -> Text:
    if activity:
        return Text("◌ " + activity.split()[0], style="bold cyan")
    if snapshot.status == "up":
        return Text("● up", style="bold green")
    if snapshot.status == "down":
        return Text("● down", style="bold red")
    return Text("○ …", style="dim")


def vram_cell(gpus: Sequence[GpuInfo]) -> Text:
    """All GPUs of the node together (the detail pane has each one)."""
    if not gpus:
        return Text("no GPU", style="dim")
    used = sum(g.vram_used_mb or 0 for g in gpus)
    total = sum(g.vram_total_mb or 0 for g in gpus)
    return Text.assemble(bar(used, total, 6), f" {gb(used)}/{gb(total)}")


def gpu_util_cell(gpus: Sequence[GpuInfo]) -> str:
    """'2× 65%': how many GPUs, and their mean utilisation."""
    readings = [g.utilization_percent for g in gpus if g.utilization_percent is not None]
    if not gpus:
        return "-"
    mean = f"{sum(readings) / len(readings):.0f}%" if readings else "-"
    return f"{len(gpus)}× {mean}"


def _text(cell: Cell) -> str:
    return cell.plain if isinstance(cell, Text) else cell


class KeyedTable(DataTable[Cell]):
    """A DataTable that syncs to a list of (key, cells) rows, with an optional filter."""

    COLUMNS: tuple[str, ...] = ()
    FILTERED: tuple[str, ...] = ()  # the columns `/` looks in (all when empty): words, not gauges

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name, size in RENDER_CACHE_SIZES.items():
            cache = getattr(self, name, None)
            if isinstance(cache, LRUCache):
                cache.maxsize = min(cache.maxsize, size)
        self.filter_text = ""
        self._rows: list[Row] = []

    def on_mount(self) -> None:
        self.cursor_type = "row"
        for column in self.COLUMNS:
            self.add_column(column, key=column)

    def matches(self, row: Row) -> bool:
        wanted = self.filter_text.lower()
        if not wanted:
            return True
        cells = [c for name, c in zip(self.COLUMNS, row[1], strict=False)
                 if not self.FILTERED or name in self.FILTERED]
        return any(wanted in _text(c).lower() for c in (row[0], *cells))

    def set_filter(self, text: str) -> None:
        if text != self.filter_text:
            self.filter_text = text
            self.sync(self._rows)

    def sync(self, rows: Sequence[Row]) -> None:
        self._rows = list(rows)
        shown = [row for row in self._rows if self.matches(row)]
        keys = [key for key, _ in shown]
        selected = self.selected_key()
        before = len(self.rows)
        stale = [k for k in self.rows if k.value not in keys]
        for row in stale:
            self.remove_row(row)
        for key, cells in shown:
            if key in self.rows:
                self.update_row(key, cells)
            else:
                self.add_row(*cells, key=key)
        if stale or len(self.rows) != before:
            # Rows came or went, so column widths may change once Textual measures them;
            # a header rendered before that stays cached at its old width (drawn the same,
            # but split differently), so the renders are dropped after the next refresh.
            self.call_after_refresh(self._clear_caches)
        if [k.value for k in self.rows] != keys:  # rows came back: keep the given order
            self.clear()
            for key, cells in shown:
                self.add_row(*cells, key=key)
        if selected in keys:
            self.move_cursor(row=self.get_row_index(selected))

    def sync_one(self, key: str, cells: Sequence[Cell]) -> bool:
        """Update one existing row in place; False when it is not shown (then `sync`)."""
        for i, (row_key, _) in enumerate(self._rows):
            if row_key == key:
                self._rows[i] = (key, cells)
                break
        else:
            return False
        if key not in self.rows or not self.matches((key, cells)):
            return False
        self.update_row(key, cells)
        return True

    def update_row(self, key: str, cells: Sequence[Cell]) -> None:
        """Update the changed cells of an existing row (each update repaints the table)."""
        for column, value in zip(list(self.columns), cells, strict=True):
            if self.get_cell(key, column) != value:
                self.update_cell(key, column, value, update_width=True)

    def selected_key(self) -> str | None:
        if not self.row_count:
            return None
        try:
            key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key
        except Exception:  # cursor outside the rows while they change
            return None
        return key.value

    def select_key(self, key: str) -> bool:
        if key not in self.rows:
            return False
        self.move_cursor(row=self.get_row_index(key))
        return True


class NodesTable(KeyedTable):
    COLUMNS = ("NODE", "STATUS", "AGENT", "CPU", "RAM GB", "VRAM GB", "GPUS", "WORKERS",
               "TOK/S", "NOTE")
    FILTERED = ("NODE", "STATUS", "AGENT", "NOTE")

    def on_mount(self) -> None:
        self.zebra_stripes = True

    @staticmethod
    def cells(s: NodeSnapshot, rate: float, note: str, activity: str | None = None
              ) -> list[Cell]:
        info = s.info
        note_cell = Text(note, style="cyan" if activity else "red" if s.status == "down"
                         else "yellow")
        if info is None:
            return [s.name, status_cell(s, activity), s.agent_version or "-", "-", "-", "-",
                    "-", "-", "-", note_cell]
        used = info.ram_total_mb - info.ram_available_mb
        busy = sum(1 for w in s.workers if w.state == "busy")
        workers = f"{len(s.workers)}" + (f" · {busy} busy" if busy else "")
        if info.rpc_servers:  # serving another node's split worker (B212)
            workers += f" · {len(info.rpc_servers)} rpc"
        return [
            s.name, status_cell(s, activity), s.agent_version or "-",
            f"{info.cpu_percent:.0f}%",
            Text.assemble(bar(used, info.ram_total_mb, 6),
                          f" {gb(used)}/{gb(info.ram_total_mb)}"),
            vram_cell(info.gpus), gpu_util_cell(info.gpus), workers, f"{rate:.1f}", note_cell,
        ]


STATE_STYLES = {"idle": "green", "busy": "yellow", "loading": "cyan", "failed": "red"}


def split_of(worker: WorkerInfo, head: str) -> str:
    """"split: localhost 15, peer 15": a split worker's layers per node (B212)."""
    return "split: " + ", ".join(f"{p.node or head} {p.layers}" for p in worker.split)


@dataclass(frozen=True)
class RpcRow:
    """An RPC server on this node, and the split worker it serves when one names this node
    (seen on the head node's row of the dashboard), so a peer shows what uses it (B212)."""

    server: RpcServerInfo
    node: str
    head: str | None = None
    worker: WorkerInfo | None = None

    def cells(self) -> list[Cell]:
        s, w = self.server, self.worker
        layers = next((p.layers for p in w.split if p.node == self.node), 0) if w else 0
        serves = (f"rpc {s.device} for {self.head}/{w.id} ({layers} layers)" if w and self.head
                  else f"rpc {s.device}, no split worker seen")
        state = s.state if s.state != "ready" else "serving" if s.clients else "ready"
        return [s.id, w.model_id if w else "-", Text(state, style=RPC_STYLES.get(state, "dim")),
                "-", "-", "-", serves, "-", "-", "-", "-", "-"]


RPC_STYLES = {"serving": "yellow", "ready": "green", "starting": "cyan", "failed": "red"}


def device_of(worker: WorkerInfo, head: str = "") -> str:
    if worker.split:
        return split_of(worker, head)
    if worker.backend == "cpu":
        return "cpu"
    devices = worker.devices or [worker.device]
    return f"{worker.backend}:{','.join(map(str, devices))}"


class WorkersTable(KeyedTable):
    COLUMNS = ("ID", "MODEL", "STATE", "TOK/S", "SLOTS FREE", "QUEUE", "DEVICE", "VRAM MB",
               "RSS MB", "GPU LAYERS", "TOKENS", "IDLE")
    FILTERED = ("ID", "MODEL", "STATE", "DEVICE")

    def show(self, workers: Sequence[WorkerInfo], rates: Mapping[str, float],
             now: float, node: str = "", rpc: Sequence[RpcRow] = ()) -> None:
        self.sync([*((w.id, self.cells(w, rates.get(w.id), now, node)) for w in workers),
                   *((r.server.id, r.cells()) for r in rpc)])

    @staticmethod
    def cells(w: WorkerInfo, rate: float | None, now: float, node: str = "") -> list[Cell]:
        loading = f" {w.layers_loaded}/{w.layers_total}" if w.state == "loading" else ""
        busy = w.active_requests or w.state == "busy"
        idle = "-" if busy else f"{max(0, now - w.last_activity):.0f}s"
        return [w.id, w.model_id, Text(w.state + loading, style=STATE_STYLES.get(w.state, "dim")),
                "-" if rate is None else f"{rate:.1f}", f"{w.slots_available}/{w.slots_total}",
                str(w.queued), device_of(w, node), "-" if w.vram_mb is None else str(w.vram_mb),
                "-" if w.rss_mb is None else str(w.rss_mb), layers_on_gpu(w),
                str(w.tokens_served), idle]
