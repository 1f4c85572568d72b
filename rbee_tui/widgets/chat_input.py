"""The chat's multi-line input (B160): Enter sends, shift+Enter / ctrl+J / alt+Enter add a
line, PageUp/PageDown scroll the transcript while you type, ctrl+Y copies the last reply.

A TextArea inserts a newline for Enter in its own key handler, before any binding is looked
at, so Enter is taken here first and turned into `ChatInput.Submitted`.
"""

from __future__ import annotations

from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.widgets import TextArea


class ChatInput(TextArea):
    HELP_BINDINGS = [
        Binding("enter", "submit", "Send", id="chat_input.send",
                tooltip="Send the message (or save the form)"),
        Binding("shift+enter,ctrl+j,alt+enter", "newline", "New line",
                id="chat_input.newline", tooltip="Start a new line in the message"),
        Binding("pageup,pagedown", "screen.scroll_transcript", "Scroll",
                id="chat_input.scroll", tooltip="Scroll the conversation while you type"),
    ]
    BINDINGS = [
        Binding("shift+enter,ctrl+j,alt+enter", "newline", "New line", show=False,
                id="chat_input.newline", tooltip="Start a new line in the message"),
        Binding("pageup", "screen.scroll_transcript(-1)", "Scroll up", show=False,
                id="chat_input.page_up", tooltip="Scroll the conversation up a page"),
        Binding("pagedown", "screen.scroll_transcript(1)", "Scroll down", show=False,
                id="chat_input.page_down", tooltip="Scroll the conversation down a page"),
        Binding("ctrl+y", "screen.copy_reply", "Copy reply",
                id="chat_input.copy", tooltip="Copy the last reply to the clipboard"),
    ]

    DEFAULT_CSS = """
    ChatInput { height: auto; min-height: 3; max-height: 10; }
    """

    class Submitted(Message):
        def __init__(self, chat_input: ChatInput, text: str) -> None:
            super().__init__()
            self.chat_input = chat_input
            self.text = text

        @property
        def control(self) -> ChatInput:
            return self.chat_input

    def __init__(self, text: str = "", *, placeholder: str = "", id: str | None = None
                 ) -> None:
        super().__init__(text, id=id, soft_wrap=True, show_line_numbers=False,
                         tab_behavior="focus", placeholder=placeholder, compact=True)

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self, self.text))

    def action_newline(self) -> None:
        self.insert("\n")

    def action_submit(self) -> None:
        self.post_message(self.Submitted(self, self.text))
