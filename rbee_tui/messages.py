"""Typed messages from screens to the app (lesson 5): what a screen asks the app to do.

Screens never import the app: they post one of these, which bubbles up to `RbeeApp`. Data
flows the other way through `Fleet.changed` (rbee_tui/fleet.py).
"""

from __future__ import annotations

from textual.message import Message


class PollNow(Message):
    """Ask the app to poll a node at once (after a spawn, a stop, a start)."""

    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node


class OpenChat(Message):
    """Open the chat on a node, with a model, or with a saved conversation."""

    def __init__(self, node: str, model: str | None = None,
                 conversation_id: int | None = None) -> None:
        super().__init__()
        self.node = node
        self.model = model
        self.conversation_id = conversation_id
