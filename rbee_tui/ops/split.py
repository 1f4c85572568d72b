"""A model split over several nodes (B204-B208): RPC servers on the peers, SSH tunnels into
them, and a split worker on the head node that puts its last layers there.

The transport (docs/architecture.md, "Split models"): each peer's RPC server listens on the
peer's 127.0.0.1 only; this process opens a local forward over the SSH connection it already
holds to that peer. When the head is `localhost`, the worker uses that forward directly;
when the head is an SSH node, a remote forward on the head's connection brings the head's
127.0.0.1:X back here and on into the peer's forward. RPC traffic therefore only ever
crosses the network inside SSH, and only this operator process joins the two ends, so it
must stay up while the split worker serves: `rbee workers spawn --split` stays in the
foreground and Ctrl-C ends the split.

Every step that starts something records it first, so `close` can undo all of it whatever
failed half-way: the worker on the head and the RPC server on each peer are stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from rbee_agent.model_refs import parse_model_ref
from rbee_agent.protocol import (
    ErrorBody,
    ErrorCode,
    RbeeError,
    RpcPeer,
    RpcServerInfo,
    SplitPart,
    WorkerInfo,
)
from rbee_tui.client import AgentClient
from rbee_tui.config import Config
from rbee_tui.events import Event, PhaseDone, PhaseStarted, Progress
from rbee_tui.links import NodeLinks
from rbee_tui.ops.workers import SpawnSpec, spawn_events

WATCH_INTERVAL_S = 1.0  # how often a held split checks its worker and RPC servers
CLOSE_TIMEOUT_S = 30.0


def loading_where(layout: list[SplitPart], head: str, done: float) -> str:
    """Which node's layers are loading now (layers load in order: the head's first,
    then each peer's), so a slow peer shows by name in the load progress (B206)."""
    end = 0
    for part in layout:
        end += part.layers
        if done < end:
            return f"→ {part.node or head}"
    return ", ".join(f"{p.layers} on {p.node or head}" for p in layout)


def parse_nodes(text: str) -> tuple[str, ...]:
    """`localhost,gpu1[,…]`: the head first, then the peers; distinct, at least two.

    Raises ValueError with what is wrong."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if len(names) < 2:
        raise ValueError(f"{text!r} names {len(names)} node(s); a split needs the head node "
                         "and at least one more, e.g. localhost,gpu1")
    if len(set(names)) != len(names):
        raise ValueError(f"{text!r} names a node twice")
    return names


@dataclass(frozen=True)
class SplitSpec:
    nodes: tuple[str, ...]  # the head node first
    model_ref: str
    ctx_size: int | None = None
    slots: int | None = None
    peer_layers: int | None = None  # None: in proportion to each node's free memory
    device: str = "cpu"  # what each peer's RPC server serves: cpu or cudaN

    @property
    def head(self) -> str:
        return self.nodes[0]

    @property
    def peers(self) -> tuple[str, ...]:
        return self.nodes[1:]


def validate_split(spec: SplitSpec, config: Config) -> None:
    """B57: what can be checked before the network: the nodes exist and can be tunnelled."""
    parse_model_ref(spec.model_ref)
    for name in spec.nodes:
        node = config.node(name)
        if node.transport == "direct":
            raise RbeeError(
                ErrorCode.INVALID_REQUEST,
                f"Node '{name}' is reached over direct HTTP; a split tunnels its RPC traffic "
                "over SSH and cannot use it",
                hint=f"Add '{name}' as an SSH node (rbee nodes edit {name} --ssh-host HOST).",
                details={"node": name})


@dataclass
class _Peer:
    name: str
    client: AgentClient
    server: RpcServerInfo | None = None
    endpoint: str | None = None  # where the head reaches it: a tunnel's loopback end


@dataclass
class SplitWorker:
    """One split worker and everything it lives on, held by this process."""

    spec: SplitSpec
    config: Config
    links: NodeLinks
    head: AgentClient | None = None
    worker: WorkerInfo | None = None
    peers: list[_Peer] = field(default_factory=list)

    async def start(self) -> AsyncIterator[Event | WorkerInfo]:
        """RPC servers, tunnels, then the worker; the last item is the ready worker."""
        from rbee_tui.ops.models import require_model

        spec = self.spec
        validate_split(spec, self.config)
        self.head = await self.links.open(spec.head)
        await require_model(self.head, spec.model_ref)
        for name in spec.peers:
            yield PhaseStarted("rpc", f"Starting a {spec.device} RPC server on {name}")
            peer = _Peer(name, await self.links.open(name))
            self.peers.append(peer)
            try:
                peer.server = await peer.client.start_rpc_server(spec.device)
            except RbeeError as err:
                err.message = f"Node '{name}' could not start an RPC server: {err.message}"
                raise
            peer.endpoint = await self._tunnel(name, peer.server.port)
            yield PhaseDone("rpc", f"{name}: {peer.server.id} on its 127.0.0.1:"
                                   f"{peer.server.port} ({peer.server.free_mb} MB free), "
                                   f"reached from {spec.head} at {peer.endpoint} over SSH")
        rpc = tuple(RpcPeer(node=p.name, endpoint=p.endpoint or "",
                            free_mb=(p.server.free_mb if p.server else None) or 0)
                    for p in self.peers)
        spawn = SpawnSpec(spec.head, spec.model_ref, "cpu", new=True, ctx_size=spec.ctx_size,
                          slots=spec.slots, gpu_layers=spec.peer_layers, rpc=rpc)
        layout: list[SplitPart] | None = None
        async for event in spawn_events(self.head, spawn, self.config.settings):
            if isinstance(event, WorkerInfo):
                self.worker = event
            elif isinstance(event, Progress) and event.phase == "loading" and event.total:
                if layout is None:
                    layout = await self._layout()
                event = replace(event, message=loading_where(layout, spec.head, event.done))
            yield event

    async def _layout(self) -> list[SplitPart]:
        """The split the head admitted: its worker is the one using our tunnels."""
        assert self.head is not None
        ours = {p.endpoint for p in self.peers}
        for worker in await self.head.workers():
            if worker.split and {p.endpoint for p in worker.split if p.node} == ours:
                return worker.split
        return []

    async def _tunnel(self, peer: str, port: int) -> str:
        """The head node's way into `peer`'s 127.0.0.1:port, through SSH only (B207)."""
        if self.config.node(peer).is_local:
            here = port
        else:
            here = await (await self.links.ssh_connection(peer)).forward("127.0.0.1", port)
        if self.config.node(self.spec.head).is_local:
            return f"127.0.0.1:{here}"
        back = await (await self.links.ssh_connection(self.spec.head)).forward_back(here)
        return f"127.0.0.1:{back}"

    def describe(self) -> str:
        worker = self.worker
        if worker is None:
            return "not started"
        parts = ", ".join(f"{p.node or self.spec.head} {p.layers}" for p in worker.split)
        return f"worker {worker.id} on {self.spec.head} (layers: {parts})"

    async def watch(self) -> RbeeError | None:
        """Until the split ends: None when its worker was stopped (`rbee workers stop`, the
        head's idle timeout), else the error that says which node failed (B206)."""
        assert self.head is not None and self.worker is not None
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            try:
                worker = await self.head.worker(self.worker.id)
            except RbeeError as err:
                if err.code == ErrorCode.WORKER_NOT_FOUND:
                    return None
                return await self.explain(err)
            if worker.state == "failed":
                failure = (RbeeError.from_body(ErrorBody(error=worker.error)) if worker.error
                           else RbeeError(ErrorCode.WORKER_CRASHED,
                                          f"Split worker {worker.id} on {self.spec.head} failed"))
                return await self.explain(failure)
            if worker.state == "stopping":
                return None
            lost = await self.lost_peer()
            if lost is not None:
                return lost

    async def lost_peer(self) -> RbeeError | None:
        """A peer whose RPC server died or whose agent stopped answering, named."""
        for peer in self.peers:
            if peer.server is None:
                continue
            try:
                server = await peer.client.rpc_server(peer.server.id)
            except RbeeError as err:
                what = f"cannot be reached (its SSH link or agent is down): {err.message}"
            else:
                if server.state == "ready":
                    continue
                why = server.error.message if server.error else f"it is {server.state}"
                what = f"lost its RPC server: {why}"
            return RbeeError(
                ErrorCode.WORKER_CRASHED,
                f"Node '{peer.name}' of the split {what}",
                hint=f"Check node '{peer.name}' (rbee nodes check {peer.name}), then spawn "
                     "the split again.",
                details={"node": peer.name, "worker_id": self.worker.id if self.worker
                         else None})
        return None

    async def explain(self, err: RbeeError) -> RbeeError:
        """A stream or worker error, with the peer that caused it named when one did."""
        if not self.peers:
            return err
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.config.settings.status_timeout_s):
                lost = await self.lost_peer()
            if lost is not None:
                lost.message = f"{lost.message} ({err.message})"
                lost.details = {**err.details, **lost.details}
                return lost
        return err

    async def close(self) -> None:
        """Stop the worker on the head and every RPC server; nothing is left on any node."""
        async def quietly(step: object) -> None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await step  # type: ignore[misc]

        if self.head is not None and self.worker is not None:
            await quietly(self.head.stop_worker(self.worker.id))
        await asyncio.gather(*(quietly(self._stop_server(p)) for p in self.peers))
        for client in [*(p.client for p in self.peers), self.head]:
            if client is not None:
                await quietly(client.aclose())

    async def _stop_server(self, peer: _Peer) -> None:
        """Through the peer's link, reopened once when it dropped (the tunnel may have gone
        with it), so the RPC server does not outlive the split."""
        if peer.server is None:
            return
        try:
            await peer.client.stop_rpc_server(peer.server.id)
        except RbeeError:
            self.links.suspect(peer.name)
            client = await self.links.open(peer.name, cold_start=False)
            async with client:
                await client.stop_rpc_server(peer.server.id)
