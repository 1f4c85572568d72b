"""The gateway inside the dashboard (B195, B196): started and stopped by a toggle, serving
what `rbee serve` serves, with the dashboard's own `NodeLinks` (its SSH forwards and local
agent), the same key file, and the same routing `Fleet` that the "any node" chat uses.

Nothing here imports textual: the dashboard's panel reads `GatewayStatus` through the
`GatewayControl` protocol, which tests can script like the dashboard's `NodeSource`. The web
server is imported only when the gateway starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from rbee_agent.protocol import ErrorCode, RbeeError
from rbee_gateway.keys import default_key_file, load_or_create_key
from rbee_gateway.routing import Fleet, NodeState
from rbee_gateway.server import base_url, listen, require_web_server, web_server

if TYPE_CHECKING:
    import uvicorn

    from rbee_gateway.app import Gateway
    from rbee_tui.config import Config
    from rbee_tui.links import NodeLinks

log = logging.getLogger("rbee.gateway")

RATE_WINDOW_S = 10.0  # requests/s is measured over this much of the recent past
SAMPLE_EVERY_S = 1.0


@dataclass(frozen=True)
class NodeTraffic:
    """One node as the gateway's routing sees it, and what the gateway sent it."""

    name: str
    up: bool | None  # None: not asked yet
    problem: str | None
    requests: int  # relayed since the gateway started
    in_flight: int


@dataclass(frozen=True)
class GatewayStatus:
    running: bool
    url: str  # where it listens, or would with the settings
    host: str
    key: str | None  # None when the key file cannot be read (`problem` says why)
    key_file: Path
    requests: int  # relayed to nodes since it started
    requests_per_s: float  # over the last RATE_WINDOW_S
    nodes: tuple[NodeTraffic, ...]
    problem: RbeeError | None = None  # why it last failed to start, or stopped by itself

    def share(self, node: NodeTraffic) -> float:
        return node.requests / self.requests if self.requests else 0.0


class GatewayControl(Protocol):
    """What the dashboard needs of a gateway: its state, a toggle, and its routing."""

    def status(self) -> GatewayStatus: ...

    async def start(self) -> None:
        """Listen and serve; RbeeError (a taken port, a missing web server) when it cannot."""
        ...

    async def stop(self) -> None: ...

    def router(self) -> Fleet:
        """The routing the gateway uses, for the "any node" chat."""
        ...

    async def aclose(self) -> None: ...


class RateMeter:
    """Events per second over the last `window_s`, from a running total sampled now and
    then: (total now - total at the oldest sample in the window) / the time between."""

    def __init__(self, window_s: float = RATE_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self._samples: deque[tuple[float, int]] = deque()

    def reset(self) -> None:
        self._samples.clear()
        self._samples.append((self.clock(), 0))

    def sample(self, total: int) -> None:
        now = self.clock()
        self._samples.append((now, total))
        # keep one sample at or before the window's start as the baseline
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window_s:
            self._samples.popleft()

    def rate(self, total: int) -> float:
        if not self._samples:
            return 0.0
        since, base = self._samples[0]
        elapsed = self.clock() - since
        return max(0, total - base) / elapsed if elapsed > 0 else 0.0


class InProcessGateway:
    """The real gateway on the dashboard's event loop (`GatewayControl`)."""

    def __init__(self, config: Config, links: NodeLinks) -> None:
        self.config = config
        self.links = links
        self._fleet: Fleet | None = None
        self._healer: asyncio.Task[None] | None = None
        self._gateway: Gateway | None = None  # the last one started: its counts stay shown
        self._server: uvicorn.Server | None = None
        self._serving: asyncio.Task[None] | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._port: int | None = None
        self._key: tuple[str, Path] | None = None
        self._problem: RbeeError | None = None
        self.rate = RateMeter()

    # ------------------------------------------------------------------ routing

    def router(self) -> Fleet:
        """The routing `Fleet`, made on first use; a node that went down is asked again
        every `gateway_health_interval_s` whether the gateway runs or not."""
        if self._fleet is None:
            self._fleet = Fleet(self.config, self.links)
            self._healer = asyncio.ensure_future(self._fleet.heal())
        self._fleet.follow_registry()
        return self._fleet

    # ------------------------------------------------------------------ state

    @property
    def running(self) -> bool:
        return self._serving is not None and not self._serving.done()

    def _load_key(self) -> tuple[str | None, Path]:
        if self._key is None:
            try:
                self._key = load_or_create_key(None)
            except (RbeeError, OSError) as exc:
                if self._problem is None:
                    self._problem = exc if isinstance(exc, RbeeError) else RbeeError(
                        ErrorCode.INVALID_CONFIG, f"Cannot write the gateway's key: {exc}")
                return None, default_key_file()
        return self._key

    def status(self) -> GatewayStatus:
        settings = self.config.settings
        host = settings.gateway_host
        key, key_file = self._load_key()
        port = self._port if self.running and self._port else settings.gateway_port
        counts = self._gateway.metrics.routed_by_node() if self._gateway else {}
        total = sum(counts.values())
        states: dict[str, NodeState] = self._fleet.states if self._fleet else {}
        nodes = tuple(
            NodeTraffic(name, states[name].up if name in states else None,
                        states[name].problem if name in states else None,
                        counts.get(name, 0),
                        sum(states[name].inflight.values()) if name in states else 0)
            for name in self.config.names())
        return GatewayStatus(
            running=self.running, url=base_url(host, port), host=host, key=key,
            key_file=key_file, requests=total,
            requests_per_s=self.rate.rate(total) if self.running else 0.0, nodes=nodes,
            problem=self._problem)

    # ------------------------------------------------------------------ toggle

    async def start(self) -> None:
        if self.running:
            return
        settings = self.config.settings
        self._problem = None
        try:
            require_web_server()
            from rbee_gateway.app import Gateway

            key, _ = self._key = await asyncio.to_thread(load_or_create_key, None)
            sock = listen(settings.gateway_host, settings.gateway_port,
                          "Set another gateway_port under [settings] in the config file, "
                          "or stop what uses this one.")
        except RbeeError as err:
            self._problem = err
            raise
        self._port = sock.getsockname()[1]
        self._gateway = Gateway(self.router(), key, settings.gateway_host)
        self._server = web_server(self._gateway, in_process=True)
        self.rate.reset()
        self._serving = asyncio.ensure_future(self._serve(self._server, sock))
        if self._sampler is not None:  # left by a server that stopped by itself
            self._sampler.cancel()
        self._sampler = asyncio.ensure_future(self._sample())
        log.info("gateway started on %s", base_url(settings.gateway_host, self._port))

    async def _serve(self, server: uvicorn.Server, sock: object) -> None:
        try:
            await server.serve(sockets=[sock])  # type: ignore[list-item]
        except (Exception, SystemExit) as exc:  # uvicorn exits when its start-up fails
            self._problem = RbeeError(ErrorCode.INTERNAL_ERROR,
                                      f"The gateway stopped: {exc!r}",
                                      hint="Start it again; see the log for the cause.")
            log.exception("the gateway stopped")

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_EVERY_S)
            if self._gateway is not None:
                self.rate.sample(sum(self._gateway.metrics.routed_by_node().values()))

    async def stop(self) -> None:
        """Stop listening; replies still streaming get `IN_PROCESS_GRACE_S` to finish."""
        server, serving, self._server, self._serving = self._server, self._serving, None, None
        if self._sampler is not None:
            self._sampler.cancel()
            self._sampler = None
        if server is None or serving is None:
            return
        server.should_exit = True
        await serving
        log.info("gateway stopped")

    async def aclose(self) -> None:
        await self.stop()
        if self._healer is not None:
            self._healer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._healer
            self._healer = None
        if self._fleet is not None:
            await self._fleet.aclose()
