"""Worker operations (B24-B30, B74, B147, B148): spawn with loading progress, stop while the
agent drains, and the workers of every node at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from rbee_agent.model_refs import parse_model_ref
from rbee_agent.protocol import (
    BACKENDS,
    ErrorBody,
    ErrorCode,
    RbeeError,
    RpcPeer,
    SpawnRequest,
    WorkerInfo,
)
from rbee_tui.client import AgentClient
from rbee_tui.config import Config, OperatorSettings
from rbee_tui.events import Event, Finished, PhaseDone, PhaseStarted, Progress
from rbee_tui.links import NodeLinks
from rbee_tui.ops.models import download_progress


@dataclass(frozen=True)
class SpawnSpec:
    node: str
    model_ref: str
    backend: str | None = "cpu"  # None: cuda when the node has it, else cpu
    device: int | None = None  # None: GPU placement by the agent (B126); cpu → 0
    new: bool = False  # start another even when an idle one could be handed back
    # None: the agent's defaults (B120); gpu_layers -1 = all, "auto" = as many as fit (B129)
    ctx_size: int | None = None
    slots: int | None = None
    gpu_layers: int | Literal["auto"] | None = None
    rpc: tuple[RpcPeer, ...] = ()  # a split worker's RPC servers, tunnelled (B204)


def validate_spawn(spec: SpawnSpec, config: Config) -> None:
    """B57: what can be checked without the network, checked first."""
    config.node(spec.node)
    parse_model_ref(spec.model_ref)
    if spec.backend is not None and spec.backend not in BACKENDS:
        raise RbeeError(ErrorCode.INVALID_BACKEND, f"Unknown backend {spec.backend!r}",
                        hint=f"Use one of: {', '.join(BACKENDS)}.")
    if spec.device is not None and spec.device < 0:
        raise RbeeError(ErrorCode.DEVICE_NOT_FOUND, f"Device {spec.device} does not exist",
                        hint="Devices are numbered from 0; see rbee nodes check NODE.")


def parse_gpu_layers(text: str) -> int | Literal["auto"] | None:
    """'' → the agent's default, 'all' → -1, 'auto' → as many as fit, or a count (B129).

    Raises ValueError for anything else."""
    value = text.strip().lower()
    if not value:
        return None
    if value == "all":
        return -1
    if value == "auto":
        return "auto"
    if value.isdigit():
        return int(value)
    raise ValueError(f"{text!r} is not a layer count, 'all' or 'auto'")


def layers_on_gpu(worker: WorkerInfo) -> str:
    """"24/30": layers offloaded to the GPU of the model's total (B172), as the dashboard
    and `rbee workers list` show it; "-" on a CPU."""
    if worker.backend == "cpu" or worker.gpu_layers is None:
        return "-"
    total, layers = worker.layers_total, worker.gpu_layers
    if not total:
        return "all" if layers < 0 else str(layers)
    if layers < 0 or layers > total:  # -1 asks llama.cpp for every layer
        layers = total
    return f"{layers}/{total}"


def ready_message(worker: WorkerInfo) -> str:
    """The spawn's summary: where the worker is, and its GPU layers when it has any."""
    on_gpu = ""
    if worker.backend != "cpu" and worker.gpu_layers:  # None or 0: nothing on a GPU
        on_gpu = f", {layers_on_gpu(worker)} layers on GPU"
    return f"worker {worker.id} is {worker.state} at {worker.url}{on_gpu}"


async def spawn_events(client: AgentClient, spec: SpawnSpec, settings: OperatorSettings
                       ) -> AsyncIterator[Event | WorkerInfo]:
    """Spawn (or be handed an idle worker) and follow the loading; the last item is the
    ready worker's WorkerInfo. The inference flow and `spawn` share this."""
    backend = spec.backend
    if backend is None:
        backend = "cuda" if "cuda" in (await client.node_info()).backends else "cpu"
    yield PhaseStarted("spawn", f"Starting a {backend} worker for {spec.model_ref}")
    reply = await client.spawn(SpawnRequest(
        model_ref=spec.model_ref, backend=backend, device=spec.device, new=spec.new,
        ctx_size=spec.ctx_size, slots=spec.slots, gpu_layers=spec.gpu_layers,
        rpc=list(spec.rpc) or None))
    worker = reply.worker
    if reply.reused:
        yield PhaseDone("spawn", f"handed back the existing {worker.state} worker {worker.id} "
                                 f"(pid {worker.pid}) instead of starting another; --new "
                                 "starts one anyway")
    else:
        yield PhaseDone("spawn", f"worker {worker.id} (pid {worker.pid})")
    if worker.state != "loading":
        yield worker
        return
    async for event in _follow_loading(client, worker, spec.node, settings):
        yield event


async def _follow_loading(client: AgentClient, worker: WorkerInfo, node: str,
                          settings: OperatorSettings) -> AsyncIterator[Event | WorkerInfo]:
    yield PhaseStarted("loading", f"Loading {worker.model_id}")
    layers, total = 0, worker.layers_total
    downloading = False
    try:
        async with asyncio.timeout(settings.loading_timeout_s):
            async for event in client.progress(worker.id):
                if event.stage == "failed" and event.error is not None:
                    raise RbeeError.from_body(ErrorBody(error=event.error))
                if event.stage == "downloading":  # an hf: model the node did not have yet
                    downloading = True
                    yield download_progress(event.bytes_downloaded or 0,
                                            event.bytes_total or 0, event.speed_mbps)
                    continue
                if downloading:
                    downloading = False
                    yield PhaseDone("download", "downloaded and verified")
                layers, total = event.layers_loaded, event.layers_total
                if event.stage == "ready":
                    break
                yield Progress("loading", layers, total, "layers")
    except TimeoutError:
        raise RbeeError(
            ErrorCode.LOADING_TIMEOUT,
            f"Worker {worker.id} did not finish loading {worker.model_id} within "
            f"{settings.loading_timeout_s:g} s: stuck at layer {layers} of {total}",
            hint="The node may be short of memory; see rbee logs --node "
            f"{node} --worker {worker.id}",
            details={"layers_loaded": layers, "layers_total": total, "worker_id": worker.id},
        ) from None
    yield Progress("loading", total, total, "layers")
    yield PhaseDone("loading", "ready")
    yield await client.worker(worker.id)


async def spawn(client: AgentClient, spec: SpawnSpec, settings: OperatorSettings
                ) -> AsyncIterator[Event]:
    """`rbee workers spawn` and the spawn dialog: the spawn and loading phases alone,
    ending with the worker."""
    from rbee_tui.ops.models import require_model

    await require_model(client, spec.model_ref)
    async for event in spawn_events(client, spec, settings):
        if isinstance(event, WorkerInfo):
            yield Finished(ready_message(event), event.model_dump())
        else:
            yield event


async def stop(client: AgentClient, worker_id: str, settings: OperatorSettings
               ) -> AsyncIterator[Event]:
    """B147: the agent lets the worker finish what it serves (its stop grace) before it
    kills it; the client waits as long as that may take and says so first."""
    yield PhaseStarted("stop", f"Stopping worker {worker_id} on {client.node}: running "
                               "requests finish first (up to "
                               f"{settings.worker_stop_timeout_s:g} s)")
    info = await client.stop_worker(worker_id)
    yield Finished(f"worker {info.id} ({info.model_id}) stopped", info.model_dump())


@dataclass(frozen=True)
class NodeWorkers:
    """One node's answer to a workers listing: its workers, or why there are none to show."""

    node: str
    workers: tuple[WorkerInfo, ...] = ()
    reason: str | None = None  # set when the node did not answer
    answered_at: float | None = None


async def list_all(links: NodeLinks, names: list[str], timeout_s: float) -> list[NodeWorkers]:
    """B141: every node asked at once, each within `timeout_s`; nothing is started."""
    import time

    async def one(name: str) -> NodeWorkers:
        try:
            async with asyncio.timeout(timeout_s):
                client = await links.peek(name)
                async with client:
                    workers = await client.workers()
        except RbeeError as err:
            return NodeWorkers(name, reason=err.message)
        except TimeoutError:
            return NodeWorkers(name, reason=f"no answer within {timeout_s:g} s")
        return NodeWorkers(name, tuple(workers), answered_at=time.time())

    return list(await asyncio.gather(*(one(name) for name in names)))

