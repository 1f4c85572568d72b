"""Small modal screens: confirmation, and the help generated from the bindings (B76)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Label, Static

from rbee_tui.screens.base import RbeeModal


class ConfirmScreen(RbeeModal[bool]):
    BINDINGS = [
        Binding("escape,n", "dismiss(False)", "No", id="confirm.no", tooltip="Keep it"),
        Binding("y", "dismiss(True)", "Yes", id="confirm.yes", tooltip="Go ahead"),
    ]

    def __init__(self, question: str, yes: str = "Yes") -> None:
        super().__init__()
        self.question = question
        self.yes = yes

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question, classes="question")
            with Horizontal(classes="buttons"):
                yield Button(self.yes, variant="error", id="yes")
                yield Button("Cancel", id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class HelpScreen(RbeeModal[None]):
    """Every key of the screen below and of the app, from their Binding ids and tooltips."""

    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close", id="help.close",
                        tooltip="Close the help")]

    def __init__(self, rows: list[tuple[str, str, str]]) -> None:
        super().__init__()
        self.rows = rows

    def compose(self) -> ComposeResult:
        lines = [f"[b]{key:<12}[/b] {desc:<16} [dim]{tip}[/dim]" for key, desc, tip in self.rows]
        with Vertical(classes="dialog help"):
            yield Label("[b]rbee — keys[/b]   (esc closes)")
            with VerticalScroll():
                yield Static("\n".join(lines), id="help-text")
