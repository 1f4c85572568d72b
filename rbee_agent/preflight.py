"""Admission of a spawn: backend, device, context, and whether the memory it needs is free.

Runs before any process starts (B25): the backend must be known (INVALID_BACKEND) and on
this node (BACKEND_UNAVAILABLE), the device must exist (DEVICE_NOT_FOUND), and the estimate
of `memory_estimate` must fit what is free, less what loading workers are still about to
take (B121, B122). A cuda spawn without a device is placed on the GPU with the most free
VRAM that fits it (B126); `gpu_layers: "auto"` keeps as many layers on the GPU as fit and
the rest on the CPU (B129); `devices: [a, b]` splits one model over several GPUs in
proportion to their free VRAM.

The context: a spawn that names `ctx_size` gets it; otherwise the agent's default, capped
at the model's trained context (B121).

This module reads resources (RAM, NVML through `resources`) and starts nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rbee_agent import resources
from rbee_agent.memory_estimate import (
    MemoryNeed,
    ModelShape,
    auto_gpu_layers,
    kv_cache_mb,
    ram_need,
    vram_need,
)
from rbee_agent.protocol import (
    BACKENDS,
    CatalogEntry,
    ErrorCode,
    GpuInfo,
    RbeeError,
    SpawnRequest,
)
from rbee_agent.settings import AgentSettings
from rbee_agent.worker_launch import Placement


@dataclass(frozen=True)
class Reserved:
    """Memory that workers still loading will take on top of what they hold now (MiB)."""

    ram_mb: int = 0
    vram_mb: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Admission:
    ctx_size: int
    slots: int
    placement: Placement
    ram: MemoryNeed
    vram: dict[int, MemoryNeed]

    @property
    def device(self) -> int:
        return self.placement.devices[0] if self.placement.devices else 0


def effective_ctx(request: SpawnRequest, default: int, trained: int) -> int:
    if request.ctx_size is not None:
        return request.ctx_size
    return min(default, trained) if trained > 0 else default


def admit(request: SpawnRequest, model: CatalogEntry, settings: AgentSettings,
          reserved: Reserved) -> Admission:
    _check_backend(request.backend)
    shape = ModelShape.of_entry(model)
    ctx = effective_ctx(request, settings.worker_ctx_size, shape.context_length)
    slots = request.slots or settings.worker_slots
    if request.backend == "cuda":
        placement, vram = _place_on_gpus(request, model, shape, ctx, slots, settings, reserved)
    else:
        _check_cpu_device(request)
        placement, vram = Placement(devices=(0,) if request.backend == "metal" else ()), {}
    gpu_layers = placement.gpu_layers if placement.gpu_layers >= 0 else shape.layers
    ram = ram_need(shape, ctx, slots, settings.compute_margin_mb,
                   gpu_layers if request.backend == "cuda" else 0)
    _check_ram(model, shape, ctx, slots, ram, settings, reserved)
    return Admission(ctx_size=ctx, slots=slots, placement=placement, ram=ram, vram=vram)


# --------------------------------------------------------------------------- checks


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise RbeeError(
            ErrorCode.INVALID_BACKEND,
            f"Unknown backend {backend!r}",
            hint=f"Use one of: {', '.join(BACKENDS)}.",
            details={"backend": backend, "valid": list(BACKENDS)},
        )
    available = resources.backends(len(resources.gpus()))
    if backend not in available:
        raise RbeeError(
            ErrorCode.BACKEND_UNAVAILABLE,
            f"Backend {backend} is not available on this node",
            hint=f"Available here: {', '.join(available)}.",
            details={"backend": backend, "available": list(available)},
        )


def _check_cpu_device(request: SpawnRequest) -> None:
    asked = request.devices or ([request.device] if request.device is not None else [])
    if any(d != 0 for d in asked):
        bad = next(d for d in asked if d != 0)
        raise RbeeError(
            ErrorCode.DEVICE_NOT_FOUND,
            f"The {request.backend} backend has only device 0, not {bad}",
            hint=f"Leave --device out for {request.backend} workers.",
            details={"device": bad, "devices": [0]},
        )
    if request.gpu_layers not in (None, 0) and request.backend == "cpu":
        raise RbeeError(
            ErrorCode.INVALID_REQUEST,
            "gpu_layers needs a GPU backend; a cpu worker runs every layer on the CPU",
            hint="Spawn with --backend cuda, or leave --gpu-layers out.",
            details={"gpu_layers": request.gpu_layers},
        )


def _check_ram(model: CatalogEntry, shape: ModelShape, ctx: int, slots: int,
               need: MemoryNeed, settings: AgentSettings, reserved: Reserved) -> None:
    have_mb = resources.ram_available_mb()
    usable = have_mb - settings.ram_reserve_mb - reserved.ram_mb
    if need.total_mb <= usable:
        return
    fits = _largest_ctx(shape, slots, usable - need.weights_mb - need.compute_mb,
                        shape.layers)
    hint = "Stop other workers, pick a smaller model"
    hint += f", or spawn with ctx_size {fits} or less." if fits >= 16 and fits < ctx else "."
    raise RbeeError(
        ErrorCode.INSUFFICIENT_RAM,
        f"Model {model.id} needs about {need.describe()} of RAM at ctx {ctx} × {slots} "
        f"slot(s); {have_mb} MB is available"
        + (f", {reserved.ram_mb} MB of it promised to loading workers" if reserved.ram_mb
           else ""),
        hint=hint,
        details={**need.details(), "available_mb": have_mb, "reserved_mb": reserved.ram_mb,
                 "reserve_mb": settings.ram_reserve_mb, "ctx_size": ctx, "slots": slots},
    )


def _largest_ctx(shape: ModelShape, slots: int, room_mb: int, layers: int) -> int:
    """The largest context whose KV cache fits `room_mb` (0 when none, or unknown shape)."""
    per_token = kv_cache_mb(shape, 1024, slots, layers) / 1024
    if per_token <= 0 or room_mb <= 0:
        return 0
    return int(room_mb / per_token) // 256 * 256


# --------------------------------------------------------------------------- GPUs


def _place_on_gpus(request: SpawnRequest, model: CatalogEntry, shape: ModelShape, ctx: int,
                   slots: int, settings: AgentSettings, reserved: Reserved,
                   ) -> tuple[Placement, dict[int, MemoryNeed]]:
    gpus = {g.index: g for g in resources.gpus()}
    asked = request.devices or ([request.device] if request.device is not None else [])
    for index in asked:
        if index not in gpus:
            raise RbeeError(
                ErrorCode.DEVICE_NOT_FOUND,
                f"No CUDA device {index} on this node",
                hint=f"Devices here: {', '.join(map(str, sorted(gpus))) or 'none'}.",
                details={"device": index, "devices": sorted(gpus)},
            )
    free = {i: _usable_vram(g, settings, reserved) for i, g in gpus.items()}
    margin = settings.compute_margin_mb
    if len(asked) > 1:
        return _split(request, model, shape, ctx, slots, [gpus[i] for i in asked], free,
                      margin)
    candidates = [gpus[asked[0]]] if asked else sorted(
        gpus.values(), key=lambda g: _or_unknown(free[g.index]), reverse=True)
    layers = _fixed_layers(request, shape)
    for gpu in candidates:
        room = free[gpu.index]
        if request.gpu_layers == "auto":
            layers = shape.layers if room is None else auto_gpu_layers(
                shape, ctx, slots, margin, room)
            if layers == 0:
                continue
        need = vram_need(shape, ctx, slots, margin, layers)
        if room is None or need.total_mb <= room:
            return _placement((gpu.index,), layers, shape), {gpu.index: need}
    raise _no_vram(model, shape, ctx, slots, candidates, free, margin, layers, request)


def _or_unknown(room: int | None) -> int:
    return -1 if room is None else room


def _fixed_layers(request: SpawnRequest, shape: ModelShape) -> int:
    if isinstance(request.gpu_layers, int) and request.gpu_layers >= 0:
        return min(request.gpu_layers, shape.layers) if shape.layers else request.gpu_layers
    return shape.layers  # None or -1: every layer


def _placement(devices: tuple[int, ...], layers: int, shape: ModelShape,
               split: tuple[float, ...] = ()) -> Placement:
    everything = shape.layers == 0 or layers >= shape.layers
    return Placement(devices=devices, gpu_layers=-1 if everything else layers,
                     tensor_split=split)


def _usable_vram(gpu: GpuInfo, settings: AgentSettings, reserved: Reserved) -> int | None:
    if gpu.vram_free_mb is None:
        return None  # NVML does not say: the worker will find out
    return gpu.vram_free_mb - settings.vram_reserve_mb - reserved.vram_mb.get(gpu.index, 0)


def _split(request: SpawnRequest, model: CatalogEntry, shape: ModelShape, ctx: int, slots: int,
           gpus: list[GpuInfo], free: dict[int, int | None], margin: int,
           ) -> tuple[Placement, dict[int, MemoryNeed]]:
    """One model over several GPUs: each gets layers in proportion to its free VRAM."""
    rooms = {g.index: max(0, free[g.index] or 0) for g in gpus}
    total = sum(rooms.values())
    shares = {i: (r / total if total else 1 / len(gpus)) for i, r in rooms.items()}

    def needs(layers: int) -> dict[int, MemoryNeed]:
        return {i: vram_need(shape, ctx, slots, margin, layers, share)
                for i, share in shares.items()}

    def fits(layers: int) -> bool:
        return all(free[i] is None or n.total_mb <= rooms[i] for i, n in needs(layers).items())

    layers = _fixed_layers(request, shape)
    if request.gpu_layers == "auto":
        layers = max((n for n in range(shape.layers + 1) if fits(n)), default=0)
    if layers > 0 and fits(layers):
        split = tuple(round(shares[g.index], 4) for g in gpus)
        return _placement(tuple(g.index for g in gpus), layers, shape, split), needs(layers)
    raise _no_vram(model, shape, ctx, slots, gpus, free, margin, max(layers, 1), request,
                   shares)


def _no_vram(model: CatalogEntry, shape: ModelShape, ctx: int, slots: int,
             gpus: list[GpuInfo], free: dict[int, int | None], margin: int, layers: int,
             request: SpawnRequest, shares: dict[int, float] | None = None) -> RbeeError:
    rows = []
    for gpu in gpus:
        share = shares[gpu.index] if shares else 1.0
        need = vram_need(shape, ctx, slots, margin, layers or shape.layers, share)
        rows.append({"device": gpu.index, "name": gpu.name, **need.details(),
                     "free_mb": gpu.vram_free_mb, "usable_mb": free[gpu.index]})
    where = "; ".join(f"GPU {r['device']} ({r['name']}) needs {r['required_mb']} MB and has "
                      f"{r['free_mb']} MB free" for r in rows)
    first = rows[0]
    hint = ("Use a smaller ctx_size, fewer GPU layers (gpu_layers N, or \"auto\" to keep the "
            "rest on the CPU), stop workers on those GPUs, or spawn on another node.")
    if request.gpu_layers == "auto":
        hint = ("Not even one layer fits: stop workers on those GPUs, use a smaller ctx_size, "
                "spawn with --backend cpu, or on another node.")
    return RbeeError(
        ErrorCode.INSUFFICIENT_VRAM,
        f"Model {model.id} does not fit in VRAM at ctx {ctx} × {slots} slot(s): {where}",
        hint=hint,
        details={"required_mb": first["required_mb"], "available_mb": first["free_mb"],
                 "device": first["device"], "gpus": rows, "ctx_size": ctx, "slots": slots,
                 "gpu_layers": request.gpu_layers},
    )
