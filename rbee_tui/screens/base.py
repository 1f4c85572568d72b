"""What every rbee screen shares: errors as notifications (B78), the top bar's breadcrumb
(B167), `/` filters with Esc clearing them (B168), and forms that keep early keystrokes (B173).

Worker.StateChanged does not bubble past the screen that owns the worker, so every screen
reports a failed worker's error itself. Screens never import the app (lesson 5): they read
the `Fleet` they are given and post `rbee_tui.messages` to ask for anything else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from textual import events, on
from textual.app import App
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import ModalScreen, Screen
from textual.widget import Widget
from textual.widgets import Button, Input, Label
from textual.worker import Worker, WorkerState

from rbee_agent.protocol import RbeeError
from rbee_tui.widgets.tables import KeyedTable
from rbee_tui.widgets.top_bar import TopBar

R = TypeVar("R")

# Shown first in every full screen's footer, so they stay visible at 80 columns (B164).
ESSENTIAL = [
    Binding("question_mark", "app.help", "Help", id="app.help", tooltip="Show every key"),
    Binding("colon", "app.command", "Command", id="app.command",
            tooltip="Command mode: :nodes, :models, :logs, :chat NODE, :chats, :quit"),
]


def error_text(error: BaseException) -> str:
    """What the CLI prints for an error: message, then hint (B78)."""
    if isinstance(error, RbeeError):
        return error.message + (f"\n{error.hint}" if error.hint else "")
    return f"{type(error).__name__}: {error}"


def notify_error(node: Widget | App[Any], error: BaseException) -> None:
    node.notify(error_text(error), title="Error", severity="error", timeout=12)


def _report(node: Widget, event: Worker.StateChanged) -> None:
    if event.state == WorkerState.ERROR and event.worker.error is not None:
        notify_error(node, event.worker.error)


# Classes a screen carries for the terminal's size, so the CSS can fit 80×24 and use 200×60.
HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-normal"), (160, "-wide")]
VERTICAL_BREAKPOINTS = [(0, "-short"), (30, "-tall")]


class RbeeScreen(Screen[R]):
    """A full screen: top bar with breadcrumb, and a `/` filter for its tables."""

    HORIZONTAL_BREAKPOINTS = HORIZONTAL_BREAKPOINTS
    VERTICAL_BREAKPOINTS = VERTICAL_BREAKPOINTS

    def crumbs(self) -> Sequence[str]:
        return ()

    def top_bar(self) -> TopBar:
        return self.query_one(TopBar)

    def show_crumbs(self, status: str | None = None) -> None:
        bar = self.top_bar()
        bar.set_crumbs(self.crumbs())
        if status is not None:
            bar.status = status

    @on(events.Mount)
    def _mounted(self) -> None:
        self.show_crumbs()

    @on(Worker.StateChanged)
    def _worker_failed(self, event: Worker.StateChanged) -> None:
        _report(self, event)

    def on_key(self, event: events.Key) -> None:
        mark_origin(event, self)

    # ------------------------------------------------------------------ filters (B168)

    def filter_table(self) -> KeyedTable | None:
        """The table `/` filters: the focused one, else the screen's first."""
        if isinstance(self.focused, KeyedTable):
            return self.focused
        tables = self.query(KeyedTable)
        return tables.first() if tables else None

    def action_filter(self) -> None:
        table = self.filter_table()
        if table is None:
            return
        box = self.query_one("#filter", Input)
        box.placeholder = f"filter {table.id or 'rows'}… (enter keeps it, esc clears it)"
        box.value = table.filter_text
        box.display = True
        box.focus()
        self._filtering = table

    _filtering: KeyedTable | None = None

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        if self._filtering is not None:
            self._filtering.set_filter(event.value.strip())
            self.filter_applied(self._filtering)

    def filter_applied(self, table: KeyedTable) -> None:
        """A hook for screens whose other panes follow the filtered table."""

    @on(Input.Submitted, "#filter")
    def _filter_done(self, _: Input.Submitted) -> None:
        box = self.query_one("#filter", Input)
        if not box.value and self._filtering is not None:
            box.display = False
        if self._filtering is not None:
            self._filtering.focus()

    def clear_filter(self) -> bool:
        """Esc: clear an active filter; False when there was none (Esc then goes back)."""
        boxes = self.query("#filter")
        if not boxes:
            return False
        box = boxes.first(Input)
        tables = [t for t in self.query(KeyedTable) if t.filter_text]
        if not tables and not box.display:
            return False
        for table in tables:
            table.set_filter("")
            self.filter_applied(table)
        box.value = ""
        box.display = False
        (self._filtering or self.filter_table() or self).focus()
        self._filtering = None
        return True


# Keys typed fast after a key that opens a form or the chat (`a`, `c`) are all queued to the
# old screen's focused widget before the first one has been handled; they bubble up to the
# app only after the new screen is on top, and would be lost. Each screen marks the keys that
# pass through it; the app hands a marked key that arrives from a screen no longer on top to
# the screen on top, if that screen takes typing (B173).
ORIGIN = "rbee_origin"


def mark_origin(event: events.Key, screen: Screen[Any]) -> None:
    setattr(event, ORIGIN, screen)


def redirect_early_key(app: App[Any], event: events.Key) -> bool:
    """True when `event` was typed for the screen now on top and has been given to it."""
    origin = getattr(event, ORIGIN, None)
    top = app.screen
    if origin is None or origin is top or not event.is_printable or event.character is None:
        return False
    take = getattr(top, "accept_early_key", None)
    return take is not None and bool(take(event.character))


class RbeeModal(ModalScreen[R]):
    """A dialog. Printable keys typed before its first field had focus, right after it
    opened, go into the focused field, or the first one (B173)."""

    HORIZONTAL_BREAKPOINTS = HORIZONTAL_BREAKPOINTS
    VERTICAL_BREAKPOINTS = VERTICAL_BREAKPOINTS

    _early: str = ""

    @on(Worker.StateChanged)
    def _worker_failed(self, event: Worker.StateChanged) -> None:
        _report(self, event)

    def accept_early_key(self, character: str) -> bool:
        """Type `character` into the form; kept until the fields exist."""
        if not self.is_mounted:
            self._early += character
            return True
        # A focused Input takes its own keys; one that reaches here was typed before the
        # field had focus. Keys typed on a focused button stay with the button.
        if isinstance(self.focused, Input):
            target: Input | None = self.focused
        elif isinstance(self.focused, Button):
            return False
        else:  # nothing focused yet, or only the dialog's scroll container
            inputs = [i for i in self.query(Input) if i.display and not i.disabled]
            target = inputs[0] if inputs else None
        if target is None:
            return False
        target.focus()
        target.insert_text_at_cursor(character)
        return True

    @on(events.Mount)
    def _type_early_keys(self) -> None:
        early, self._early = self._early, ""
        for character in early:
            self.accept_early_key(character)

    def on_key(self, event: events.Key) -> None:
        if event.is_printable and event.character is not None and self.accept_early_key(
                event.character):
            event.stop()
            event.prevent_default()


def form_row(label: str, box: Input) -> Horizontal:
    """One labelled field on one line (B173): compact, so a form fits at 80×24."""
    box.compact = True
    return Horizontal(Label(label, classes="field-label"), box, classes="form-row")
