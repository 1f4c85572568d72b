"""Where a request goes (B186, B188): the gateway's view of every node, and the order in
which to try them for a model.

Each node's state (its workers, catalog and free memory) is asked for when a request needs
it and the last answer is older than `gateway_state_ttl_s`, so routing sees a worker the
moment it is warm without polling every node all the time. Between answers the gateway adds
its own requests in flight, so a burst spreads over nodes instead of piling onto the one
that looked idle a second ago.

Order for a model: nodes with a ready worker for it, least loaded first (requests in flight
per slot); then nodes where one is loading; then nodes that have the model, most free VRAM
first (RAM on nodes without a GPU); then, for an `hf:` reference, any node (it downloads).
`model@node` pins a node. A node whose agent fails is down: no request goes to it until a
health check answers again (every `gateway_health_interval_s`).

No web server here: the dashboard's "any node" chat uses `Fleet.choose` too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import httpx

from rbee_agent.model_refs import HfRef, parse_model_ref
from rbee_agent.protocol import CatalogEntry, ErrorCode, NodeInfo, RbeeError, WorkerInfo
from rbee_tui.client import AgentClient
from rbee_tui.config import Config
from rbee_tui.links import NodeLinks

log = logging.getLogger("rbee.gateway")

_SERVING = ("idle", "busy", "loading")


@dataclass(frozen=True)
class Endpoint:
    """Where the gateway sends a node's requests (a forward's local port for SSH nodes)."""

    host: str
    port: int
    api_key: str | None

    @classmethod
    def from_url(cls, url: str, api_key: str | None) -> Endpoint:
        parsed = httpx.URL(url)
        return cls(parsed.host, parsed.port or 80, api_key)


@dataclass
class NodeState:
    name: str
    up: bool | None = None  # None: not asked yet
    problem: str | None = None
    endpoint: Endpoint | None = None
    workers: list[WorkerInfo] = field(default_factory=list)
    models: list[CatalogEntry] = field(default_factory=list)
    info: NodeInfo | None = None
    fetched_at: float = float("-inf")
    inflight: Counter[str] = field(default_factory=Counter)  # by model, sent by the gateway
    inflight_at_fetch: Counter[str] = field(default_factory=Counter)
    refreshing: asyncio.Task[None] | None = None
    client: AgentClient | None = None  # kept between refreshes: a new one costs ~20 ms

    def serving(self, model: str) -> list[WorkerInfo]:
        return [w for w in self.workers
                if model in (w.model_id, w.model_ref) and w.state in _SERVING]

    def has(self, model: str) -> bool:
        return any(model in (e.id, e.reference) for e in self.models)

    def free_mb(self) -> int:
        """Free VRAM over the node's GPUs; free RAM on a node without one."""
        if self.info is None:
            return 0
        if self.info.gpus:
            return sum(g.vram_free_mb or 0 for g in self.info.gpus)
        return self.info.ram_available_mb

    def load(self, model: str, ready: list[WorkerInfo]) -> float:
        """Requests per slot on the node's ready workers for `model`, counting what the
        gateway sent since the node last answered."""
        slots = sum(max(1, w.slots_total) for w in ready)
        seen = sum(w.active_requests + w.queued for w in ready)
        ours_since = self.inflight[model] - self.inflight_at_fetch[model]
        return max(0, seen + ours_since) / slots


def split_pin(model: str, nodes: Iterable[str]) -> tuple[str, str | None]:
    """`name@node` → (name, node) when `node` is a registered node; otherwise the `@` is
    part of the model reference (`hf:org/repo@revision`)."""
    base, sep, node = model.rpartition("@")
    if sep and base and node in set(nodes):
        return base, node
    return model, None


def _fetchable(model: str) -> bool:
    try:
        return isinstance(parse_model_ref(model), HfRef)
    except RbeeError:
        return False


class Fleet:
    """Every registered node's state, kept fresh enough to route by."""

    def __init__(self, config: Config, links: NodeLinks) -> None:
        self.config = config
        self.links = links
        self.settings = config.settings
        self.states = {name: NodeState(name) for name in config.names()}
        self._closing: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ state

    async def refresh(self, name: str) -> NodeState:
        """Ask one node again; concurrent callers share one round of questions."""
        state = self.states[name]
        if state.refreshing is None or state.refreshing.done():
            state.refreshing = asyncio.ensure_future(self._ask(state))
        await asyncio.shield(state.refreshing)
        return state

    async def _ask(self, state: NodeState) -> None:
        """One round of questions. The link (and its client) is opened once and kept; a
        failure drops it, so the next round opens it again (SSH: reconnects)."""
        try:
            async with asyncio.timeout(self.settings.gateway_refresh_timeout_s):
                if state.client is None:
                    # localhost's agent is started if it does not run (B09); a remote one
                    # is not: the node stays down until its agent answers.
                    state.client = await self.links.open(state.name, cold_start=False)
                client = state.client
                _, workers, models, info = await asyncio.gather(
                    client.check_version(), client.workers(), client.models(),
                    client.node_info())
        except RbeeError as err:
            self.mark_down(state.name, err.message)
            return
        except TimeoutError:
            self.mark_down(state.name, "no answer within "
                           f"{self.settings.gateway_refresh_timeout_s:g} s")
            return
        if state.up is not True:
            log.info("node %s is up (%s)", state.name, client.base_url)
        state.up, state.problem = True, None
        state.endpoint = Endpoint.from_url(client.base_url, client.api_key)
        state.workers, state.models, state.info = workers, models.models, info
        state.fetched_at = time.monotonic()
        state.inflight_at_fetch = Counter(state.inflight)

    async def refresh_stale(self) -> None:
        """Ask every node not known to be down whose answer is older than the TTL."""
        now = time.monotonic()
        stale = [s.name for s in self.states.values() if s.up is not False
                 and now - s.fetched_at >= self.settings.gateway_state_ttl_s]
        await asyncio.gather(*(self.refresh(name) for name in stale))

    def mark_down(self, name: str, why: str) -> None:
        state = self.states[name]
        if state.up is not False:
            log.warning("node %s is down: %s", name, why)
        state.up, state.problem = False, why
        self.links.suspect(name)
        if state.client is not None:
            client, state.client = state.client, None
            closing = asyncio.ensure_future(client.aclose())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    async def heal(self) -> None:
        """Forever: ask the nodes that are down whether they are back."""
        while True:
            await asyncio.sleep(self.settings.gateway_health_interval_s)
            down = [s.name for s in self.states.values() if s.up is False]
            await asyncio.gather(*(self.refresh(name) for name in down))

    async def aclose(self) -> None:
        for state in self.states.values():
            if state.client is not None:
                await state.client.aclose()
                state.client = None

    @contextlib.contextmanager
    def in_flight(self, node: str, model: str) -> Iterator[None]:
        counter = self.states[node].inflight
        counter[model] += 1
        try:
            yield
        finally:
            counter[model] -= 1

    # ------------------------------------------------------------------ routing

    async def plan(self, model: str) -> tuple[str, list[str]]:
        """(the model as agents know it, the nodes to try in order)."""
        base, pinned = split_pin(model, self.states)
        if pinned is not None:
            state = self.states[pinned]
            if state.up is not True or time.monotonic() - state.fetched_at \
                    >= self.settings.gateway_state_ttl_s:
                await self.refresh(pinned)
            if not state.up:
                raise RbeeError(
                    ErrorCode.AGENT_UNREACHABLE, f"Node '{pinned}' is down: {state.problem}",
                    hint=f"Check it with: rbee nodes check {pinned}; or drop '@{pinned}' to "
                    "let the gateway pick a node", details={"node": pinned})
            return base, [pinned]
        await self.refresh_stale()
        return base, self.candidates(base)

    def candidates(self, model: str) -> list[str]:
        up = [s for s in self.states.values() if s.up]
        if not up:
            problems = "; ".join(f"{s.name}: {s.problem or 'not asked yet'}"
                                 for s in self.states.values())
            raise RbeeError(ErrorCode.AGENT_UNREACHABLE, f"No node is reachable ({problems})",
                            hint="Start an agent: rbee nodes start NAME")
        warm: list[tuple[float, int, str]] = []
        loading: list[tuple[int, str]] = []
        have: list[tuple[int, str]] = []
        could: list[tuple[int, str]] = []
        for state in up:
            serving = state.serving(model)
            ready = [w for w in serving if w.state != "loading"]
            if ready:
                warm.append((state.load(model, ready), -state.free_mb(), state.name))
            elif serving:
                loading.append((-state.free_mb(), state.name))
            elif state.has(model):
                have.append((-state.free_mb(), state.name))
            elif _fetchable(model):
                could.append((-state.free_mb(), state.name))
        order = [n for *_, n in sorted(warm)] + [n for _, n in sorted(loading)]
        order += [n for _, n in sorted(have)] + [n for _, n in sorted(could)]
        if not order:
            known = sorted({e.id for s in up for e in s.models})
            raise RbeeError(
                ErrorCode.MODEL_NOT_FOUND, f"No reachable node has the model '{model}'",
                hint=f"Models on reachable nodes: {', '.join(known) or 'none'}; or name one "
                "by reference (hf:org/repo) to have it downloaded",
                details={"param": "model", "model": model})
        return order

    async def choose(self, model: str) -> tuple[str, str]:
        """(node, model name there): where a request for `model` would go now."""
        base, order = await self.plan(model)
        return order[0], base

    def models(self) -> list[tuple[CatalogEntry, list[str]]]:
        """Each model any reachable node has, once, with the nodes that have it."""
        seen: dict[str, tuple[CatalogEntry, list[str]]] = {}
        for state in self.states.values():
            if not state.up:
                continue
            for entry in state.models:
                seen.setdefault(entry.id, (entry, []))[1].append(state.name)
        return [seen[key] for key in sorted(seen)]
