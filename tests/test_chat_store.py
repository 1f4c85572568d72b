"""B160: saved conversations in SQLite (the store alone; the chat pane is in test_tui_chat)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from rbee_agent.protocol import ChatMessage, RbeeError
from rbee_tui.chat_store import ChatSettings, ChatStore, Conversation, data_dir


def say(store: ChatStore, conversation: Conversation, role: str, text: str) -> None:
    store.add_message(conversation, ChatMessage(role=role, content=text))  # type: ignore[arg-type]


def test_b160_a_chat_is_saved_with_its_first_message_and_reopened_by_node_and_model(
    tmp_path: Path,
) -> None:
    path = tmp_path / "chats.sqlite"
    store = ChatStore(path)
    draft = Conversation(0, "gpu1", "qwen", system_prompt="Be brief.",
                         settings=ChatSettings(max_tokens=64, seed=7))
    assert store.list() == []  # a draft is not a saved chat
    say(store, draft, "user", "What is the capital of France?\nAnd of Spain?")
    say(store, draft, "assistant", "Paris, and Madrid.")
    store.close()

    again = ChatStore(path)  # another run of rbee
    latest = again.latest("gpu1", "qwen")
    assert latest is not None and latest.id == draft.id
    assert latest.title == "What is the capital of France? And of Spain?"
    assert [m.content for m in latest.messages] == ["What is the capital of France?\n"
                                                   "And of Spain?", "Paris, and Madrid."]
    assert latest.system_prompt == "Be brief."
    assert latest.settings == ChatSettings(max_tokens=64, seed=7)
    assert again.latest("gpu1", "other-model") is None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_b160_rename_delete_and_the_list_most_recent_first(tmp_path: Path) -> None:
    store = ChatStore(tmp_path / "chats.sqlite")
    first, second = Conversation(0, "a", "m"), Conversation(0, "b", "m")
    say(store, first, "user", "one")
    say(store, second, "user", "two")
    say(store, first, "assistant", "reply")  # first is now the most recently used
    assert [(c.title, c.message_count) for c in store.list()] == [("one", 2), ("two", 1)]
    store.rename(second.id, "Renamed")
    store.delete(first.id)
    assert [c.title for c in store.list()] == ["Renamed"]
    with pytest.raises(RbeeError, match="No saved chat"):
        store.get(first.id)


def test_b160_export_is_markdown_with_who_said_what(tmp_path: Path) -> None:
    store = ChatStore(tmp_path / "chats.sqlite")
    chat = Conversation(0, "gpu1", "qwen", system_prompt="Be brief.")
    say(store, chat, "user", "Hi")
    say(store, chat, "assistant", "Hello! **How** can I help?")
    text = store.get(chat.id).to_markdown()
    assert text.startswith("# Hi\n")
    assert "*qwen on gpu1," in text and "> **System:** Be brief." in text
    assert "## You\n\nHi\n" in text and "## qwen\n\nHello! **How** can I help?\n" in text


def test_b160_chats_live_in_the_data_dir_beside_the_config(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.setenv("RBEE_CONFIG", str(tmp_path / "profile" / "config.toml"))
    assert data_dir() == tmp_path / "profile" / "data"
    store = ChatStore.open_default()
    assert store.path == tmp_path / "profile" / "data" / "chats.sqlite"
