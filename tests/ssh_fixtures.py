"""The SSH test fixtures, loaded by the SSH test modules with
`pytest_plugins = ["tests.ssh_fixtures"]` (conftest.py stays untouched); the servers and
helpers they use live in tests/ssh_support.py.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.ssh_support import (
    AsyncSshServer,
    OpenSshd,
    SshEnv,
    TinyHttp,
    make_key,
    public_line,
    start_sshd,
)
from tests.support import free_port


@pytest.fixture
def ssh_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SshEnv:
    monkeypatch.setenv("RBEE_CONFIG", str(tmp_path / "config" / "config.toml"))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    keys = tmp_path / "keys"
    keys.mkdir()
    return SshEnv(tmp_path, make_key(keys / "id_ed25519"), make_key(keys / "other_ed25519"))


@pytest.fixture
async def asyncssh_server(ssh_env: SshEnv) -> AsyncIterator[AsyncSshServer]:
    authorized = ssh_env.tmp / "authorized_keys"
    authorized.write_text(public_line(ssh_env.key) + "\n")
    server = await AsyncSshServer(authorized).start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word (a hung host)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield int(sock.getsockname()[1])


@pytest.fixture
def closed_port() -> int:
    """A port nobody listens on: connections are refused."""
    return free_port()


@pytest.fixture
def sshd(ssh_env: SshEnv) -> Iterator[OpenSshd]:
    """A real OpenSSH sshd that accepts `ssh_env.key` for the current user."""
    server = start_sshd(ssh_env.tmp / "sshd", [ssh_env.key])
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def tiny_http() -> AsyncIterator[TinyHttp]:
    server = await TinyHttp(b'{"status": "ok", "version": "tiny"}').start()
    try:
        yield server
    finally:
        await server.close()
