"""A node's model catalog (B73): list, filter, add (download or a file on the node), delete,
chat with one."""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Footer, Input

from rbee_tui.fleet import Fleet
from rbee_tui.messages import OpenChat
from rbee_tui.screens.base import ESSENTIAL, RbeeScreen
from rbee_tui.screens.modals import ConfirmScreen
from rbee_tui.widgets.tables import KeyedTable
from rbee_tui.widgets.top_bar import TopBar


class ModelsTable(KeyedTable):
    COLUMNS = ("ID", "PROVIDER", "SIZE MB", "QUANT", "ARCH", "LAYERS", "CONTEXT")
    FILTERED = ("ID", "PROVIDER", "QUANT", "ARCH")


class ModelsScreen(RbeeScreen[None]):
    HELP_TITLE = "Models"
    BINDINGS = [
        *ESSENTIAL,
        Binding("escape,q", "back", "Back", id="models.back",
                tooltip="Clear the filter, or go back to the dashboard"),
        Binding("c,enter", "chat", "Chat", id="models.chat",
                tooltip="Chat with the selected model"),
        Binding("n", "download", "Add", id="models.download",
                tooltip="Add a model: download hf:org/repo, or register file:///path.gguf"),
        Binding("d", "delete", "Delete", id="models.delete",
                tooltip="Delete the selected model from the node (asks first)"),
        Binding("slash", "filter", "Filter", id="models.filter",
                tooltip="Show only models whose row contains some text"),
        Binding("r", "reload", "Reload", id="models.reload", tooltip="Read the catalog again"),
        Binding("j", "cursor('down')", "Down", show=False, id="models.down", tooltip="Next"),
        Binding("k", "cursor('up')", "Up", show=False, id="models.up", tooltip="Previous"),
    ]

    def __init__(self, fleet: Fleet, node: str) -> None:
        super().__init__()
        self.fleet = fleet
        self.node = node

    def crumbs(self) -> list[str]:
        return [self.node, "models"]

    def compose(self) -> ComposeResult:
        yield TopBar()
        yield Input(id="filter", classes="filter")
        yield ModelsTable(id="models")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#filter", Input).display = False
        self.query_one(ModelsTable).border_title = f"Models on {self.node}"
        self.action_reload()

    @work(exclusive=True, group="models", exit_on_error=False)
    async def action_reload(self) -> None:
        reply = await self.fleet.source.models(self.node)
        table = self.query_one(ModelsTable)
        table.sync([
            (m.id, [m.id, m.provider, str(m.size_bytes // 1024 // 1024), m.quantization,
                    m.architecture, str(m.layers), str(m.context_length)])
            for m in reply.models])
        self.top_bar().status = f"{len(reply.models)} models"
        table.focus()

    def action_back(self) -> None:
        if not self.clear_filter():
            self.app.pop_screen()

    def action_cursor(self, direction: str) -> None:
        table = self.query_one(ModelsTable)
        (table.action_cursor_down if direction == "down" else table.action_cursor_up)()

    @on(DataTable.RowSelected)
    def _row_chosen(self) -> None:
        self.action_chat()

    def action_chat(self) -> None:
        model = self.query_one(ModelsTable).selected_key()
        if model:
            self.app.post_message(OpenChat(self.node, model))

    def action_download(self) -> None:
        from rbee_tui.screens.download import DownloadScreen

        def done(added: bool | None) -> None:
            if added:
                self.action_reload()

        self.app.push_screen(DownloadScreen(self.fleet, self.node), done)

    def action_delete(self) -> None:
        model = self.query_one(ModelsTable).selected_key()
        if model is None:
            return

        def done(yes: bool | None) -> None:
            if yes:
                self._delete(model)

        users = [w.id for w in self.fleet.snapshot(self.node).workers if w.model_id == model]
        impact = (f"\nWorker(s) {', '.join(users)} use it: stop them first." if users else
                  "\nA downloaded file is deleted from the node's disk.")
        self.app.push_screen(ConfirmScreen(f"Delete model {model} from {self.node}?{impact}",
                                           yes="Delete"), done)

    @work(group="models-delete", exit_on_error=False)
    async def _delete(self, model: str) -> None:
        client = await self.fleet.source.client(self.node)
        await client.delete_model(model)
        self.notify(f"Model {model} deleted from {self.node}.")
        self.action_reload()
