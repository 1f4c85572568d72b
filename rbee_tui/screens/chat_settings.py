"""A chat's system prompt and sampling settings (B160): a small form, Enter saves.

The bounds are the worker's own (max tokens 1-32768, temperature 0-2, top-p above 0 up to
1, seed 0-2^32-1 or empty for a random one), checked as you type.
"""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.validation import Function, Integer, Number, ValidationResult, Validator
from textual.widgets import Button, Input, Label

from rbee_tui.chat_store import ChatSettings, Conversation
from rbee_tui.screens.base import RbeeModal, form_row
from rbee_tui.widgets.chat_input import ChatInput


class _Seed(Validator):
    def validate(self, value: str) -> ValidationResult:
        if not value.strip():
            return self.success()
        ok = value.strip().isdigit() and int(value) < 2**32
        return self.success() if ok else self.failure("a whole number from 0 to 4294967295")


FIELDS: list[tuple[str, str, list[Validator]]] = [
    ("max_tokens", "Max tokens (1-32768)", [Integer(1, 32768)]),
    ("temperature", "Temperature (0 = greedy, up to 2)", [Number(0.0, 2.0)]),
    ("top_p", "Top-p (above 0, up to 1)",
     [Number(0.0, 1.0), Function(lambda v: _positive(v), "must be above 0")]),
    ("seed", "Seed (empty: a new one each time)", [_Seed()]),
]


def _positive(value: str) -> bool:
    try:
        return float(value) > 0
    except ValueError:
        return False


class ChatSettingsScreen(RbeeModal[bool]):
    BINDINGS = [Binding("escape", "dismiss(False)", "Cancel", id="chat_settings.cancel",
                        tooltip="Close without saving")]

    def __init__(self, conversation: Conversation) -> None:
        super().__init__()
        self.conversation = conversation

    def compose(self) -> ComposeResult:
        s = self.conversation.settings
        values = {"max_tokens": str(s.max_tokens), "temperature": f"{s.temperature:g}",
                  "top_p": f"{s.top_p:g}", "seed": "" if s.seed is None else str(s.seed)}
        with VerticalScroll(classes="dialog form"):
            yield Label(f"Settings of this chat ({self.conversation.model} on "
                        f"{self.conversation.node})", classes="question")
            yield Label("System prompt (ctrl+j: new line)", classes="field-label")
            yield ChatInput(self.conversation.system_prompt, id="system-prompt",
                            placeholder="e.g. You are a concise assistant.")
            for key, label, validators in FIELDS:
                name, _, hint = label.partition(" (")
                yield form_row(name, Input(values[key], id=key, validators=validators,
                                           placeholder=hint.rstrip(")")))
            yield Label("", id="form-error")
            with Horizontal(classes="buttons"):
                yield Button("Save (enter)", variant="primary", id="save")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#system-prompt", ChatInput).focus()

    @on(ChatInput.Submitted)
    @on(Input.Submitted)
    @on(Button.Pressed, "#save")
    def _save(self) -> None:
        problems: list[str] = []
        for box in self.query(Input):
            result = box.validate(box.value)
            if result is not None and not result.is_valid:
                label = next(lbl for key, lbl, _ in FIELDS if key == box.id)
                problems.append(f"{label.split(' (')[0]}: {'; '.join(result.failure_descriptions)}")
        if problems:
            self.query_one("#form-error", Label).update("[red]" + "\n".join(problems) + "[/red]")
            return
        v = {box.id: box.value.strip() for box in self.query(Input)}
        self.conversation.system_prompt = self.query_one("#system-prompt", ChatInput).text.strip()
        self.conversation.settings = ChatSettings(
            max_tokens=int(v["max_tokens"]), temperature=float(v["temperature"]),
            top_p=float(v["top_p"]), seed=int(v["seed"]) if v["seed"] else None)
        self.dismiss(True)

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(False)
