"""The dashboard's data boundary: what one poll of a node returns (B70).

`LiveNodeSource` asks real agents (through `NodeLinks`); tests plug a scripted source with the
same `poll` method, which is the only place the TUI's data can be faked.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Literal, Protocol

from rbee_agent.protocol import ModelsReply, NodeInfo, RbeeError, WorkerInfo
from rbee_tui.client import AgentClient
from rbee_tui.config import Config
from rbee_tui.links import NodeLinks

NodeStatus = Literal["up", "down", "unknown"]


@dataclass(frozen=True)
class NodeSnapshot:
    name: str
    status: NodeStatus
    agent_version: str | None = None
    info: NodeInfo | None = None
    workers: tuple[WorkerInfo, ...] = ()
    reason: str | None = None
    polled_at: float = field(default_factory=time.time)


class NodeSource(Protocol):
    async def poll(self, name: str) -> NodeSnapshot: ...

    async def client(self, name: str) -> AgentClient:
        """The source's shared client for a node (do not close it)."""
        ...

    async def open_client(self, name: str) -> AgentClient:
        """A new client the caller owns and closes (flows close theirs)."""
        ...

    async def models(self, name: str) -> ModelsReply: ...


class LiveNodeSource:
    """Polls real agents; keeps one HTTP client per node and drops it when it fails."""

    def __init__(self, config: Config, links: NodeLinks, timeout_s: float = 5.0) -> None:
        self.config = config
        self.links = links
        self.timeout_s = timeout_s
        self._clients: dict[str, AgentClient] = {}

    async def client(self, name: str) -> AgentClient:
        """Polls show a dead remote agent as dead; starting it is the operator's call."""
        client = self._clients.get(name)
        if client is None:
            client = await self.links.open(name, cold_start=False)
            self._clients[name] = client
        return client

    async def open_client(self, name: str) -> AgentClient:
        return await self.links.open(name)

    async def poll(self, name: str) -> NodeSnapshot:
        try:
            async with asyncio.timeout(self.timeout_s):
                client = await self.client(name)
                health = await client.check_version()
                info, workers = await asyncio.gather(client.node_info(), client.workers())
        except (RbeeError, TimeoutError) as exc:
            await self._drop(name)
            self.links.suspect(name)
            reason = exc.message if isinstance(exc, RbeeError) else (
                f"no answer within {self.timeout_s:g} s")
            return NodeSnapshot(name=name, status="down", reason=reason)
        return NodeSnapshot(name=name, status="up", agent_version=health.version, info=info,
                            workers=tuple(workers))

    async def models(self, name: str) -> ModelsReply:
        return await (await self.client(name)).models()

    async def _drop(self, name: str) -> None:
        client = self._clients.pop(name, None)
        if client is not None:
            await client.aclose()

    async def aclose(self) -> None:
        for name in list(self._clients):
            await self._drop(name)
