"""`rbee` with no arguments: the full-screen dashboard (B70-B79, B160-B178).

The app owns polling (one worker per node, never overlapping, paused while a modal is open)
and feeds each snapshot to the `Fleet`, which screens subscribe to. Screens ask the app for
navigation and polls with typed messages (`rbee_tui.messages`); none imports this module.
Every network or SSH call runs in a Textual worker; every failure ends as a notification
carrying the RbeeError's message and hint (B78). Flow logic lives in the orchestrator and
ssh modules, not here. Screens other than the dashboard are imported when first opened, so
the first frame does not wait for them (B175).
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from textual import events, on
from textual.app import App
from textual.binding import Binding
from textual.screen import ModalScreen
from textual.worker import Worker, WorkerState

from rbee_agent.protocol import RbeeError
from rbee_tui.config import Config, Node, save_config
from rbee_tui.events import Event, Finished, Note
from rbee_tui.fleet import Fleet
from rbee_tui.links import NodeLinks
from rbee_tui.messages import OpenChat, PollNow
from rbee_tui.node_source import LiveNodeSource, NodeSnapshot, NodeSource
from rbee_tui.screens.base import notify_error, redirect_early_key
from rbee_tui.screens.dashboard import DashboardScreen
from rbee_tui.screens.modals import CommandScreen, ConfirmScreen, HelpScreen, KeyRow
from rbee_tui.themes import load_themes, user_dir

if TYPE_CHECKING:
    from textual.command import Provider

    from rbee_gateway.inprocess import GatewayControl
    from rbee_gateway.routing import Fleet as RoutingFleet
    from rbee_tui.chat_store import ChatStore
    from rbee_tui.held_splits import HeldSplits
    from rbee_tui.ops.split import SplitWorker


def _palette() -> type[Provider]:
    """The palette's provider, imported when the palette first opens (B175)."""
    from rbee_tui.palette import RbeeCommands

    return RbeeCommands


class RbeeApp(App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "rbee"
    COMMANDS = App.COMMANDS | {_palette}
    BINDINGS = [
        Binding("q", "quit", "Quit", id="app.quit", tooltip="Leave rbee (agents keep running)"),
        Binding("question_mark", "help", "Help", id="app.help", tooltip="Show every key"),
        Binding("colon", "command", "Command", id="app.command",
                tooltip="Command mode: :nodes, :models, :logs, :chat NODE, :chats, :quit"),
        Binding("ctrl+p", "command_palette", "Palette", show=False, id="app.palette",
                tooltip="Nodes, models, actions and themes"),
        Binding("o", "gateway", "Gateway", show=False, id="app.gateway",
                tooltip="The OpenAI gateway for every node: URL, key, traffic, start/stop"),
    ]

    def __init__(self, config: Config, source: NodeSource, links: NodeLinks | None = None,
                 poll: bool = True, save_theme: bool = True,
                 clock: Callable[[], float] = time.time,
                 gateway: GatewayControl | None = None) -> None:
        super().__init__()
        self._gateway = gateway
        self.config = config
        self.source = source
        self.links = links
        if links is not None and links.report is None:
            links.report = self._link_note
        self.poll_enabled = poll
        self.save_theme = save_theme
        self.fleet = Fleet(config, source, self, frame_s=config.settings.dashboard_frame_s,
                           clock=clock)
        source.on_connecting = self.fleet.set_activity
        self._polling: set[str] = set()
        self._chats: ChatStore | None = None
        self._splits: HeldSplits | None = None
        self.dashboard = DashboardScreen(self.fleet)

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
        # Two frames in, not one: a collection right after the first frame held the footer
        # (composed once the bindings are known) back by 100-150 ms.
        self.call_after_refresh(self.call_after_refresh, self._freeze_startup_objects)
        if self.poll_enabled:
            for name in self.config.names():
                self.start_polling(name)
        if self.config.settings.gateway_autostart:
            self.run_worker(self._autostart_gateway(), group="gateway-toggle",
                            exit_on_error=False, name="gateway autostart")

    def _freeze_startup_objects(self) -> None:
        """After start-up, take what it built out of the cyclic GC's scans.

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
        self.run_worker(self._save_theme, thread=True, group="save-theme", exclusive=True,
                        exit_on_error=False)

    def _save_theme(self) -> None:
        """In a thread: `save_config` takes the registry's file lock (principle 3)."""
        try:
            save_config(self.config)
        except OSError as exc:
            self.call_from_thread(self.notify, f"Could not save the theme choice: {exc}",
                                  severity="warning")

    @property
    def chats(self) -> ChatStore:
        """The saved conversations (SQLite in the data dir), opened on first use."""
        if self._chats is None:
            from rbee_tui.chat_store import ChatStore

            self._chats = ChatStore.open_default()
        return self._chats

    async def _on_key(self, event: events.Key) -> None:
        if redirect_early_key(self, event):  # typed for the form that just opened (B173)
            event.prevent_default()  # Textual's own key handling is not run for it

    # ------------------------------------------------------------------ polling

    def snapshot(self, name: str) -> NodeSnapshot:
        return self.fleet.snapshot(name)

    def start_polling(self, name: str) -> None:
        if name in self._polling:
            return
        self._polling.add(name)
        self.poll_now(name)

    def poll_now(self, name: str) -> None:
        # A coroutine function, not a coroutine: a poll asked for while the app closes is
        # simply never started (a coroutine object would be left never awaited).
        async def poll() -> None:
            await self._poll(name)

        # (Textual types a coroutine function's coroutine as Coroutine[None, None, T].)
        self.run_worker(poll, group=f"poll-{name}",  # type: ignore[arg-type]
                        exclusive=True, exit_on_error=False, name=f"poll {name}")

    @on(PollNow)
    def _poll_requested(self, message: PollNow) -> None:
        self.poll_now(message.node)

    async def _poll(self, name: str) -> None:
        snapshot = await self.source.poll(name)
        self.fleet.apply(snapshot)
        if name in self._polling:
            self.set_timer(self.config.settings.poll_interval_s, lambda: self._next_poll(name))

    def _next_poll(self, name: str) -> None:
        if name not in self._polling or not self.is_running or not self.screen_stack:
            return
        if isinstance(self.screen, ModalScreen):  # paused while a form is open
            self.set_timer(0.5, lambda: self._next_poll(name))
            return
        self.poll_now(name)

    # ------------------------------------------------------------------ errors (B78)

    @on(Worker.StateChanged)
    def _worker_failed(self, event: Worker.StateChanged) -> None:
        if event.state != WorkerState.ERROR or event.worker.error is None:
            return
        self.show_error(event.worker.error)

    def show_error(self, error: BaseException) -> None:
        notify_error(self, error)

    # ------------------------------------------------------------------ navigation

    def selected_node(self) -> str:
        return self.dashboard.selected_node() or self.config.names()[0]

    def select_node(self, name: str) -> None:
        from rbee_tui.widgets.tables import NodesTable

        self.dashboard.query_one(NodesTable).select_key(name)

    def help_sections(self) -> list[tuple[str, list[KeyRow]]]:
        """The screen's own keys first (lazygit's per-panel hints), then the global ones
        that the screen does not take for itself."""
        seen: set[str] = set()
        taken: set[str] = set()

        def rows(bindings: list[object]) -> list[KeyRow]:
            out: list[KeyRow] = []
            for binding in bindings:
                if not isinstance(binding, Binding) or not binding.id or binding.id in seen:
                    continue
                seen.add(binding.id)
                keys = [k.strip() for k in binding.key.split(",") if k.strip() not in taken]
                if not keys:
                    continue
                taken.update(keys)
                shown = ", ".join(self.get_key_display(Binding(k, "")) for k in keys)
                out.append((shown, binding.description, binding.tooltip))
            return out

        screen = self.screen
        title = getattr(screen, "HELP_TITLE", type(screen).__name__.replace("Screen", ""))
        focused = list(getattr(screen.focused, "HELP_BINDINGS", []))
        here = rows([*focused, *screen.BINDINGS])
        return [(f"On this screen: {title}", here), ("Everywhere", rows(list(self.BINDINGS)))]

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            return
        self.push_screen(HelpScreen(self.help_sections()))

    def action_command(self) -> None:
        from rbee_tui.commands import completions

        if isinstance(self.screen, ModalScreen):
            return
        self.push_screen(CommandScreen(completions(self.config.names())), self.run_command)

    def run_command(self, line: str | None) -> None:
        from rbee_tui.commands import parse

        if not line or not line.strip(":").strip():
            return
        try:
            command = parse(line, self.config.names(), self.selected_node())
        except RbeeError as err:
            self.show_error(err)
            return
        self._run_verb(command.verb, command.node or self.selected_node(), command.arg)

    def _run_verb(self, verb: str, node: str, arg: str | None) -> None:
        """One parsed `:` command: where it goes (B167)."""
        match verb:
            case "nodes" | "workers":
                self.back_to_dashboard()
                if verb == "workers":
                    self.select_node(node)
                self.dashboard.focus_table(verb)
            case "models":
                self.open_models(node)
            case "logs":
                self.open_logs(node)
            case "chat":
                self.open_chat(node, arg)
            case "chats":
                self.action_chats()
            case "gateway":
                self.action_gateway()
            case "add":
                self.action_add_node()
            case "theme":
                self.switch_theme(arg or "")
            case "help":
                self.action_help()
            case "quit":
                self.exit()

    def switch_theme(self, name: str) -> None:
        if name in self.available_themes:
            self.theme = name
            return
        self.notify(f"No theme '{name}'. Themes: {', '.join(sorted(self.available_themes))}",
                    severity="warning")

    def back_to_dashboard(self) -> None:
        while len(self.screen_stack) > 2 and self.screen is not self.dashboard:
            self.pop_screen()

    def action_chat(self) -> None:
        self.open_chat(self.selected_node())

    @on(OpenChat)
    def _chat_requested(self, message: OpenChat) -> None:
        self.open_chat(message.node, message.model, message.conversation_id)

    def open_chat(self, node: str, model: str | None = None,
                  conversation_id: int | None = None) -> None:
        from rbee_tui.screens.chat import ChatScreen

        if isinstance(self.screen, ChatScreen):
            self.pop_screen()
        self.push_screen(ChatScreen(self.fleet, self.chats, node, model, conversation_id,
                                    router=self.router))

    def action_chats(self) -> None:
        from rbee_tui.screens.chat_list import ChatListScreen

        self.push_screen(ChatListScreen(self.chats))

    def action_models(self) -> None:
        self.open_models(self.selected_node())

    def open_models(self, node: str) -> None:
        from rbee_tui.screens.models import ModelsScreen

        self.push_screen(ModelsScreen(self.fleet, node))

    def action_logs(self) -> None:
        self.open_logs(self.selected_node())

    def open_logs(self, node: str) -> None:
        from rbee_tui.screens.logs import LogsScreen

        self.push_screen(LogsScreen(self.fleet, node))

    # ------------------------------------------------------------------ gateway (B195)

    @property
    def gateway(self) -> GatewayControl:
        """The OpenAI gateway of this dashboard, stopped until asked (or autostarted)."""
        if self._gateway is None:
            from rbee_gateway.inprocess import InProcessGateway

            self._gateway = InProcessGateway(self.config, self._links())
        return self._gateway

    def router(self) -> RoutingFleet:
        """The gateway's routing, for the "any node" chat (B197)."""
        return self.gateway.router()

    def action_gateway(self) -> None:
        from rbee_tui.screens.gateway import GatewayScreen

        if not isinstance(self.screen, GatewayScreen):
            self.push_screen(GatewayScreen(self.gateway))

    async def _autostart_gateway(self) -> None:
        try:
            await self.gateway.start()
        except RbeeError as err:
            self.notify(f"The gateway did not start: {err.message}\n{err.hint or ''}",
                        title="Gateway", severity="warning", timeout=12)
            return
        self.notify(f"Gateway running on {self.gateway.status().url} (o: its key and "
                    "traffic)", title="Gateway")

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
        """The form saved the node (ops.nodes.add/edit): show it and poll it."""
        if node is None:
            return
        self.notify(f"Node '{node.name}' saved.")
        if node.name not in self._polling:
            self.fleet.registry_changed()
        self.start_polling(node.name)
        self.poll_now(node.name)

    def action_delete_node(self) -> None:
        name = self.selected_node()
        if self.config.node(name).is_local:
            self.notify("localhost is always a node; it cannot be removed.", severity="warning")
            return

        def done(yes: bool | None) -> None:
            if yes:
                self.run_worker(self._remove_node(name), group="node-remove",
                                exit_on_error=False, name=f"remove {name}")

        self.push_screen(ConfirmScreen(f"Remove node '{name}' from the registry?\n"
                                       "Its agent and workers keep running on the node.",
                                       yes="Remove"), done)

    async def _remove_node(self, name: str) -> None:
        """`rbee nodes remove`'s operation; the registry is written off the UI loop."""
        from rbee_tui.ops import nodes as node_ops

        message = await asyncio.to_thread(node_ops.remove, self.config, name)
        self._polling.discard(name)
        self.fleet.forget(name)
        self.notify(message[:1].upper() + message[1:])

    def action_install_agent(self) -> None:
        from rbee_tui.screens.install import InstallScreen

        node = self.config.node(self.selected_node())
        if node.is_local:
            self.notify("localhost runs the agent from this installation.", severity="warning")
            return
        info = self.fleet.snapshot(node.name).info
        self.push_screen(InstallScreen(self.config, node, info), self._installed)

    def _installed(self, node: Node | None) -> None:
        """The install saved the node's key itself (ops.nodes.install): poll it now."""
        if node is not None:
            self.poll_now(node.name)

    def action_toggle_agent(self) -> None:
        name = self.selected_node()
        snapshot = self.fleet.snapshot(name)
        up = snapshot.status == "up"
        if not up:
            self._run_toggle(name, up)
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self._run_toggle(name, up)

        self.push_screen(ConfirmScreen(agent_stop_question(name, snapshot), yes="Stop"),
                         answered)

    def _run_toggle(self, name: str, up: bool) -> None:
        self.run_worker(self._toggle_agent(name, up), group="agent-control",
                        exit_on_error=False, name=f"agent {name}")

    async def _toggle_agent(self, name: str, up: bool) -> None:
        from rbee_tui.ops import nodes as node_ops

        self.fleet.set_activity(name, "stopping agent…" if up else "starting agent…", hold=True)
        try:
            flow = node_ops.stop_agent if up else node_ops.start_agent
            message = await self._drain(flow(self.config, self.config.node(name)))
        finally:
            self.fleet.clear_activity(name)
        self.notify(message)
        self.poll_now(name)

    async def _drain(self, flow: AsyncIterator[Event]) -> str:
        """Run an operation for its outcome: the message of its Finished (said only once
        the agent proved it is the one asked for, B140); its notes as notifications."""
        message = ""
        async for event in flow:
            if isinstance(event, Finished):
                message = event.message
            else:
                self._link_note(event)
        return message

    def _link_note(self, event: Event) -> None:
        """A note no dialog is there to show (a poll found the local agent's port moved):
        a notification, so it is not lost (B177). Other steps of a poll stay quiet."""
        if isinstance(event, Note):
            self.notify(event.message, title="Note")

    # ------------------------------------------------------------------ workers (B74)

    def action_spawn_worker(self) -> None:
        from rbee_tui.screens.spawn import SpawnScreen

        self.push_screen(SpawnScreen(self.fleet, self.selected_node(), self.splits))

    @property
    def splits(self) -> HeldSplits:
        """The split workers this dashboard holds the tunnels of (B211), made on first use."""
        if self._splits is None:
            from rbee_tui.held_splits import HeldSplits

            self._splits = HeldSplits(self.config, self._links, self._split_ended)
        return self._splits

    def _split_ended(self, split: SplitWorker, error: RbeeError | None) -> None:
        if error is None:
            self.notify(f"Split {split.describe()} stopped; its RPC servers are stopped too.",
                        title="Split")
        else:
            self.show_error(error)
        for node in split.spec.nodes:
            self.poll_now(node)

    def _links(self) -> NodeLinks:
        if self.links is None:
            self.links = NodeLinks(self.config)
        return self.links

    async def on_unmount(self) -> None:
        gc.unfreeze()
        if self._splits is not None:  # before the links its tunnels run over
            await self._splits.aclose()
        if self._chats is not None:
            self._chats.close()
        if self._gateway is not None:
            await self._gateway.aclose()
        close = getattr(self.source, "aclose", None)
        if close is not None:
            await close()
        if self.links is not None:
            await self.links.aclose()


def agent_stop_question(name: str, snapshot: NodeSnapshot) -> str:
    """The confirmation for `s` on a running agent, with what stops with it (B169)."""
    workers = snapshot.workers
    if not workers:
        return f"Stop the agent on {name}?\nNo worker is running; nothing else stops."
    busy = [w for w in workers if w.state == "busy" or w.active_requests]
    models = ", ".join(sorted({w.model_id for w in workers}))
    lines = [f"Stop the agent on {name}?",
             f"Its {len(workers)} worker(s) stop with it ({models})."]
    if busy:
        requests = sum(max(1, w.active_requests) for w in busy)
        lines.append(f"{requests} request(s) in progress will be cut off.")
    return "\n".join(lines)


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
