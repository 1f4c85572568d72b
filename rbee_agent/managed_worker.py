"""What the agent knows about one worker process, and the one place its state changes.

`set_state` is the only writer of `state` (B127): it logs the change, wakes whoever waits
for the worker to leave `loading`, and ends the progress stream of a failed start. The
supervisor's `_retire` is the one place a worker is torn down.

The agent also counts the requests it has forwarded to the worker and not seen finish
(`in_flight`), so it can refuse a request the worker has no room for without sending it
there (B125): `capacity` is the worker's slots plus its queue.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from pathlib import Path
from typing import Any

from rbee_agent import resources
from rbee_agent.auth import new_api_key
from rbee_agent.broadcast import Broadcast
from rbee_agent.protocol import (
    CatalogEntry,
    LoadingProgress,
    RbeeError,
    RpcPeer,
    SplitPart,
    WorkerInfo,
    WorkerState,
)
from rbee_agent.worker_launch import Placement

log = logging.getLogger("rbee.agent")

# Weight of the newest request in the running mean of request durations (Retry-After).
_DURATION_WEIGHT = 0.2


class ManagedWorker:
    def __init__(
        self,
        worker_id: str,
        model: CatalogEntry,
        backend: str,
        ctx_size: int,
        slots: int,
        placement: Placement,
        queue_depth: int,
        log_path: Path,
        lines_kept: int,
    ) -> None:
        self.id = worker_id
        self.model = model
        self.backend = backend
        self.placement = placement
        self.ctx_size = ctx_size
        self.slots_total = slots
        self.queue_depth = queue_depth
        self.slots_busy = 0
        self.queued = 0
        self.api_key = new_api_key()
        self.port = 0
        self.host = "127.0.0.1"
        self.proc: asyncio.subprocess.Process | None = None
        self.state: WorkerState = "loading"
        self.started_at = time.time()
        self.last_activity = time.time()
        self.failed_at: float | None = None
        self.tokens_served = 0
        self.in_flight = 0
        self.mean_request_s = 1.0
        self.health_failures = 0
        self.exit_code: int | None = None
        self.port_retries = 0
        self.failure: RbeeError | None = None
        self.log_path = log_path
        self.recent_lines: deque[str] = deque(maxlen=lines_kept)
        self.ready = asyncio.Event()
        self.exited = asyncio.Event()
        self.progress: Broadcast[LoadingProgress] = Broadcast(
            LoadingProgress(stage="starting", layers_loaded=0, layers_total=model.layers),
            lambda e: e.stage in ("ready", "failed"),
        )
        self.tasks: set[asyncio.Task[Any]] = set()
        # What this worker was admitted with (MiB), for the reservations of later spawns.
        self.ram_need_mb = 0
        self.vram_need_mb: dict[int, int] = {}
        # A split worker (B204): its layers per node and the RPC servers it uses.
        self.split: list[SplitPart] = []
        self.rpc_peers: list[RpcPeer] = []

    # ------------------------------------------------------------------ identity

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    @property
    def device(self) -> int:
        return self.placement.devices[0] if self.placement.devices else 0

    def peer_note(self) -> str:
        """For a split worker's errors: the nodes whose loss ends it (B206)."""
        if not self.rpc_peers:
            return ""
        peers = ", ".join(f"'{p.node}' (RPC {p.endpoint})" for p in self.rpc_peers)
        return (f"; it is split over node(s) {peers}: an RPC peer or its SSH tunnel was "
                "lost, or the worker itself failed")

    @property
    def alive(self) -> bool:
        return self.state not in ("failed", "stopping") and not self.exited.is_set()

    # ------------------------------------------------------------------ state

    def set_state(self, state: WorkerState, failure: RbeeError | None = None) -> None:
        """Change the state and publish it; a failure also ends the progress stream."""
        if failure is not None:
            self.failure = failure
        old = self.state
        if state == old:
            return
        self.state = state
        log.debug("worker %s: %s → %s", self.id, old, state)
        if state == "failed":
            self.failed_at = time.time()
            if failure is not None:
                self.progress.publish(LoadingProgress(
                    stage="failed", layers_loaded=self.progress.value.layers_loaded,
                    layers_total=self.model.layers, error=failure.to_body().error,
                ))
        if state != "loading":
            self.ready.set()

    # ------------------------------------------------------------------ requests

    @property
    def capacity(self) -> int:
        return self.slots_total + self.queue_depth

    def begin_request(self) -> float:
        self.in_flight += 1
        self.last_activity = time.time()
        if self.state == "idle":
            self.set_state("busy")
        return time.monotonic()

    def count_tokens(self, tokens: int) -> None:
        """Tokens this worker produced, counted by the relay as they pass (B134); a stream's
        tokens also keep the worker from looking idle."""
        if tokens:
            self.tokens_served += tokens
            self.last_activity = time.time()

    def end_request(self, started: float) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        took = time.monotonic() - started
        self.mean_request_s += _DURATION_WEIGHT * (took - self.mean_request_s)
        self.last_activity = time.time()
        if self.state == "busy" and self.in_flight == 0:
            self.set_state("idle")

    def retry_after_s(self) -> int:
        """When a refused client may try again: about when the next place frees up."""
        return max(1, min(60, math.ceil(self.mean_request_s / max(1, self.slots_total))))

    # ------------------------------------------------------------------ views

    def info(self) -> WorkerInfo:
        rss_mb = vram_mb = None
        if self.proc is not None and self.exit_code is None:
            rss_mb = resources.process_rss_mb(self.proc.pid)
            vram_mb = resources.process_vram_mb(self.proc.pid) if self.backend == "cuda" else None
        layers = self.model.layers
        gpu_layers = None
        if self.backend == "cuda":
            gpu_layers = layers if self.placement.gpu_layers < 0 else self.placement.gpu_layers
        return WorkerInfo(
            id=self.id, model_id=self.model.id, model_ref=self.model.reference,
            backend=self.backend, device=self.device, url=self.url, state=self.state,
            slots_total=self.slots_total,
            slots_available=max(0, self.slots_total - max(self.slots_busy, self.in_flight)),
            pid=self.pid, started_at=self.started_at, last_activity=self.last_activity,
            rss_mb=rss_mb, vram_mb=vram_mb, tokens_served=self.tokens_served,
            layers_loaded=self.progress.value.layers_loaded, layers_total=layers,
            active_requests=min(self.in_flight, self.slots_total),
            queued=max(self.queued, self.in_flight - self.slots_total),
            gpu_layers=gpu_layers, devices=list(self.placement.devices),
            ctx_size=self.ctx_size, queue_depth=self.queue_depth,
            error=self.failure.to_body().error if self.state == "failed" and self.failure
            else None,
            split=self.split,
        )
