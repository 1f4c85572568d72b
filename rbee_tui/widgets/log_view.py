"""A log you can read (B163): lines appended live, wrapping on a key, searchable with n/N.

Built on a read-only TextArea, which already knows how to soft-wrap, keep a cursor, show a
selection and scroll to it: a search match is selected, so it is highlighted and in view.
While "following", each new line scrolls to the bottom; a search or moving up stops
following, `G` resumes it.
"""

from __future__ import annotations

from textual.widgets import TextArea
from textual.widgets.text_area import Selection


class LogView(TextArea):
    DEFAULT_CSS = """
    LogView { height: 1fr; border: none; }
    """

    def __init__(self, *, id: str | None = None, max_lines: int = 5000) -> None:
        super().__init__("", id=id, read_only=True, soft_wrap=False, show_line_numbers=False,
                         show_cursor=True)
        self.max_lines = max_lines
        self.following = True
        self.query_text = ""
        self.matches: list[tuple[int, int]] = []
        self.match_index = -1

    def lines(self) -> list[str]:
        return self.text.split("\n")[:-1] if self.text.endswith("\n") else (
            self.text.split("\n") if self.text else [])

    def append(self, line: str) -> None:
        self.insert(line + "\n", self.document.end, maintain_selection_offset=False)
        extra = self.document.line_count - 1 - self.max_lines
        if extra > 0:
            self.delete((0, 0), (extra, 0), maintain_selection_offset=True)
        if self.following:
            self.move_cursor(self.document.end)
            self.scroll_end(animate=False, immediate=True)

    def reset(self) -> None:
        self.load_text("")
        self.following = True
        self.matches = []
        self.match_index = -1

    def follow(self) -> None:
        self.following = True
        self.move_cursor(self.document.end)
        self.scroll_end(animate=False)

    def toggle_wrap(self) -> bool:
        self.soft_wrap = not self.soft_wrap
        return self.soft_wrap

    def search(self, text: str) -> int:
        """Find every case-insensitive match; select the first after the cursor."""
        self.query_text = text
        self.matches = []
        self.match_index = -1
        if not text:
            self.selection = Selection.cursor(self.cursor_location)
            return 0
        wanted = text.lower()
        for row, line in enumerate(self.text.split("\n")):
            start = line.lower().find(wanted)
            while start >= 0:
                self.matches.append((row, start))
                start = line.lower().find(wanted, start + 1)
        if self.matches:
            here = self.cursor_location
            after = [i for i, m in enumerate(self.matches) if m >= here]
            self._select(after[0] if after else 0)
        return len(self.matches)

    def next_match(self, step: int = 1) -> None:
        if not self.matches:
            return
        self._select((self.match_index + step) % len(self.matches))

    def _select(self, index: int) -> None:
        self.following = False
        self.match_index = index
        row, column = self.matches[index]
        self.selection = Selection((row, column), (row, column + len(self.query_text)))
        self.scroll_cursor_visible(center=True, animate=False)
