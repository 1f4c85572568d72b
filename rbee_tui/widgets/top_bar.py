"""The line at the top of every screen: where you are ("rbee › gpu1 › models"), and a short
status on the right (B167). It replaces Textual's Header, one line, no clock (a clock would
make every snapshot depend on the wall clock)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

SEPARATOR = " › "


class TopBar(Widget):
    DEFAULT_CSS = """
    TopBar {
        dock: top;
        height: 1;
        background: $panel;
        color: $foreground;
        padding: 0 1;
    }
    """

    crumbs: reactive[tuple[str, ...]] = reactive(("rbee",))
    status: reactive[str] = reactive("")

    def set_crumbs(self, crumbs: Sequence[str]) -> None:
        self.crumbs = ("rbee", *crumbs)

    def render(self) -> Text:
        width = self.content_size.width
        left = Text()
        for i, crumb in enumerate(self.crumbs):
            if i:
                left.append(SEPARATOR, style="dim")
            left.append(crumb, style="bold" if i == len(self.crumbs) - 1 else "")
        left.stylize(f"bold {self.app.current_theme.primary}", 0, len(self.crumbs[0]))
        right = Text(self.status, style="dim")
        gap = width - left.cell_len - right.cell_len
        if gap < 1:
            left.truncate(max(0, width - right.cell_len - 1), overflow="ellipsis")
            gap = max(1, width - left.cell_len - right.cell_len)
        return Text.assemble(left, " " * gap, right)
