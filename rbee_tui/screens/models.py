"""A node's model catalog (B73): name, size, quantization, architecture; delete with confirm."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Footer, Header, Label

from rbee_tui.screens.base import RbeeScreen
from rbee_tui.screens.modals import ConfirmScreen
from rbee_tui.widgets.tables import KeyedTable

if TYPE_CHECKING:
    from rbee_tui.app import RbeeApp


class ModelsTable(KeyedTable):
    COLUMNS = ("ID", "PROVIDER", "SIZE MB", "QUANT", "ARCH", "LAYERS", "CONTEXT")

    def on_mount(self) -> None:
        self.cursor_type = "row"
        for column in self.COLUMNS:
            self.add_column(column, key=column)


class ModelsScreen(RbeeScreen[None]):
    BINDINGS = [
        Binding("escape,q", "app.pop_screen", "Back", id="models.back",
                tooltip="Back to the dashboard"),
        Binding("d", "delete", "Delete", id="models.delete",
                tooltip="Delete the selected model from the node (asks first)"),
        Binding("n", "download", "Download", id="models.download",
                tooltip="Download a model from Hugging Face to this node"),
        Binding("c,enter", "chat", "Chat", id="models.chat",
                tooltip="Chat with the selected model"),
        Binding("r", "reload", "Reload", id="models.reload", tooltip="Read the catalog again"),
        Binding("j", "cursor('down')", "Down", show=False, id="models.down", tooltip="Next"),
        Binding("k", "cursor('up')", "Up", show=False, id="models.up", tooltip="Previous"),
    ]

    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    @property
    def rbee(self) -> RbeeApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Label(f"Models on {self.node}", id="models-title")
        yield ModelsTable(id="models")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"models on {self.node}"
        self.action_reload()

    @work(exclusive=True, group="models", exit_on_error=False)
    async def action_reload(self) -> None:
        reply = await self.rbee.source.models(self.node)
        self.query_one(ModelsTable).sync([
            (m.id, [m.id, m.provider, str(m.size_bytes // 1024 // 1024), m.quantization,
                    m.architecture, str(m.layers), str(m.context_length)])
            for m in reply.models])
        self.query_one(ModelsTable).focus()

    def action_cursor(self, direction: str) -> None:
        table = self.query_one(ModelsTable)
        (table.action_cursor_down if direction == "down" else table.action_cursor_up)()

    def action_chat(self) -> None:
        model = self.query_one(ModelsTable).selected_key()
        if model:
            self.rbee.open_chat(self.node, model)

    def action_download(self) -> None:
        from rbee_tui.screens.download import DownloadScreen

        def done(downloaded: bool | None) -> None:
            if downloaded:
                self.action_reload()

        self.app.push_screen(DownloadScreen(self.node), done)

    def action_delete(self) -> None:
        model = self.query_one(ModelsTable).selected_key()
        if model is None:
            return

        def done(yes: bool | None) -> None:
            if yes:
                self._delete(model)

        self.app.push_screen(ConfirmScreen(f"Delete model {model} from {self.node}?",
                                           yes="Delete"), done)

    @work(group="models-delete", exit_on_error=False)
    async def _delete(self, model: str) -> None:
        client = await self.rbee.source.client(self.node)
        await client.delete_model(model)
        self.notify(f"Model {model} deleted from {self.node}.")
        self.action_reload()
