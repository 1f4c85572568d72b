"""B167: the `:` command line's grammar (parsing alone; the app runs it in test_tui_dashboard)."""

from __future__ import annotations

import pytest

from rbee_agent.protocol import RbeeError
from rbee_tui.commands import Command, completions, parse

NODES = ["localhost", "gpu1", "lab-a100"]


@pytest.mark.parametrize(("line", "expected"), [
    (":models gpu1", Command("models", "gpu1")),
    ("models", Command("models", "localhost")),  # no node: the selected one
    (":logs lab-a100", Command("logs", "lab-a100")),
    (":chat gpu1 qwen2.5-7b", Command("chat", "gpu1", "qwen2.5-7b")),
    (":nodes", Command("nodes")),
    (":q", Command("quit")),
    (":theme rbee-light", Command("theme", None, "rbee-light")),
    ("  :WO gpu1 ", Command("workers", "gpu1")),
])
def test_b167_commands_parse(line: str, expected: Command) -> None:
    assert parse(line, NODES, "localhost") == expected


def test_b167_a_typo_gets_did_you_mean() -> None:
    with pytest.raises(RbeeError) as verb:
        parse(":modles gpu1", NODES, "localhost")
    assert verb.value.message == "Unknown command ':modles'" and verb.value.hint == (
        "Did you mean :models?")
    with pytest.raises(RbeeError) as node:
        parse(":logs gpu2", NODES, "localhost")
    assert "not in the registry" in node.value.message and node.value.hint == (
        "Did you mean gpu1?")
    with pytest.raises(RbeeError, match="Type a command"):
        parse(":", NODES, None)


def test_b167_completions_know_the_nodes() -> None:
    suggestions = completions(NODES)
    assert ":models gpu1" in suggestions and ":chat lab-a100" in suggestions
    assert ":nodes" in suggestions and ":nodes gpu1" not in suggestions
