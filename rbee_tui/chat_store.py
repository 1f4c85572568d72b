"""Saved conversations (B160): SQLite in the data dir, one row per chat and per message.

A conversation belongs to a node and a model, has a title (its first question until
renamed), a system prompt and its own sampling settings. The chat pane writes each message
as it is sent or finished, so quitting, a crash or Esc loses nothing. WAL mode with
`synchronous=NORMAL`: a commit appends to the log without waiting for the disk, which keeps
each write well under a millisecond on the UI's loop (the database is local and small).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import platformdirs

from rbee_agent.protocol import ChatMessage, ErrorCode, RbeeError
from rbee_tui.config import APP, CONFIG_ENV

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY,
    node TEXT NOT NULL,
    model TEXT NOT NULL,
    title TEXT NOT NULL DEFAULT '',
    system_prompt TEXT NOT NULL DEFAULT '',
    settings TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
CREATE INDEX IF NOT EXISTS conversations_by_target ON conversations(node, model, updated_at);
"""

TITLE_CHARS = 48


def data_dir() -> Path:
    """Where rbee keeps what it makes for you (chats): beside `$RBEE_CONFIG`'s file, else
    the XDG data dir."""
    override = os.environ.get(CONFIG_ENV)
    if override:
        return Path(override).expanduser().parent / "data"
    return Path(platformdirs.user_data_dir(APP))


@dataclass
class ChatSettings:
    """Per-chat sampling settings; the bounds are the worker's (B57)."""

    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int | None = None

    @classmethod
    def from_json(cls, text: str) -> ChatSettings:
        data = json.loads(text or "{}")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class Conversation:
    id: int  # 0 for a draft not saved yet
    node: str
    model: str
    title: str = ""
    system_prompt: str = ""
    settings: ChatSettings = field(default_factory=ChatSettings)
    created_at: float = 0.0
    updated_at: float = 0.0
    messages: list[ChatMessage] = field(default_factory=list)
    message_count: int = 0

    def to_markdown(self) -> str:
        """The conversation as a Markdown document (export)."""
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.created_at))
        out = [f"# {self.title or 'Chat'}", "",
               f"*{self.model} on {self.node}, {when}*", ""]
        if self.system_prompt:
            out += ["> **System:** " + self.system_prompt.replace("\n", "\n> "), ""]
        for message in self.messages:
            who = "You" if message.role == "user" else message.role.capitalize()
            if message.role == "assistant":
                who = self.model
            out += [f"## {who}", "", message.content.rstrip(), ""]
        return "\n".join(out).rstrip() + "\n"


def title_of(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1] + "…"


class ChatStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        os.chmod(path, 0o600)  # what you asked a model can be private

    @classmethod
    def open_default(cls) -> ChatStore:
        return cls(data_dir() / "chats.sqlite")

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ writing

    def _insert(self, conversation: Conversation) -> None:
        """Give a draft (id 0) its row: a chat is saved with its first message, so opening
        the chat pane and leaving leaves no empty conversations behind."""
        now = time.time()
        cursor = self.db.execute(
            "INSERT INTO conversations (node, model, title, system_prompt, settings, "
            "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (conversation.node, conversation.model, conversation.title,
             conversation.system_prompt, json.dumps(asdict(conversation.settings)), now, now))
        assert cursor.lastrowid is not None
        conversation.id = cursor.lastrowid
        conversation.created_at = conversation.updated_at = now

    def add_message(self, conversation: Conversation, message: ChatMessage) -> None:
        if not conversation.id:
            self._insert(conversation)
        now = time.time()
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute(
                "INSERT INTO messages (conversation_id, role, content, created_at) "
                "VALUES (?, ?, ?, ?)", (conversation.id, message.role, message.content, now))
            if not conversation.title and message.role == "user":
                conversation.title = title_of(message.content)
            self.db.execute("UPDATE conversations SET title = ?, updated_at = ? WHERE id = ?",
                            (conversation.title, now, conversation.id))
        conversation.messages.append(message)
        conversation.message_count += 1
        conversation.updated_at = now

    def save_settings(self, conversation: Conversation) -> None:
        if not conversation.id:
            return  # a draft: saved with its first message
        self.db.execute(
            "UPDATE conversations SET system_prompt = ?, settings = ?, node = ?, model = ?, "
            "updated_at = ? WHERE id = ?",
            (conversation.system_prompt, json.dumps(asdict(conversation.settings)),
             conversation.node, conversation.model, time.time(), conversation.id))

    def rename(self, conversation_id: int, title: str) -> None:
        self.db.execute("UPDATE conversations SET title = ? WHERE id = ?",
                        (title_of(title), conversation_id))

    def delete(self, conversation_id: int) -> None:
        self.db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    # ------------------------------------------------------------------ reading

    def _conversation(self, row: sqlite3.Row, count: int = 0) -> Conversation:
        return Conversation(row["id"], row["node"], row["model"], row["title"],
                            row["system_prompt"], ChatSettings.from_json(row["settings"]),
                            row["created_at"], row["updated_at"], message_count=count)

    def get(self, conversation_id: int) -> Conversation:
        row = self.db.execute("SELECT * FROM conversations WHERE id = ?",
                              (conversation_id,)).fetchone()
        if row is None:
            raise RbeeError(ErrorCode.NOT_FOUND, f"No saved chat {conversation_id}",
                            hint="It may have been deleted; :chats lists the saved ones.")
        conversation = self._conversation(row)
        conversation.messages = [
            ChatMessage(role=m["role"], content=m["content"]) for m in self.db.execute(
                "SELECT role, content FROM messages WHERE conversation_id = ? ORDER BY id",
                (conversation_id,))]
        conversation.message_count = len(conversation.messages)
        return conversation

    def latest(self, node: str, model: str) -> Conversation | None:
        """The chat last used on this node and model, to reopen it where you left it."""
        row = self.db.execute(
            "SELECT id FROM conversations WHERE node = ? AND model = ? "
            "ORDER BY updated_at DESC, id DESC LIMIT 1", (node, model)).fetchone()
        return None if row is None else self.get(row["id"])

    def list(self) -> list[Conversation]:
        """Every conversation with its message count, most recent first (no messages)."""
        rows = self.db.execute(
            "SELECT c.*, (SELECT count(*) FROM messages m WHERE m.conversation_id = c.id) "
            "AS n FROM conversations c ORDER BY c.updated_at DESC, c.id DESC").fetchall()
        return [self._conversation(row, row["n"]) for row in rows]
