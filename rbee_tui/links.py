"""How the operator reaches a node's agent: local, direct HTTP, or SSH port forward (B10).

`NodeLinks` hands out `AgentClient`s. For `localhost` it finds or starts the local agent
(B09); for a direct node it uses the agent's LAN address and insists on an API key; for an
SSH node it opens (and reopens, when it drops) a local port forward over the node's SSH
connection.
"""

from __future__ import annotations

import contextlib
from typing import Any

from rbee_agent.protocol import ErrorCode, RbeeError
from rbee_tui import local_agent
from rbee_tui.client import AgentClient
from rbee_tui.config import Config, Node


class NodeLinks:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.started_local: local_agent.LocalAgent | None = None
        self._forwards: dict[str, Any] = {}
        self._suspect: set[str] = set()

    async def open(self, name: str) -> AgentClient:
        node = self.config.node(name)
        settings = self.config.settings
        if node.is_local:
            agent = await local_agent.find_or_start_async(settings)
            if agent.started_here:
                self.started_local = agent
            return AgentClient(node.name, agent.url, agent.api_key, settings)
        if node.transport == "direct":
            if not node.api_key:
                raise RbeeError(
                    ErrorCode.INVALID_CONFIG,
                    f"Node '{node.name}' is reached over direct HTTP but has no API key",
                    hint=f"Install the agent with: rbee nodes install {node.name}",
                )
            return AgentClient(node.name, f"http://{node.agent_host}:{node.agent_port}",
                               node.api_key, settings)
        return AgentClient(node.name, await self._forward_url(node), node.api_key, settings)

    async def _forward_url(self, node: Node) -> str:
        from rbee_tui import ssh

        forward = self._forwards.get(node.name)
        if forward is None:
            forward = ssh.AgentForward(node, self.config.settings)
            self._forwards[node.name] = forward
        if node.name in self._suspect:  # the last request failed: check the SSH link first
            self._suspect.discard(node.name)
            url: str = await forward.reconnect()
        else:
            url = await forward.url()
        return url

    def suspect(self, name: str) -> None:
        """A request through this node's link failed; the next open re-checks the link."""
        if name in self._forwards:
            self._suspect.add(name)

    async def aclose(self) -> None:
        for forward in self._forwards.values():
            with contextlib.suppress(Exception):
                await forward.aclose()
        self._forwards.clear()

    def stop_started_local(self) -> None:
        """--ephemeral: stop the local agent only if this run started it (B09)."""
        if self.started_local is not None and self.started_local.pid is not None:
            local_agent.stop(self.started_local.pid)
            self.started_local = None
