"""Admission of a split worker: SmolLM2's or a 70B model's layers over this node and RPC
peers, in proportion to the memory each offers (B204, B205).

llama.cpp keeps the first layers on the head node's CPU and puts the last `gpu_layers` on the
RPC devices (in the order given, by `tensor_split` when there are several). Each node must
hold its layers' weights, their KV cache and a compute margin; the estimate is the one of
`memory_estimate`. When the nodes together cannot hold the model the spawn is refused
before anything starts, naming every node with what it would need and what it has.

The head runs on the CPU in this version: a GPU head would add its cards to the split.
"""

from __future__ import annotations

from rbee_agent import resources
from rbee_agent.memory_estimate import MemoryNeed, ModelShape, ram_need
from rbee_agent.preflight import Admission, Reserved, effective_ctx
from rbee_agent.protocol import (
    CatalogEntry,
    ErrorCode,
    RbeeError,
    RpcPeer,
    SpawnRequest,
    SplitPart,
)
from rbee_agent.settings import AgentSettings
from rbee_agent.split_plan import layer_counts
from rbee_agent.worker_launch import Placement

HEAD = "head node"


def admit_split(request: SpawnRequest, model: CatalogEntry, settings: AgentSettings,
                reserved: Reserved) -> tuple[Admission, list[SplitPart]]:
    peers: list[RpcPeer] = request.rpc or []
    if request.backend != "cpu":
        raise RbeeError(
            ErrorCode.INVALID_REQUEST,
            "A split worker's head runs on the CPU in this version; its peers may serve a GPU",
            hint="Spawn the split with --backend cpu.", details={"backend": request.backend})
    shape = ModelShape.of_entry(model)
    ctx = effective_ctx(request, settings.worker_ctx_size, shape.context_length)
    slots = request.slots or settings.worker_slots
    margin = settings.compute_margin_mb
    layers = max(shape.layers, 1)
    local_free = resources.ram_available_mb() - settings.ram_reserve_mb - reserved.ram_mb
    asked = request.gpu_layers if isinstance(request.gpu_layers, int) else None
    counts = layer_counts(layers, local_free, [p.free_mb for p in peers], asked)
    names = [HEAD, *(p.node for p in peers)]
    frees = [local_free, *(p.free_mb for p in peers)]
    needs = [ram_need(shape, ctx, slots, margin, layers - n) for n in counts]
    if any(need.total_mb > free for need, free in zip(needs, frees, strict=True)):
        raise _too_big(model, ctx, slots, names, counts, needs, frees)
    on_peers = sum(counts[1:])
    split = tuple(float(n) for n in counts[1:]) if len(peers) > 1 and on_peers else ()
    placement = Placement(devices=(), gpu_layers=on_peers, tensor_split=split)
    admission = Admission(ctx_size=ctx, slots=slots, placement=placement, ram=needs[0],
                          vram={})
    parts = [SplitPart(node=None, layers=counts[0])]
    parts += [SplitPart(node=p.node, layers=n, endpoint=p.endpoint)
              for p, n in zip(peers, counts[1:], strict=True)]
    return admission, parts


def _too_big(model: CatalogEntry, ctx: int, slots: int, names: list[str], counts: list[int],
             needs: list[MemoryNeed], frees: list[int]) -> RbeeError:
    rows = [{"node": name, "layers": n, **need.details(), "available_mb": free}
            for name, n, need, free in zip(names, counts, needs, frees, strict=True)]
    where = "; ".join(f"{r['node']} needs {r['required_mb']} MB for {r['layers']} layer(s) "
                      f"and has {r['available_mb']} MB" for r in rows)
    total_need = sum(n.total_mb for n in needs)
    return RbeeError(
        ErrorCode.INSUFFICIENT_RAM,
        f"Model {model.id} does not fit on these nodes together at ctx {ctx} × {slots} "
        f"slot(s) (about {total_need} MB; {sum(max(0, f) for f in frees)} MB free): {where}",
        hint="Add a node to the split, use a smaller ctx_size, stop workers on these nodes, "
             "or pick a smaller model.",
        details={"nodes": rows, "ctx_size": ctx, "slots": slots},
    )
