"""rbee's own known_hosts: which SSH host keys the operator has accepted (B01).

rbee checks host keys against `state_dir()/known_hosts`, never ~/.ssh/known_hosts, so its
trust decisions are its own. A key is added only after the operator accepted it (the
caller passes `accept_new_host_key=True`); a changed key is never accepted here: the
operator removes the old line by hand after finding out why it changed.

This module never deletes or rewrites a line of the file; it only appends.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import asyncssh

from rbee_agent.protocol import ErrorCode, RbeeError
from rbee_tui.config import Node, state_dir


def known_hosts_path() -> Path:
    return state_dir() / "known_hosts"


def known_hosts_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


class HostKeys:
    """rbee's known_hosts, as seen by one connection attempt.

    asyncssh asks `match` which keys are trusted for the host, then `validate` about a key
    that is not among them. What it saw tells an unknown host from a changed key.
    """

    def __init__(self, path: Path, accept_new: bool) -> None:
        self.path = path
        self.accept_new = accept_new
        self.recorded: list[asyncssh.SSHKey] = []
        self.offered: asyncssh.SSHKey | None = None
        self.accepted = False
        self._seen: tuple[str, int] | None = None
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = ""
        try:
            self._known = asyncssh.import_known_hosts(text)
        except (ValueError, asyncssh.KeyImportError) as exc:
            raise RbeeError(
                ErrorCode.INVALID_CONFIG,
                f"rbee's known_hosts file {path} cannot be read: {exc}",
                hint="Fix or remove the broken line; rbee will ask about the host key again.",
            ) from None

    def match(self, host: str, addr: str, port: int | None) -> tuple[list[Any], ...]:
        # host is what asyncssh connects to (a ~/.ssh/config HostName wins over an alias);
        # port is None for 22. The accepted key is recorded under the same name.
        self._seen = (host, port or 22)
        keys, ca_keys, revoked, *_ = self._known.match(host, addr, port)
        self.recorded = list(keys)
        return list(keys), list(ca_keys), list(revoked)

    def validate(self, key: asyncssh.SSHKey) -> bool:
        self.offered = key
        if self.recorded or not self.accept_new:
            return False
        self.accepted = True
        return True

    def remember(self) -> None:
        """Append the key the operator accepted (file mode 0600, folder created)."""
        if self.offered is None or self._seen is None:
            return
        host, port = self._seen
        algorithm, blob = self.offered.export_public_key("openssh").decode().split()[:2]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as fh:
            fh.write(f"{known_hosts_name(host, port)} {algorithm} {blob}\n")


def key_facts(key: asyncssh.SSHKey | None) -> dict[str, str]:
    if key is None:
        return {"key_type": "unknown", "fingerprint": "unknown"}
    return {"key_type": key.get_algorithm(), "fingerprint": key.get_fingerprint("sha256")}


def _key_file_kind(key_type: str) -> str:
    for kind in ("ed25519", "ecdsa", "rsa"):
        if kind in key_type:
            return kind
    return "*"


def host_key_error(node: Node, keys: HostKeys) -> RbeeError:
    """SSH_HOST_KEY_CHANGED when rbee knows another key for the host, else _UNKNOWN."""
    host = node.ssh_host or ""
    where = f"[{host}]:{node.ssh_port}" if ":" in host else f"{host}:{node.ssh_port}"
    details: dict[str, Any] = {"node": node.name, "host": host, "port": node.ssh_port,
                               "known_hosts": str(keys.path), **key_facts(keys.offered)}
    if keys.recorded:
        details["recorded"] = [key_facts(k) for k in keys.recorded]
        return RbeeError(
            ErrorCode.SSH_HOST_KEY_CHANGED,
            f"WARNING: the SSH host key of {where} has CHANGED "
            f"(now {details['key_type']} {details['fingerprint']}). Someone may be "
            "intercepting the connection, or the node was reinstalled. Nothing was sent.",
            hint=f"If you know why it changed, remove the old entry for "
            f"{known_hosts_name(host, node.ssh_port)} from {keys.path} and check the "
            "node again to accept the new key.",
            details=details,
        )
    return RbeeError(
        ErrorCode.SSH_HOST_KEY_UNKNOWN,
        f"The SSH host key of {where} is not known to rbee "
        f"({details['key_type']} {details['fingerprint']})",
        hint="Compare the fingerprint with the node's own (run there: ssh-keygen -lf "
        f"/etc/ssh/ssh_host_{_key_file_kind(details['key_type'])}_key.pub); if it matches, "
        "run the command again with --accept-new-host-key (in the dashboard: 'Trust host "
        "key').",
        details=details,
    )
