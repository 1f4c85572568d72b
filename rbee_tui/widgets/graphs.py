"""History graphs with a fixed, labelled scale (B161), nvitop-style.

Textual's `Sparkline` scales each graph to its own minimum and maximum, so a flat 23.9-24.1 GB
line fills the whole height and looks like a crisis. These graphs always run from 0 to a
known top (the node's RAM, a GPU's VRAM, 100 %), say so on the axis, and fill the room they
are given: one column per poll, newest on the right, as many rows as the layout allows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.text import Text
from textual.strip import Strip
from textual.widget import Widget

BLOCKS = " ▁▂▃▄▅▆▇█"


def spark(values: Sequence[float], top: float, width: int) -> str:
    """One row of the last `width` values scaled 0..top (a short history beside a reading)."""
    if width <= 0:
        return ""
    shown = list(values)[-width:]
    cells = [BLOCKS[_eighths(v, top, 8)] if v > 0 else "▁" for v in shown]
    return " " * (width - len(cells)) + "".join(cells)


def _eighths(value: float, top: float, most: int) -> int:
    if top <= 0:
        return 0
    return max(0, min(most, round(value / top * most)))


def columns(values: Sequence[float], top: float, rows: int, width: int) -> list[str]:
    """The plot area as `rows` strings of `width` cells, top row first."""
    shown = list(values)[-width:]
    pad = width - len(shown)
    heights = [_eighths(v, top, rows * 8) for v in shown]
    lines: list[str] = []
    for row in range(rows):
        floor = (rows - 1 - row) * 8  # eighths below this row
        cells = [BLOCKS[max(0, min(8, h - floor))] for h in heights]
        lines.append(" " * pad + "".join(cells))
    return lines


@dataclass(frozen=True)
class ScaledGraph:
    """What one graph shows: a titled series on a 0..top scale, in `unit` (÷ `scale`)."""

    title: str
    values: tuple[float, ...]
    top: float
    unit: str
    scale: float = 1.0  # shown value = stored value / scale (MB → GB: 1024)
    digits: int = 1
    style: str = "green"

    def fmt(self, value: float) -> str:
        return f"{value / self.scale:.{self.digits}f}"

    def heading(self) -> Text:
        now = self.fmt(self.values[-1]) if self.values else "-"
        return Text.assemble((self.title, "bold"), f"  {now} of {self.fmt(self.top)} {self.unit}")

    def lines(self, width: int, height: int) -> list[Text]:
        """The heading, then the plot with its axis: 'top┤' on the first row, '0┤' on the
        last, the newest reading in the rightmost column."""
        rows = max(1, height - 1)
        top_label = f"{self.fmt(self.top)}┤"
        axis = len(top_label)
        plot = columns(self.values, self.top, rows, max(1, width - axis))
        out = [self.heading()]
        for i, line in enumerate(plot):
            label = top_label if i == 0 else "0┤".rjust(axis) if i == rows - 1 else "│".rjust(axis)
            out.append(Text.assemble((label, "dim"), (line, self.style)))
        return out


class HistoryGraph(Widget):
    """Draws one `ScaledGraph` in whatever room the layout gives it; repaints only when the
    graph changed."""

    DEFAULT_CSS = """
    HistoryGraph { height: 1fr; min-height: 3; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.graph: ScaledGraph | None = None
        self._lines: list[Strip] = []
        self._drawn: tuple[ScaledGraph | None, int, int] | None = None

    def show(self, graph: ScaledGraph | None) -> None:
        if graph == self.graph:
            return
        self.graph = graph
        self.refresh()

    def render_line(self, y: int) -> Strip:
        width, height = self.size
        key = (self.graph, width, height)
        if key != self._drawn:
            self._drawn = key
            texts = self.graph.lines(width, height) if self.graph else []
            base = self.rich_style
            self._lines = [Strip(t.render(self.app.console)).apply_style(base)
                           .crop_extend(0, width, base) for t in texts]
        if y < len(self._lines):
            return self._lines[y]
        return Strip.blank(width, self.rich_style)
