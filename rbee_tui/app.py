"""`rbee` with no arguments: the full-screen dashboard (B70-B79).

The app owns polling (one worker per node, never overlapping, paused while a modal is open)
and hands snapshots to the screens as `NodePolled` messages. Every network or SSH call runs
in a Textual worker; every failure ends as a notification carrying the RbeeError's message
and hint (B78). Flow logic lives in the orchestrator and ssh modules, not here.
"""

from __future__ import annotations

import gc
from collections import deque
from collections.abc import AsyncIterator

from textual import on
from textual.app import App
from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.screen import ModalScreen
from textual.worker import Worker, WorkerState

from rbee_agent.protocol import RbeeError
from rbee_tui.config import Config, Node, save_config
from rbee_tui.events import Event, Finished
from rbee_tui.links import NodeLinks
from rbee_tui.messages import NodePolled
from rbee_tui.node_source import LiveNodeSource, NodeSnapshot, NodeSource
from rbee_tui.screens.dashboard import DashboardScreen
from rbee_tui.screens.modals import ConfirmScreen, HelpScreen
from rbee_tui.themes import load_themes, user_dir

HISTORY_POINTS = 150  # 5 minutes at the default 2 s poll


class RbeeCommands(Provider):
    """Command palette (B76): nodes, models and actions."""

    def _entries(self) -> list[tuple[str, str, object]]:
        app = self.app
        assert isinstance(app, RbeeApp)
        entries: list[tuple[str, str, object]] = []
        for name in app.config.names():
            entries.append((f"Node: {name}", "select it on the dashboard",
                            lambda n=name: app.select_node(n)))
            entries.append((f"Chat on {name}", "open the chat pane",
                            lambda n=name: app.open_chat(n)))
            entries.append((f"Models on {name}", "the node's catalog",
                            lambda n=name: app.open_models(n)))
        for label, help_text, action in (
            ("Add node", "add a node over SSH", app.action_add_node),
            ("Help", "all keys", app.action_help),
        ):
            entries.append((label, help_text, action))
        for name, snapshot in app.snapshots.items():
            for worker in snapshot.workers:
                entries.append((f"Chat with {worker.model_id} on {name}", "model",
                                lambda n=name, m=worker.model_id: app.open_chat(n, m)))
        return entries

    async def discover(self) -> Hits:
        for label, help_text, action in self._entries():
            yield DiscoveryHit(label, action, help=help_text)  # type: ignore[arg-type]

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for label, help_text, action in self._entries():
            score = matcher.match(label)
            if score > 0:
                yield Hit(score, matcher.highlight(label), action,  # type: ignore[arg-type]
                          help=help_text)


class RbeeApp(App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "rbee"
    COMMANDS = App.COMMANDS | {RbeeCommands}
    BINDINGS = [
        Binding("q", "quit", "Quit", id="app.quit", tooltip="Leave rbee (agents keep running)"),
        Binding("question_mark", "help", "Help", id="app.help", tooltip="Show every key"),
        Binding("ctrl+p", "command_palette", "Palette", id="app.palette",
                tooltip="Nodes, models, actions and themes"),
    ]

    def __init__(self, config: Config, source: NodeSource, links: NodeLinks | None = None,
                 poll: bool = True, save_theme: bool = True) -> None:
        super().__init__()
        self.config = config
        self.source = source
        self.links = links
        self.poll_enabled = poll
        self.save_theme = save_theme
        self.snapshots: dict[str, NodeSnapshot] = {}
        self.history: dict[str, deque[float]] = {}
        self.rates: dict[str, float] = {}
        self._tokens: dict[str, tuple[float, int]] = {}
        self._polling: set[str] = set()
        self.dashboard = DashboardScreen()

    # ------------------------------------------------------------------ start

    def on_mount(self) -> None:
        loaded = load_themes([user_dir()])
        for theme in loaded.themes:
            self.register_theme(theme)
        for problem in loaded.problems:
            self.notify(problem, title="Theme", severity="warning", timeout=10)
        wanted = self.config.settings.theme
        if wanted in self.available_themes:
            self.theme = wanted
        else:
            self.notify(f"Theme '{wanted}' is not available; using rbee.",
                        title="Theme", severity="warning")
            self.theme = "rbee"
        self.push_screen(self.dashboard)
        self.call_after_refresh(self._freeze_startup_objects)
        if self.poll_enabled:
            for name in self.config.names():
                self.start_polling(name)

    def _freeze_startup_objects(self) -> None:
        """After the first frame, take what start-up built out of the cyclic GC's scans.

        Imports, CSS and the first screen leave ~100k long-lived objects that every full
        collection walks again: 40-120 ms stalls of the event loop, several per streamed chat
        reply (bench/tui.py). Frozen, the same collections take ~10-65 ms (what the session
        builds later is still scanned). `on_unmount` unfreezes them.
        """
        gc.collect()
        gc.freeze()

    def watch_theme(self, theme: str) -> None:
        if not self.save_theme or theme == self.config.settings.theme:
            return
        self.config.settings.theme = theme
        try:
            save_config(self.config)
        except OSError as exc:
            self.notify(f"Could not save the theme choice: {exc}", severity="warning")

    # ------------------------------------------------------------------ polling

    def snapshot(self, name: str) -> NodeSnapshot:
        return self.snapshots.get(name) or NodeSnapshot(name=name, status="unknown")

    def start_polling(self, name: str) -> None:
        if name in self._polling:
            return
        self._polling.add(name)
        self.poll_now(name)

    def poll_now(self, name: str) -> None:
        self.run_worker(self._poll(name), group=f"poll-{name}", exclusive=True,
                        exit_on_error=False, name=f"poll {name}")

    async def _poll(self, name: str) -> None:
        snapshot = await self.source.poll(name)
        self.apply_snapshot(snapshot)
        if name in self._polling:
            self.set_timer(self.config.settings.poll_interval_s, lambda: self._next_poll(name))

    def _next_poll(self, name: str) -> None:
        if name not in self._polling or not self.is_running or not self.screen_stack:
            return
        if isinstance(self.screen, ModalScreen):  # paused while a form is open
            self.set_timer(0.5, lambda: self._next_poll(name))
            return
        self.poll_now(name)

    def apply_snapshot(self, snapshot: NodeSnapshot) -> None:
        name = snapshot.name
        self.snapshots[name] = snapshot
        if snapshot.info is not None:
            info = snapshot.info
            if info.gpus:
                used = sum((g.vram_used_mb or 0) for g in info.gpus) / 1024
            else:
                used = (info.ram_total_mb - info.ram_available_mb) / 1024
            self.history.setdefault(name, deque(maxlen=HISTORY_POINTS)).append(round(used, 2))
        tokens = sum(w.tokens_served for w in snapshot.workers)
        before = self._tokens.get(name)
        now = snapshot.polled_at
        if before is not None and now > before[0]:
            self.rates[name] = max(0.0, (tokens - before[1]) / (now - before[0]))
        self._tokens[name] = (now, tokens)
        self.dashboard.post_message(NodePolled(snapshot))

    # ------------------------------------------------------------------ errors (B78)

    @on(Worker.StateChanged)
    def _worker_failed(self, event: Worker.StateChanged) -> None:
        if event.state != WorkerState.ERROR or event.worker.error is None:
            return
        self.show_error(event.worker.error)

    def show_error(self, error: BaseException) -> None:
        if isinstance(error, RbeeError):
            message = error.message + (f"\n{error.hint}" if error.hint else "")
        else:
            message = f"{type(error).__name__}: {error}"
        self.notify(message, title="Error", severity="error", timeout=12)

    # ------------------------------------------------------------------ navigation

    def selected_node(self) -> str:
        return self.dashboard.selected_node() or self.config.names()[0]

    def select_node(self, name: str) -> None:
        from rbee_tui.widgets.tables import NodesTable

        table = self.dashboard.query_one(NodesTable)
        if name in table.rows:
            table.move_cursor(row=table.get_row_index(name))

    def action_help(self) -> None:
        rows: list[tuple[str, str, str]] = []
        seen: set[str] = set()
        for binding in [*self.screen.BINDINGS, *self.BINDINGS]:
            if not isinstance(binding, Binding) or binding.id in seen:
                continue
            seen.add(binding.id or binding.key)
            keys = binding.key_display or binding.key.replace("question_mark", "?").replace(
                "slash", "/")
            rows.append((keys, binding.description, binding.tooltip))
        self.push_screen(HelpScreen(rows))

    def action_chat(self) -> None:
        self.open_chat(self.selected_node())

    def open_chat(self, node: str, model: str | None = None) -> None:
        from rbee_tui.screens.chat import ChatScreen

        self.push_screen(ChatScreen(node, model))

    def action_models(self) -> None:
        self.open_models(self.selected_node())

    def open_models(self, node: str) -> None:
        from rbee_tui.screens.models import ModelsScreen

        self.push_screen(ModelsScreen(node))

    def action_logs(self) -> None:
        from rbee_tui.screens.logs import LogsScreen

        self.push_screen(LogsScreen(self.selected_node()))

    # ------------------------------------------------------------------ node setup (B71)

    def action_add_node(self) -> None:
        from rbee_tui.screens.node_form import NodeFormScreen

        self.push_screen(NodeFormScreen(self.config, None), self._node_saved)

    def action_edit_node(self) -> None:
        from rbee_tui.screens.node_form import NodeFormScreen

        name = self.selected_node()
        node = self.config.node(name)
        if node.is_local:
            self.notify("localhost needs no SSH settings.", severity="warning")
            return
        self.push_screen(NodeFormScreen(self.config, node), self._node_saved)

    def _node_saved(self, node: Node | None) -> None:
        if node is None:
            return
        self.config.nodes[node.name] = node
        save_config(self.config)
        self.notify(f"Node '{node.name}' saved.")
        self.start_polling(node.name)
        self.poll_now(node.name)

    def action_delete_node(self) -> None:
        name = self.selected_node()
        if self.config.node(name).is_local:
            self.notify("localhost is always a node; it cannot be removed.", severity="warning")
            return

        def done(yes: bool | None) -> None:
            if not yes:
                return
            self.config.nodes.pop(name, None)
            save_config(self.config)
            self._polling.discard(name)
            self.snapshots.pop(name, None)
            self.dashboard.refresh_view()
            self.notify(f"Node '{name}' removed.")

        self.push_screen(ConfirmScreen(f"Remove node '{name}' from the registry?\n"
                                       "Its agent keeps running.", yes="Remove"), done)

    def action_install_agent(self) -> None:
        from rbee_tui.screens.install import InstallScreen

        node = self.config.node(self.selected_node())
        if node.is_local:
            self.notify("localhost runs the agent from this installation.", severity="warning")
            return
        self.push_screen(InstallScreen(self.config, node), self._installed)

    def _installed(self, node: Node | None) -> None:
        if node is not None:
            self._node_saved(node)

    def action_toggle_agent(self) -> None:
        name = self.selected_node()
        up = self.snapshot(name).status == "up"
        self.run_worker(self._toggle_agent(name, up), group="agent-control",
                        exit_on_error=False, name=f"agent {name}")

    async def _toggle_agent(self, name: str, up: bool) -> None:
        from rbee_tui.ops import nodes as node_ops

        flow = node_ops.stop_agent if up else node_ops.start_agent
        message = await self._drain(flow(self.config, self.config.node(name)))
        self.notify(message)
        self.poll_now(name)

    async def _drain(self, flow: AsyncIterator[Event]) -> str:
        """Run an operation for its outcome: the message of its Finished (said only once
        the agent proved it is the one asked for, B140)."""
        message = ""
        async for event in flow:
            if isinstance(event, Finished):
                message = event.message
        return message

    # ------------------------------------------------------------------ workers (B74)

    def action_spawn_worker(self) -> None:
        from rbee_tui.screens.spawn import SpawnScreen

        self.push_screen(SpawnScreen(self.selected_node()))

    def stop_worker(self, node: str, worker_id: str) -> None:
        async def stop() -> None:
            client = await self.source.client(node)
            await client.stop_worker(worker_id)
            self.notify(f"Worker {worker_id} stopped.")
            self.poll_now(node)

        self.run_worker(stop(), group="workers", exit_on_error=False, name="stop worker")


    async def on_unmount(self) -> None:
        gc.unfreeze()
        close = getattr(self.source, "aclose", None)
        if close is not None:
            await close()
        if self.links is not None:
            await self.links.aclose()


def run_app(config: Config, ephemeral: bool = False) -> int:
    """Open the dashboard; with --ephemeral, stop on exit the local agent this run started."""
    links = NodeLinks(config)
    app = RbeeApp(config, LiveNodeSource(config, links), links)
    try:
        app.run()
    finally:
        if ephemeral or config.settings.ephemeral:
            links.stop_started_local()
    return 0
