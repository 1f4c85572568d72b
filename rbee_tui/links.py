"""How the operator reaches a node's agent: local, direct HTTP, or SSH port forward (B10).

`NodeLinks` hands out `AgentClient`s. For `localhost` it finds or starts this config's local
agent (B09, B140); for a direct node it uses the agent's LAN address and insists on an API
key; for an SSH node it opens (and reopens, when it drops) a local port forward over the
node's SSH connection, and when the agent there does not answer it starts it over SSH
(B143, the cold start) before handing the client out.

`open` is for commands that need the agent (and start it); `peek` is for listings, which
report a node whose agent is down instead of starting anything. What happens on the way (a
retry, a cold start, a moved port) goes to `report`, the face's event printer, or, inside
`reporting_to(sink)`, to the sink of the flow that asked (the dashboard's chat or dialog
shows it among that flow's own events; its polls, running in other tasks, do not).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from rbee_agent.protocol import ErrorCode, RbeeError
from rbee_tui import local_agent
from rbee_tui.config import Config, Node
from rbee_tui.events import Attempt, Event, Finished, Note, PhaseDone

if TYPE_CHECKING:
    from rbee_tui.client import AgentClient
    from rbee_tui.ssh_conn import SshConnection

Reporter = Callable[[Event], None]

_flow_sink: ContextVar[Reporter | None] = ContextVar("rbee_flow_sink", default=None)


@contextlib.contextmanager
def reporting_to(sink: Reporter) -> Iterator[None]:
    """Route what links do on the way to `sink` for the flows the current task runs.

    A context variable, not an attribute: each Textual worker is its own task, so a chat's
    cold start reaches that chat while a poll running beside it reports to `report`."""
    token = _flow_sink.set(sink)
    try:
        yield
    finally:
        _flow_sink.reset(token)


class NodeLinks:
    def __init__(self, config: Config, report: Reporter | None = None) -> None:
        self.config = config
        self.report = report
        self.started_local: local_agent.LocalAgent | None = None
        self._forwards: dict[str, Any] = {}
        self._suspect: set[str] = set()
        self._answered: set[str] = set()  # SSH nodes whose agent answered through this link

    def _emit(self, event: Event) -> None:
        sink = _flow_sink.get() or self.report
        if sink is not None:
            sink(event)

    def _attempt(self, attempt: Attempt) -> None:
        self._emit(attempt)

    def _client(self, node: Node, url: str, api_key: str | None) -> AgentClient:
        from rbee_tui.client import AgentClient  # httpx loads only when a node is asked

        return AgentClient(node.name, url, api_key, self.config.settings,
                           on_attempt=self._attempt)

    async def open(self, name: str, cold_start: bool | None = None) -> AgentClient:
        """A client for a node whose agent this command needs: started when it is down
        (localhost always; an SSH node when `cold_start`, by default the setting, is on)."""
        node = self.config.node(name)
        if node.is_local:
            agent = await local_agent.find_or_start_async(self.config.settings)
            if agent.started_here:
                self.started_local = agent
            if agent.note:
                self._emit(Note("agent", agent.note))
            return self._client(node, agent.url, agent.api_key)
        client = await self._remote(node)
        if cold_start is None:
            cold_start = self.config.settings.cold_start
        if node.transport == "ssh" and cold_start:
            await self._cold_start(node, client)
        return client

    async def peek(self, name: str) -> AgentClient:
        """A client for a node's agent as it is now: nothing is started. A local agent that
        is not this config's, or not running, is AGENT_UNREACHABLE with the reason."""
        node = self.config.node(name)
        if node.is_local:
            import asyncio

            found = await asyncio.to_thread(local_agent.lookup, self.config.settings)
            if found.agent is None:
                raise RbeeError(ErrorCode.AGENT_UNREACHABLE, found.reason,
                                hint="Start it with: rbee nodes start localhost",
                                details={"node": name})
            return self._client(node, found.agent.url, found.agent.api_key)
        return await self._remote(node)

    async def _remote(self, node: Node) -> AgentClient:
        if node.transport == "direct":
            if not node.api_key:
                raise RbeeError(
                    ErrorCode.INVALID_CONFIG,
                    f"Node '{node.name}' is reached over direct HTTP but has no API key",
                    hint=f"Install the agent with: rbee nodes install {node.name}",
                )
            return self._client(node, f"http://{node.agent_host}:{node.agent_port}",
                                node.api_key)
        return self._client(node, await self._forward_url(node), node.api_key)

    async def _cold_start(self, node: Node, client: AgentClient) -> None:
        """B143: an agent that does not answer through a working SSH link is started there
        (the original design's cold start), its steps reported like `rbee nodes start`."""
        if node.name in self._answered:
            return
        try:
            await client.health()
        except RbeeError as err:
            if err.code != ErrorCode.AGENT_UNREACHABLE:
                raise
            from rbee_tui import ssh

            self._emit(Note("agent", f"the agent of node '{node.name}' does not answer: "
                                     "starting it over SSH"))
            async for event in ssh.start_agent(node, self.config.settings):
                self._emit(PhaseDone("agent", event.message)
                           if isinstance(event, Finished) else event)
        self._answered.add(node.name)

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

    async def ssh_connection(self, name: str) -> SshConnection:
        """The SSH connection of an SSH node's agent link, opened if need be; split workers
        tunnel their RPC traffic over it (B207)."""
        node = self.config.node(name)
        if node.transport != "ssh":
            raise RbeeError(
                ErrorCode.INVALID_REQUEST,
                f"Node '{name}' is not reached over SSH, so rbee cannot tunnel to it",
                hint="A split uses localhost and SSH nodes; add the node with --ssh-host.",
                details={"node": name, "transport": node.transport})
        await self._forward_url(node)
        conn = self._forwards[name].connection
        assert conn is not None
        return conn  # type: ignore[no-any-return]

    def suspect(self, name: str) -> None:
        """A request through this node's link failed; the next open re-checks the link."""
        self._answered.discard(name)
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
