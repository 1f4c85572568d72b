"""The plan a split would get, shown in the spawn dialog before anything starts (B210).

Same arithmetic as the head agent's admission (`rbee_agent.split_plan.layer_counts` and
`memory_estimate.ram_need`), fed with what the dashboard last polled: each node's free RAM
(or the GPU's free VRAM a peer would serve), less the agents' default reserve. The agent
decides at spawn time from what each RPC server offers then, so the preview says "about";
the load progress and the finished worker give the real layers per node.
"""

from __future__ import annotations

from dataclasses import dataclass

from rbee_agent.memory_estimate import ModelShape, ram_need
from rbee_agent.protocol import CatalogEntry, NodeInfo
from rbee_agent.settings import AgentSettings
from rbee_agent.split_plan import layer_counts

DEFAULTS = AgentSettings.model_construct()  # the agent's defaults (reserve, ctx, slots)


@dataclass(frozen=True)
class PlannedPart:
    node: str
    layers: int
    need_mb: int
    free_mb: int | None  # None: the node was not polled yet

    def line(self) -> str:
        free = "free unknown" if self.free_mb is None else f"{self.free_mb} MB free"
        warn = " — does not fit" if self.free_mb is not None and self.need_mb > self.free_mb \
            else ""
        return f"{self.node}: {self.layers} layers, ~{self.need_mb} MB ({free}){warn}"


def offered_mb(info: NodeInfo | None, device: str) -> int | None:
    """What a node offers a split: available RAM, or a GPU's free VRAM, less the reserve."""
    if info is None:
        return None
    if device.startswith("cuda"):
        index = int(device.removeprefix("cuda") or 0)
        gpu = next((g for g in info.gpus if g.index == index), None)
        if gpu is None or gpu.vram_free_mb is None:
            return None
        return max(0, gpu.vram_free_mb - DEFAULTS.vram_reserve_mb)
    return max(0, info.ram_available_mb - DEFAULTS.ram_reserve_mb)


def plan(model: CatalogEntry, head: tuple[str, NodeInfo | None],
         peers: list[tuple[str, NodeInfo | None]], device: str = "cpu",
         ctx_size: int | None = None, slots: int | None = None,
         peer_layers: int | None = None) -> list[PlannedPart]:
    shape = ModelShape.of_entry(model)
    trained = shape.context_length
    ctx = ctx_size or (min(DEFAULTS.worker_ctx_size, trained) if trained > 0
                       else DEFAULTS.worker_ctx_size)
    slots = slots or DEFAULTS.worker_slots
    frees = [offered_mb(head[1], "cpu"), *(offered_mb(info, device) for _, info in peers)]
    counts = layer_counts(shape.layers, frees[0] or 0, [f or 0 for f in frees[1:]],
                          peer_layers)
    layers = max(shape.layers, 1)
    return [PlannedPart(name, n, ram_need(shape, ctx, slots, DEFAULTS.compute_margin_mb,
                                          layers - n).total_mb, free)
            for (name, _), n, free in zip([head, *peers], counts, frees, strict=True)]
