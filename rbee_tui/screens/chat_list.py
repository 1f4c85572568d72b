"""Saved conversations (B160): reopen, rename, delete, export as Markdown; `/` filters."""

from __future__ import annotations

import re
import time
from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Footer, Input

from rbee_tui.chat_store import ChatStore, Conversation
from rbee_tui.messages import OpenChat
from rbee_tui.screens.base import ESSENTIAL, RbeeScreen
from rbee_tui.screens.modals import ConfirmScreen, PromptScreen
from rbee_tui.widgets.tables import KeyedTable
from rbee_tui.widgets.top_bar import TopBar


class ChatsTable(KeyedTable):
    COLUMNS = ("TITLE", "NODE", "MODEL", "MESSAGES", "LAST USED")
    FILTERED = ("TITLE", "NODE", "MODEL")


def export_path(conversation: Conversation) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", conversation.title.lower()).strip("-")[:40] or "chat"
    return Path.home() / f"rbee-chat-{conversation.id}-{slug}.md"


class ChatListScreen(RbeeScreen[None]):
    HELP_TITLE = "Saved chats"
    BINDINGS = [
        *ESSENTIAL,
        Binding("escape", "back", "Back", id="chats.back",
                tooltip="Clear the filter, or go back"),
        Binding("enter", "open", "Open", id="chats.open", tooltip="Reopen the conversation"),
        Binding("r", "rename", "Rename", id="chats.rename", tooltip="Give it another title"),
        Binding("d", "delete", "Delete", id="chats.delete",
                tooltip="Delete the conversation (asks first)"),
        Binding("e", "export", "Export", id="chats.export",
                tooltip="Write it to a Markdown file"),
        Binding("slash", "filter", "Filter", id="chats.filter",
                tooltip="Show only chats whose title, node or model contains some text"),
    ]

    def __init__(self, store: ChatStore) -> None:
        super().__init__()
        self.store = store
        self.conversations: dict[str, Conversation] = {}

    def crumbs(self) -> list[str]:
        return ["chats"]

    def compose(self) -> ComposeResult:
        yield TopBar()
        yield Input(id="filter", classes="filter")
        yield ChatsTable(id="chats")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#filter", Input).display = False
        self.reload()
        self.query_one(ChatsTable).focus()

    def reload(self) -> None:
        rows = []
        self.conversations = {}
        for c in self.store.list():
            key = str(c.id)
            self.conversations[key] = c
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(c.updated_at))
            rows.append((key, [c.title or "(untitled)", c.node, c.model, str(c.message_count),
                               when]))
        table = self.query_one(ChatsTable)
        table.sync(rows)
        self.top_bar().status = f"{len(rows)} saved chats"

    def selected(self) -> Conversation | None:
        key = self.query_one(ChatsTable).selected_key()
        return self.conversations.get(key) if key else None

    def action_back(self) -> None:
        if not self.clear_filter():
            self.app.pop_screen()

    @on(DataTable.RowSelected)
    def _row_chosen(self) -> None:
        self.action_open()

    def action_open(self) -> None:
        chosen = self.selected()
        if chosen is not None:
            self.app.pop_screen()
            self.app.post_message(OpenChat(chosen.node, chosen.model, chosen.id))

    def action_rename(self) -> None:
        chosen = self.selected()
        if chosen is None:
            return

        def renamed(title: str | None) -> None:
            if title:
                self.store.rename(chosen.id, title)
                self.reload()

        self.app.push_screen(PromptScreen("Rename this chat", chosen.title, "Title"), renamed)

    def action_delete(self) -> None:
        chosen = self.selected()
        if chosen is None:
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.store.delete(chosen.id)
                self.reload()
                self.notify(f"Chat '{chosen.title}' deleted.")

        self.app.push_screen(ConfirmScreen(
            f"Delete the chat '{chosen.title}'?\nIts {chosen.message_count} messages are "
            "removed for good.", yes="Delete"), answered)

    def action_export(self) -> None:
        chosen = self.selected()
        if chosen is None:
            return

        def write(target: str | None) -> None:
            if not target:
                return
            path = Path(target).expanduser()
            try:
                path.write_text(self.store.get(chosen.id).to_markdown())
            except OSError as exc:
                self.notify(f"Could not write {path}: {exc.strerror or exc}",
                            title="Export", severity="error")
                return
            self.notify(f"Saved to {path}", title="Export")

        self.app.push_screen(PromptScreen("Export this chat as Markdown",
                                          str(export_path(chosen)), "File"), write)
