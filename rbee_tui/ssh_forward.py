"""A working local URL for a node's agent, through an SSH local port forward (B10).

`AgentForward(node, settings).url()` opens the node's SSH connection and a forward from a
free 127.0.0.1 port to the agent's port as seen from the node, and reopens both when the
connection dropped. A caller whose request through the URL failed to connect calls
`reconnect()`: it checks the SSH link (one no-op command) and reopens it only when it is
dead, so an agent that is merely down does not cost a new SSH connection.

This module never talks HTTP itself and never retries on its own schedule: the HTTP client
decides when to ask again.
"""

from __future__ import annotations

import asyncio

from rbee_tui.config import Node, OperatorSettings
from rbee_tui.ssh_conn import Dialer, SshConnection


class AgentForward:
    """A local URL for one node's agent through an SSH local port forward.

    `url()` gives `http://127.0.0.1:PORT`, opening the SSH connection and the forward on
    first use and again after the connection dropped. When a request through the URL
    fails to connect, call `reconnect()`: it checks the SSH link, reopens it when dead,
    and returns the URL to retry (the same one when only the agent was not answering).
    """

    def __init__(self, node: Node, settings: OperatorSettings) -> None:
        self.node = node
        self.settings = settings
        self._conn: SshConnection | None = None
        self._port: int | None = None
        self._lock = asyncio.Lock()

    @property
    def connection(self) -> SshConnection | None:
        return self._conn

    def _url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    async def url(self) -> str:
        async with self._lock:
            if self._conn is None or self._conn.closed or self._port is None:
                await self._open()
            return self._url()

    async def reconnect(self) -> str:
        async with self._lock:
            if self._conn is not None and self._port is not None and await self._conn.alive():
                return self._url()
            await self._open()
            return self._url()

    async def _open(self) -> None:
        await self._drop()
        conn = await Dialer(self.node, self.settings).open()
        try:
            self._port = await conn.forward(self.node.agent_host, self.node.agent_port)
        except BaseException:
            await conn.close()
            raise
        self._conn = conn

    async def _drop(self) -> None:
        conn, self._conn, self._port = self._conn, None, None
        if conn is not None:
            await conn.close()

    async def aclose(self) -> None:
        async with self._lock:
            await self._drop()
