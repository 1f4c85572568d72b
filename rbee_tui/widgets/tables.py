"""The dashboard's live tables, updated by stable key so nothing flickers (B70).

Rows are keyed by node name or worker id: stale keys are removed, changed cells updated one
by one, new rows added; the cursor stays on the same key across refreshes (dolphie's way).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.text import Text
from textual.cache import LRUCache
from textual.widgets import DataTable

from rbee_agent.protocol import GpuInfo, WorkerInfo
from rbee_tui.node_source import NodeSnapshot

Cell = str | Text

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


def status_cell(snapshot: NodeSnapshot) -> Text:
    if snapshot.status == "up":
        return Text("● up", style="bold green")
    if snapshot.status == "down":
        return Text("● down", style="bold red")
    return Text("○ …", style="dim")


def vram_cell(gpus: Sequence[GpuInfo]) -> Text:
    if not gpus:
        return Text("no GPU", style="dim")
    parts: list[Text] = []
    for gpu in gpus:
        used, total = gpu.vram_used_mb or 0, gpu.vram_total_mb or 0
        parts.append(Text.assemble(bar(used, total, 4), f"{gb(used)}/{gb(total)}"))
    return Text(" ").join(parts)


class KeyedTable(DataTable[Cell]):
    """A DataTable that syncs to a list of (key, cells) rows."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name, size in RENDER_CACHE_SIZES.items():
            cache = getattr(self, name, None)
            if isinstance(cache, LRUCache):
                cache.maxsize = min(cache.maxsize, size)

    def sync(self, rows: Sequence[tuple[str, Sequence[Cell]]]) -> None:
        keys = [key for key, _ in rows]
        selected = self.selected_key()
        for stale in [k for k in self.rows if k.value not in keys]:
            self.remove_row(stale)
        for key, cells in rows:
            if key in self.rows:
                self.update_row(key, cells)
            else:
                self.add_row(*cells, key=key)
        if selected in keys:
            self.move_cursor(row=self.get_row_index(selected))

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


class NodesTable(KeyedTable):
    COLUMNS = ("NODE", "STATUS", "AGENT", "CPU", "RAM GB", "VRAM", "WORKERS", "TOK/S", "NOTE")

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.zebra_stripes = True
        for column in self.COLUMNS:
            self.add_column(column, key=column)

    def show(self, snapshots: Sequence[NodeSnapshot], rates: dict[str, float]) -> None:
        self.sync([(s.name, self.cells(s, rates)) for s in snapshots])

    def show_one(self, snapshot: NodeSnapshot, rates: dict[str, float]) -> bool:
        """Update one node's row in place; False when it has no row (then use `show`)."""
        if snapshot.name not in self.rows:
            return False
        self.update_row(snapshot.name, self.cells(snapshot, rates))
        return True

    @staticmethod
    def cells(s: NodeSnapshot, rates: dict[str, float]) -> list[Cell]:
        info = s.info
        if info is None:
            reason = s.reason or ""
            short = reason if len(reason) <= 40 else reason[:39] + "…"
            return [s.name, status_cell(s), s.agent_version or "-", "-", "-", "-", "-", "-",
                    Text(short, style="red")]
        used = info.ram_total_mb - info.ram_available_mb
        return [
            s.name, status_cell(s), s.agent_version or "-", f"{info.cpu_percent:.0f}%",
            Text.assemble(bar(used, info.ram_total_mb, 6),
                          f" {gb(used)}/{gb(info.ram_total_mb)}"),
            vram_cell(info.gpus), str(len(s.workers)),
            f"{rates.get(s.name, 0.0):.1f}", "",
        ]


class WorkersTable(KeyedTable):
    COLUMNS = ("ID", "MODEL", "DEVICE", "STATE", "SLOTS", "TOKENS", "RSS/VRAM MB", "IDLE")

    def on_mount(self) -> None:
        self.cursor_type = "row"
        for column in self.COLUMNS:
            self.add_column(column, key=column)

    def show(self, workers: Sequence[WorkerInfo], now: float) -> None:
        rows: list[tuple[str, Sequence[Cell]]] = []
        for w in workers:
            state_style = {"idle": "green", "busy": "yellow", "loading": "cyan",
                           "failed": "red"}.get(w.state, "dim")
            loading = (f" {w.layers_loaded}/{w.layers_total}" if w.state == "loading" else "")
            memory = f"{w.rss_mb or '-'}/{w.vram_mb or '-'}"
            idle = "-" if w.active_requests else f"{max(0, now - w.last_activity):.0f}s"
            rows.append((w.id, [w.id, w.model_id, f"{w.backend}:{w.device}",
                                Text(w.state + loading, style=state_style),
                                f"{w.slots_total - w.slots_available}/{w.slots_total}",
                                str(w.tokens_served), memory, idle]))
        self.sync(rows)
