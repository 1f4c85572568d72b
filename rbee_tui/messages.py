"""Typed messages between the app's data work and its widgets (STYLE lesson 5)."""

from __future__ import annotations

from textual.message import Message

from rbee_tui.node_source import NodeSnapshot


class NodePolled(Message):
    """A node answered a poll (or did not: then its snapshot says why)."""

    def __init__(self, snapshot: NodeSnapshot) -> None:
        super().__init__()
        self.snapshot = snapshot


class RegistryChanged(Message):
    """Nodes were added, edited or removed."""
