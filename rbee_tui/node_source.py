"""The dashboard's data boundary: what one poll of a node returns (B70).

`LiveNodeSource` asks real agents (through `NodeLinks`); tests plug a scripted source with the
same `poll` method, which is the only place the TUI's data can be faked.

A node that did not answer carries the error's code, message and hint, so the dashboard can
say what to do about it (B171). The first poll of `localhost` may start the local agent
(B09): that start has its own timeout (`agent_start_timeout_s`), not the poll's, and the
source reports it through `on_connecting` so the row says "starting agent…" meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
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
    code: str | None = None  # the RbeeError code of a failed poll
    hint: str | None = None


class NodeSource(Protocol):
    # Set by the dashboard: told (node, note) when a poll must first connect or start.
    on_connecting: Callable[[str, str], None] | None

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
        # Told when a poll must first open a node's link: start the local agent, or dial SSH.
        self.on_connecting: Callable[[str, str], None] | None = None

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
        local = self.config.node(name).is_local
        try:
            if local and name not in self._clients:
                # Finding or starting the local agent is bounded by agent_start_timeout_s.
                self._connecting(name, "starting agent…")
                await self.client(name)
            elif name not in self._clients:
                self._connecting(name, "connecting over SSH…")
            async with asyncio.timeout(self.timeout_s):
                client = await self.client(name)
                health = await client.check_version()
                info, workers = await asyncio.gather(client.node_info(), client.workers())
        except (RbeeError, TimeoutError) as exc:
            await self._drop(name)
            self.links.suspect(name)
            if isinstance(exc, RbeeError):
                return NodeSnapshot(name=name, status="down", reason=exc.message,
                                    code=str(exc.code), hint=exc.hint)
            return NodeSnapshot(name=name, status="down", code="TIMEOUT",
                                reason=f"no answer within {self.timeout_s:g} s")
        return NodeSnapshot(name=name, status="up", agent_version=health.version, info=info,
                            workers=tuple(workers))

    def _connecting(self, name: str, note: str) -> None:
        if self.on_connecting is not None:
            self.on_connecting(name, note)

    async def models(self, name: str) -> ModelsReply:
        return await (await self.client(name)).models()

    async def _drop(self, name: str) -> None:
        client = self._clients.pop(name, None)
        if client is not None:
            await client.aclose()

    async def aclose(self) -> None:
        for name in list(self._clients):
            await self._drop(name)
