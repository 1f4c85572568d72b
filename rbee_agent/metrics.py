"""Prometheus metrics (B190-B193): what an agent, or the gateway, has served and holds now.

Two kinds. Events are counted where they happen: every HTTP answer (an ASGI middleware, by
route template and status), and every token frame relayed from a worker (`StreamMeter`:
tokens, time to first token, gaps between tokens). State is read when Prometheus scrapes
(`AgentCollector`): workers by state, slots busy, queue length, VRAM per GPU, bytes
downloaded. Nothing on the token path takes a lock or touches the disk, and the scrape runs
in a thread because NVML calls block.

Each app gets its own registry, so several agents in one process (tests) never collide.
This module imports no fastapi: the gateway (Starlette) uses the same pieces.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from rbee_agent.protocol import GpuInfo, WorkerState

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from rbee_agent.supervisor import Supervisor

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MB = 1024 * 1024
# Seconds. TTFT spans a warm cache hit on a GPU to a long prompt on a small CPU.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.1, 0.25, 0.5, 1.0)
TOKEN_FRAME = b'data: {"token"'
# Every chunk of an OpenAI stream that carries text says it is not the last one.
OPENAI_TOKEN_CHUNK = b'"finish_reason":null'
UNMATCHED_ROUTE = "unmatched"  # any path no route serves: one label, not one per URL


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def metrics_open(public: bool, host: str) -> bool:
    """Whether `/metrics` may answer without a key: only when asked, and only on loopback."""
    return public and is_loopback(host)


class StreamMetrics:
    """The counters and histograms an agent and the gateway both keep (named `<prefix>_…`)."""

    def __init__(self, registry: CollectorRegistry, prefix: str) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # `_created` twins: noise
        self.registry = registry
        self.requests = Counter(
            f"{prefix}_requests", "HTTP requests answered, by route template and status",
            ["route", "method", "status"], registry=registry)
        self.tokens = Counter(
            f"{prefix}_tokens_generated", "Tokens streamed back to clients, by model",
            ["model"], registry=registry)
        self.ttft = Histogram(
            f"{prefix}_time_to_first_token_seconds",
            "From a request's arrival to its first token, by model",
            ["model"], buckets=TTFT_BUCKETS, registry=registry)
        self.inter_token = Histogram(
            f"{prefix}_inter_token_seconds", "Time between consecutive tokens, by model",
            ["model"], buckets=GAP_BUCKETS, registry=registry)

    def meter(self, model: str, started: float, marker: bytes = TOKEN_FRAME) -> StreamMeter:
        return StreamMeter(self, model, started, marker)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StreamMeter:
    """Times one request's tokens from the SSE frames that carry them (`marker` picks
    them out: rbee's token frames, or OpenAI chunks that are not the last).

    Several frames may arrive in one read; the first of them gets the gap since the previous
    read and the others a gap of 0, which is what the relay saw. The token count comes from
    the stream's own total (`tokens`), which is exact where frames are not: a frame may
    carry the text of several tokens.
    """

    def __init__(self, metrics: StreamMetrics, model: str, started: float,
                 marker: bytes) -> None:
        self._marker = marker
        self._tokens = metrics.tokens.labels(model)
        self._ttft = metrics.ttft.labels(model)
        self._gap = metrics.inter_token.labels(model)
        self._started = started
        self._last: float | None = None

    def frames(self, batch: bytes) -> int:
        """Time the token frames in `batch`; returns how many there were."""
        count = batch.count(self._marker)
        if not count:
            return 0
        now = time.perf_counter()
        if self._last is None:
            self._ttft.observe(now - self._started)
        else:
            self._gap.observe(now - self._last)
        for _ in range(count - 1):
            self._gap.observe(0.0)
        self._last = now
        return count

    def tokens(self, count: int) -> None:
        self._tokens.inc(count)


class RequestCounter:
    """ASGI middleware: one count per answered request, by route template and status.

    The route label is the template (`/v1/workers/{worker_id}`), read after routing from
    `route_of`; a path no route matched is counted as "unmatched".
    """

    def __init__(self, app: ASGIApp, metrics: StreamMetrics,
                 route_of: Callable[[Scope], str | None]) -> None:
        self.app = app
        self.metrics = metrics
        self.route_of = route_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # an exception that escapes every handler

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            route = self.route_of(scope) or UNMATCHED_ROUTE
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()


def route_template(scope: Scope) -> str | None:
    """The template of the route that matched (Starlette leaves the route in the scope)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else None


# --------------------------------------------------------------------------- agent state


class AgentCollector(Collector):
    """The agent's state at scrape time, read from the supervisor.

    Slots busy and queue length come from the agent's own count of requests in flight to
    each worker (every request to a worker goes through its agent, so the count is exact
    and current): up to `slots` of them run, the rest wait in the worker's queue.
    """

    def __init__(self, supervisor: Supervisor, gpus: Callable[[], list[GpuInfo]]) -> None:
        self.supervisor = supervisor
        self.gpus = gpus

    def collect(self) -> Iterable[Metric]:
        workers = list(self.supervisor.workers.values())
        by_state = GaugeMetricFamily("rbee_workers", "Workers by state", labels=["state"])
        states: tuple[str, ...] = WorkerState.__args__  # type: ignore[attr-defined]
        for state in states:
            by_state.add_metric([state], sum(1 for w in workers if w.state == state))
        yield by_state
        busy = GaugeMetricFamily("rbee_worker_slots_busy", "Slots generating now",
                                 labels=["worker", "model"])
        total = GaugeMetricFamily("rbee_worker_slots", "Slots of each worker",
                                  labels=["worker", "model"])
        queued = GaugeMetricFamily("rbee_worker_queue_length",
                                   "Requests waiting for a slot", labels=["worker", "model"])
        served = CounterMetricFamily("rbee_worker_tokens_served",
                                     "Tokens a worker has generated since it started",
                                     labels=["worker", "model"])
        for w in workers:
            labels = [w.id, w.model.id]
            busy.add_metric(labels, min(w.in_flight, w.slots_total))
            total.add_metric(labels, w.slots_total)
            queued.add_metric(labels, max(0, w.in_flight - w.slots_total))
            served.add_metric(labels, w.tokens_served)
        yield from (busy, total, queued, served)
        used = GaugeMetricFamily("rbee_gpu_vram_used_bytes", "VRAM in use per GPU",
                                 labels=["gpu", "name"])
        size = GaugeMetricFamily("rbee_gpu_vram_total_bytes", "VRAM per GPU",
                                 labels=["gpu", "name"])
        for gpu in self.gpus():
            labels = [str(gpu.index), gpu.name]
            if gpu.vram_used_mb is not None:
                used.add_metric(labels, gpu.vram_used_mb * MB)
            if gpu.vram_total_mb is not None:
                size.add_metric(labels, gpu.vram_total_mb * MB)
        yield from (used, size)
        yield CounterMetricFamily("rbee_download_bytes", "Model bytes received from the hub",
                                  value=self.supervisor.downloads.bytes_received)


class AgentMetrics(StreamMetrics):
    def __init__(self, supervisor: Supervisor) -> None:
        from rbee_agent import resources

        super().__init__(CollectorRegistry(auto_describe=False), "rbee")
        self.registry.register(AgentCollector(supervisor, resources.gpus))
