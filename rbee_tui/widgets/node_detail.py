"""The selected node's detail: RAM/CPU, each GPU (nvitop's fields), a memory sparkline."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Group
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, Sparkline, Static

from rbee_tui.node_source import NodeSnapshot
from rbee_tui.widgets.tables import bar, gb


def describe(snapshot: NodeSnapshot | None) -> Group | Text:
    if snapshot is None:
        return Text("no node selected", style="dim")
    if snapshot.info is None:
        return Text.assemble((f"{snapshot.name}: down\n", "bold red"),
                             (snapshot.reason or "no answer", "red"))
    info = snapshot.info
    used = info.ram_total_mb - info.ram_available_mb
    lines: list[Text] = [
        Text.assemble((info.hostname, "bold"),
                      (f" · {info.os.split('-')[0]} {info.arch} · {info.cpu_count} CPUs",
                       "")),
        Text.assemble("CPU  ", bar(info.cpu_percent, 100, 14), f" {info.cpu_percent:.0f}%"),
        Text.assemble("RAM  ", bar(used, info.ram_total_mb, 14),
                      f" {gb(used)}/{gb(info.ram_total_mb)} GB"),
        Text(f"disk {gb(info.disk_free_mb)} GB free · {', '.join(info.backends)}",
             style="dim"),
    ]
    for gpu in info.gpus:
        vram_used, vram_total = gpu.vram_used_mb or 0, gpu.vram_total_mb or 0
        extras = [f"{gpu.utilization_percent}% util" if gpu.utilization_percent is not None
                  else "", f"{gpu.temperature_c}°C" if gpu.temperature_c is not None else "",
                  f"{gpu.power_w:.0f} W" if gpu.power_w is not None else ""]
        lines.append(Text(f"GPU{gpu.index} {gpu.name}", style="bold"))
        lines.append(Text.assemble("VRAM ", bar(vram_used, vram_total, 14),
                                   f" {gb(vram_used)}/{gb(vram_total)} GB"))
        lines.append(Text("     " + " · ".join(e for e in extras if e), style="dim"))
    if not info.gpus:
        lines.append(Text("no GPU: history shows RAM", style="dim"))
    return Group(*lines)


class NodeDetail(Vertical):
    def compose(self) -> ComposeResult:
        yield Static(id="detail-text")
        yield Label("memory history", id="history-label")
        yield Sparkline([], id="history")

    def show(self, snapshot: NodeSnapshot | None, history: Sequence[float]) -> None:
        self.query_one("#detail-text", Static).update(describe(snapshot))
        gpu = bool(snapshot and snapshot.info and snapshot.info.gpus)
        self.query_one("#history-label", Label).update(
            "VRAM used (GB), last minutes" if gpu else "RAM used (GB), last minutes")
        sparkline = self.query_one("#history", Sparkline)
        values = list(history)
        if sparkline.data != values:
            sparkline.data = values
