"""The command palette's own entries (B76): nodes, models, actions. Imported when the
palette first opens, so the dashboard's first frame does not wait for it (B175)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider


class RbeeCommands(Provider):
    """Command palette (B76): nodes, models and actions."""

    def _entries(self) -> list[tuple[str, str, Callable[[], object]]]:
        from rbee_gateway.any_node import ANY_NODE
        from rbee_tui.app import RbeeApp

        app = self.app
        assert isinstance(app, RbeeApp)
        entries: list[tuple[str, str, Callable[[], object]]] = []
        for name in app.config.names():
            entries.append((f"Node: {name}", "select it on the dashboard",
                            partial(app.select_node, name)))
            entries.append((f"Chat on {name}", "open the chat pane",
                            partial(app.open_chat, name)))
            entries.append((f"Models on {name}", "the node's catalog",
                            partial(app.open_models, name)))
            entries.append((f"Logs on {name}", "the node's agent and worker logs",
                            partial(app.open_logs, name)))
        for label, help_text, action in (
            ("Add node", "add a node over SSH", app.action_add_node),
            ("Saved chats", "reopen, rename, delete or export a conversation",
             app.action_chats),
            ("Gateway", "the OpenAI endpoint for every node: URL, key, traffic, start/stop",
             app.action_gateway),
            ("Chat on any node", "the gateway's routing picks the node",
             partial(app.open_chat, ANY_NODE)),
            ("Help", "all keys", app.action_help),
        ):
            entries.append((label, help_text, action))
        for name, snapshot in app.fleet.snapshots.items():
            for worker in snapshot.workers:
                entries.append((f"Chat with {worker.model_id} on {name}", "model",
                                partial(app.open_chat, name, worker.model_id)))
        return entries

    async def discover(self) -> Hits:
        for label, help_text, action in self._entries():
            yield DiscoveryHit(label, action, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for label, help_text, action in self._entries():
            score = matcher.match(label)
            if score > 0:
                yield Hit(score, matcher.highlight(label), action, help=help_text)
