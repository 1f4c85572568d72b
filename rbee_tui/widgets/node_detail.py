"""The selected node's detail (B70, B165, B178): CPU and RAM, each GPU nvitop-style, whether
its llama.cpp can offload to a GPU, or for a node that does not answer the whole message and
hint, wrapped.

Per GPU: a VRAM bar split into each worker's share (then other processes, then free), the
card's utilisation, temperature and power, each with a short history sparkline.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text

from rbee_agent.protocol import GpuInfo, NodeInfo, WorkerInfo
from rbee_tui.node_source import NodeSnapshot
from rbee_tui.node_stats import GpuHistory, NodeStats
from rbee_tui.widgets.graphs import spark
from rbee_tui.widgets.tables import bar, gb

SHARE_STYLES = ("magenta", "cyan", "blue", "bright_magenta", "bright_cyan", "bright_blue")
BAR_WIDTH = 24
SPARK_WIDTH = 6


def worker_shares(gpu: GpuInfo, workers: Sequence[WorkerInfo]) -> list[tuple[str, int]]:
    """(worker id, VRAM MB) of the workers that hold memory on this GPU."""
    shares: list[tuple[str, int]] = []
    for w in workers:
        on_card = gpu.index in (w.devices or [w.device])
        if w.backend != "cpu" and on_card and w.vram_mb:
            shares.append((w.id, w.vram_mb))
    return shares


def vram_bar(gpu: GpuInfo, workers: Sequence[WorkerInfo], width: int = BAR_WIDTH) -> Text:
    """Used VRAM as one bar: each worker's share in its own colour, other use, then free."""
    total = gpu.vram_total_mb or 0
    used = gpu.vram_used_mb or 0
    if total <= 0:
        return Text("░" * width, style="dim")
    cells: list[tuple[str, str]] = []
    shares = worker_shares(gpu, workers)
    for i, (_, mb) in enumerate(shares):
        cells.append(("▇" * round(mb / total * width), SHARE_STYLES[i % len(SHARE_STYLES)]))
    other = max(0, used - sum(mb for _, mb in shares))
    cells.append(("▇" * round(other / total * width), "green"))
    drawn = sum(len(c) for c, _ in cells)
    if drawn > width:  # rounding: trim the last coloured cells
        cells = _trim(cells, width)
        drawn = width
    cells.append(("░" * (width - drawn), "dim"))
    return Text.assemble(*cells)


def _trim(cells: list[tuple[str, str]], width: int) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    left = width
    for chars, style in cells:
        out.append((chars[:left], style))
        left -= len(out[-1][0])
    return out


def _reading(value: float | None, unit: str) -> str:
    return "-" if value is None else f"{value:.0f}{unit}"


def gpu_lines(gpu: GpuInfo, workers: Sequence[WorkerInfo], history: GpuHistory | None
              ) -> list[Text]:
    used, total = gpu.vram_used_mb or 0, gpu.vram_total_mb or 0
    lines = [Text.assemble((f"GPU{gpu.index} ", "bold"), (gpu.name, "bold"))]
    lines.append(Text.assemble(" VRAM ", vram_bar(gpu, workers),
                               f" {gb(used)}/{gb(total)} GB"))
    shares = worker_shares(gpu, workers)
    if shares:
        legend = Text("      ")
        for i, (wid, mb) in enumerate(shares):
            legend.append("▇ ", style=SHARE_STYLES[i % len(SHARE_STYLES)])
            legend.append(f"{wid} {gb(mb)}  ")
        other = max(0, used - sum(mb for _, mb in shares))
        legend.append("▇ ", style="green")
        legend.append(f"other {gb(other)}")
        lines.append(legend)
    readings = Text(" ")
    for label, value, top, series in (
        ("util", _reading(gpu.utilization_percent, "%"), 100.0,
         history.utilization_percent if history else ()),
        ("temp", _reading(gpu.temperature_c, "°C"), 100.0,
         history.temperature_c if history else ()),
        ("power", _reading(gpu.power_w, " W"),
         max([*(history.power_w if history else ()), 1.0]),
         history.power_w if history else ()),
    ):
        readings.append(f"{label} {value} ")
        readings.append(spark(list(series), top, SPARK_WIDTH), style="cyan")
        readings.append("  ")
    lines.append(readings)
    return lines


def _node_lines(s: NodeSnapshot, info: NodeInfo, stats: NodeStats | None) -> list[Text]:
    used = info.ram_total_mb - info.ram_available_mb
    load = f"  load {info.load_average[0]:.2f}" if info.load_average else ""
    lines = [
        Text.assemble((info.hostname, "bold"),
                      f" · {info.os.split('-')[0]} {info.arch} · {info.cpu_count} CPUs"
                      + (f" · agent {s.agent_version}" if s.agent_version else "")),
        Text.assemble("CPU  ", bar(info.cpu_percent, 100, BAR_WIDTH),
                      f" {info.cpu_percent:.0f}%{load}"),
        Text.assemble("RAM  ", bar(used, info.ram_total_mb, BAR_WIDTH),
                      f" {gb(used)}/{gb(info.ram_total_mb)} GB"),
        Text(f"disk {gb(info.disk_free_mb)} GB free · backends {', '.join(info.backends)}",
             style="dim"),
    ]
    for gpu in info.gpus:
        history = stats.gpus.get(gpu.index) if stats else None
        lines.extend(gpu_lines(gpu, s.workers, history))
    if not info.gpus:
        lines.append(Text("no GPU on this node", style="dim"))
    offload = offload_line(s.name, info)
    if offload is not None:
        lines.append(offload)
    return lines


def offload_line(name: str, info: NodeInfo) -> Text | None:
    """B178: whether the node's llama.cpp can put layers on a GPU (`gpu_offload`), and what
    to do when the node has NVIDIA GPUs but a CPU-only build."""
    if info.gpu_offload is None:  # an agent too old to say
        return None
    if info.gpu_offload:
        return Text("llama.cpp offloads to the GPU", style="green")
    if info.gpus:
        return Text(f"llama.cpp on {name} is CPU-only: its GPUs sit idle. Press i and "
                    f"install with cuda (rbee nodes install {name} --backend cuda)",
                    style="yellow")
    return Text("llama.cpp is a CPU-only build", style="dim")


def node_text(snapshot: NodeSnapshot | None, stats: NodeStats | None = None,
             note: str = "") -> Text:
    """The detail pane's text; long messages and hints wrap in the pane (B163)."""
    if snapshot is None:
        return Text("no node selected", style="dim")
    if snapshot.info is None:
        text = Text.assemble((f"{snapshot.name}: ", "bold"),
                             ("down" if snapshot.status == "down" else "not polled yet",
                              "bold red" if snapshot.status == "down" else "dim"))
        if snapshot.reason:
            text.append(f"\n{snapshot.reason}", style="red")
        if snapshot.hint:
            text.append(f"\nhint: {snapshot.hint}", style="yellow")
        if note:
            text.append(f"\n→ {note}", style="bold")
        return text
    return Text("\n").join(_node_lines(snapshot, snapshot.info, stats))
