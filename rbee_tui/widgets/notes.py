"""What a node's row says to do about it (B171): short, in the dashboard's own keys.

A failed poll carries the error's code; these notes turn it into the next step a newcomer
can take from the keyboard. The full message and hint are in the node's detail pane.
"""

from __future__ import annotations

from rbee_tui.node_source import NodeSnapshot

_REMOTE = {
    "INVALID_API_KEY": "the agent's key does not match: press i to reinstall or e to fix the key",
    "MISSING_API_KEY": "no API key for this agent: press i to install it (a key is made)",
    "AGENT_NOT_INSTALLED": "no agent installed: press i to install it",
    "VERSION_MISMATCH": "agent of another rbee version: press i to install this one",
    "AGENT_UNREACHABLE": "agent not answering: press s to start it, l for its last log lines",
    "CONNECTION_FAILED": "agent not answering: press s to start it, l for its last log lines",
    "SSH_AUTH_FAILED": "SSH login refused: press e to fix the user or key",
    "SSH_KEY_MISSING": "the key file is missing: press e to pick another",
    "SSH_UNREACHABLE": "host unreachable over SSH: press e to check host and port",
    "SSH_HOST_KEY_UNKNOWN": "host key not trusted yet: press e, then Test & save to check it",
    "SSH_HOST_KEY_CHANGED": "host key CHANGED: check the node before trusting it again",
    "INVALID_CONFIG": "node settings incomplete: press e to fix them or i to install",
    "TIMEOUT": "no answer in time: press l for its last log lines, s to restart",
    "MALFORMED_REPLY": "something else answers on the agent port: press e to check it",
}

_LOCAL = {
    "AGENT_UNREACHABLE": "local agent did not start: press l for its log, s to try again",
    "CONNECTION_FAILED": "local agent not answering: press s to start it",
    "TIMEOUT": "local agent not answering: press l for its log, s to restart",
}


def note_for(snapshot: NodeSnapshot, local: bool, activity: str | None = None) -> str:
    """The NOTE cell: what is being done to the node, or what to do about it."""
    if activity:
        return activity
    if snapshot.status != "down":
        return ""
    code = snapshot.code or ""
    note = (_LOCAL.get(code) if local else None) or _REMOTE.get(code)
    if note:
        return note
    return (snapshot.reason or "no answer") + ": press l for its log lines"
