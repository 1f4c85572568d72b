"""The dashboard's `:` command mode, k9s-style (B167): parse a line into a `Command`.

Plain Python: the app executes what this returns. A mistyped verb or node gets a "did you
mean …?" from the known names.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

from rbee_agent.protocol import ErrorCode, RbeeError

# verb → (aliases, takes a node, help)
VERBS: dict[str, tuple[tuple[str, ...], bool, str]] = {
    "nodes": (("node", "dashboard", "no"), False, "the dashboard, cursor in the nodes table"),
    "workers": (("worker", "wo"), True, "the dashboard, cursor in a node's workers"),
    "models": (("model", "mo"), True, "a node's model catalog"),
    "logs": (("log", "lo"), True, "a node's agent and worker logs"),
    "chat": (("ch",), True, "chat on a node (:chat NODE [MODEL])"),
    "chats": (("conversations",), False, "saved conversations"),
    "gateway": (("gw", "serve"), False, "the OpenAI gateway: URL, key, traffic, start/stop"),
    "add": (("new",), False, "add a node"),
    "theme": ((), False, "switch theme (:theme NAME)"),
    "help": (("h", "?"), False, "every key"),
    "quit": (("q", "q!", "exit"), False, "leave rbee"),
}


@dataclass(frozen=True)
class Command:
    verb: str
    node: str | None = None
    arg: str | None = None


def _verb(word: str) -> str:
    for verb, (aliases, _, _) in VERBS.items():
        if word == verb or word in aliases:
            return verb
    known = [*VERBS, *(a for aliases, _, _ in VERBS.values() for a in aliases)]
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    hint = f"Did you mean :{_verb(close[0])}?" if close else (
        "Commands: " + ", ".join(f":{v}" for v in VERBS) + ".")
    raise RbeeError(ErrorCode.INVALID_REQUEST, f"Unknown command ':{word}'", hint=hint)


def _node(word: str, nodes: Sequence[str]) -> str:
    if word in nodes:
        return word
    close = difflib.get_close_matches(word, list(nodes), n=1, cutoff=0.5)
    hint = f"Did you mean {close[0]}?" if close else f"Nodes: {', '.join(nodes)}."
    raise RbeeError(ErrorCode.NODE_NOT_FOUND, f"Node '{word}' is not in the registry",
                    hint=hint)


def parse(line: str, nodes: Sequence[str], current: str | None) -> Command:
    """`:models gpu1` → Command('models', 'gpu1'); a verb that takes a node and gets none
    uses the selected one."""
    words = line.strip().lstrip(":").split()
    if not words:
        raise RbeeError(ErrorCode.INVALID_REQUEST, "Type a command after ':'",
                        hint="For example :models gpu1, :chat localhost, :nodes.")
    verb = _verb(words[0].lower())
    _, takes_node, _ = VERBS[verb]
    rest = words[1:]
    if takes_node:
        node = _node(rest[0], nodes) if rest else current
        return Command(verb, node, " ".join(rest[1:]) or None)
    return Command(verb, None, " ".join(rest) or None)


def completions(nodes: Sequence[str]) -> list[str]:
    """What the command line suggests as you type."""
    out = [f":{v}" for v in VERBS]
    out += [f":{v} {n}" for v, (_, takes, _) in VERBS.items() if takes for n in nodes]
    return out
