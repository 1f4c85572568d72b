"""Small modal screens: confirmation, a one-line prompt, and the help generated from the
bindings (B76, B169)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Input, Label, Static

from rbee_tui.screens.base import RbeeModal

KeyRow = tuple[str, str, str]  # keys, name, what it does


class ConfirmScreen(RbeeModal[bool]):
    """Asks before something that cannot be undone; the question states the impact."""

    BINDINGS = [
        Binding("escape,n", "dismiss(False)", "No", id="confirm.no", tooltip="Keep it"),
        Binding("y", "dismiss(True)", "Yes", id="confirm.yes", tooltip="Go ahead"),
    ]

    def __init__(self, question: str, yes: str = "Yes") -> None:
        super().__init__()
        self.question = question
        self.yes = yes

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog confirm"):
            yield Static(self.question, classes="question", markup=False)
            yield Label("y confirms · n or esc keeps it", classes="hint")
            with Horizontal(classes="buttons"):
                yield Button(f"{self.yes} (y)", variant="error", id="yes")
                yield Button("Cancel (n)", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class PromptScreen(RbeeModal[str | None]):
    """Asks for one line of text (rename a chat, a file to export to); Enter submits."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel", id="prompt.cancel",
                        tooltip="Close without changing anything")]

    def __init__(self, question: str, value: str = "", label: str = "") -> None:
        super().__init__()
        self.question = question
        self.value = value
        self.label = label

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog prompt"):
            yield Static(self.question, classes="question", markup=False)
            if self.label:
                yield Label(self.label, classes="field-label")
            yield Input(self.value, id="prompt-value")
            with Horizontal(classes="buttons"):
                yield Button("OK", variant="primary", id="ok")
                yield Button("Cancel", id="cancel")

    @on(Input.Submitted)
    @on(Button.Pressed, "#ok")
    def _ok(self) -> None:
        self.dismiss(self.query_one("#prompt-value", Input).value.strip() or None)

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(None)


def key_table(rows: Sequence[KeyRow]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(no_wrap=True)
    table.add_column(style="dim", ratio=1)
    for keys, name, tip in rows:
        table.add_row(keys, name, tip)
    return table


class HelpScreen(RbeeModal[None]):
    """The keys of the screen below, then the ones that work everywhere, from their Binding
    ids and tooltips (lesson 4)."""

    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close", id="help.close",
                        tooltip="Close the help")]

    def __init__(self, sections: Sequence[tuple[str, Sequence[KeyRow]]]) -> None:
        super().__init__()
        self.sections = sections

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog help"):
            yield Label("[b]rbee — keys[/b]   (esc closes)")
            with VerticalScroll(id="help-scroll"):
                for title, rows in self.sections:
                    yield Static(Text(title, style="bold underline"), classes="help-title")
                    yield Static(key_table(rows), classes="help-keys")

    def text(self) -> str:
        """Everything the help says, as plain text (for tests and search)."""
        parts: list[str] = []
        for title, rows in self.sections:
            parts.append(title)
            parts.extend(f"{k} {n} {t}" for k, n, t in rows)
        return "\n".join(parts)


class CommandScreen(RbeeModal[str | None]):
    """The `:` command line at the bottom of the screen (B167); Enter runs, Esc closes."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel", id="command.cancel",
                        tooltip="Close the command line"),
                Binding("tab", "complete", "Complete", id="command.complete",
                        tooltip="Take the suggested completion")]

    def __init__(self, suggestions: Sequence[str]) -> None:
        super().__init__()
        self.suggestions = list(suggestions)

    def compose(self) -> ComposeResult:
        from textual.suggester import SuggestFromList

        with Vertical(id="command-bar"):
            yield Input(":", id="command-input",
                        suggester=SuggestFromList(self.suggestions, case_sensitive=False))
            yield Label(":nodes  :workers [NODE]  :models [NODE]  :logs [NODE]  "
                        ":chat [NODE] [MODEL]  :chats  :add  :theme NAME  :help  :quit  "
                        "(tab completes)", classes="hint")

    def on_mount(self) -> None:
        box = self.query_one(Input)
        box.focus()
        box.cursor_position = len(box.value)

    def action_complete(self) -> None:
        self.query_one(Input).action_cursor_right()  # at the end, this takes the suggestion

    @on(Input.Submitted)
    def _run(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)
