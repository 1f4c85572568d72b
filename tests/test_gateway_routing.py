"""The gateway's choice of node, from node states as agents report them (B186, B188).
The same choices are made end to end, against real agents, in test_gateway.py."""

from __future__ import annotations

import time
from typing import Any

import pytest

from rbee_agent.protocol import CatalogEntry, ErrorCode, GpuInfo, NodeInfo, RbeeError, WorkerInfo
from rbee_gateway.routing import Fleet, NodeState, split_pin
from rbee_tui.config import Config, Node
from rbee_tui.links import NodeLinks

MODEL = "smollm2-135m"


def fleet(*names: str) -> Fleet:
    nodes = {n: Node(name=n, transport="direct", api_key="k") for n in names}
    config = Config(nodes=nodes)
    found = Fleet(config, NodeLinks(config))
    for state in found.states.values():
        state.up = state.name in names  # localhost is always registered; here it is down
        state.fetched_at = time.monotonic()
    return found


def worker(state: str = "idle", active: int = 0, slots: int = 1, model: str = MODEL
           ) -> WorkerInfo:
    return WorkerInfo(id="w", model_id=model, model_ref=f"bundled:{model}", backend="cpu",
                      device=0, url="http://x", state=state, slots_total=slots,
                      slots_available=slots, pid=1, started_at=0, last_activity=0,
                      active_requests=active)


def entry(model: str = MODEL) -> CatalogEntry:
    return CatalogEntry(id=model, provider="bundled", reference=f"bundled:{model}",
                        local_path="/m.gguf", size_bytes=1, quantization="Q4_1",
                        architecture="llama", layers=30, context_length=2048, added_at=0)


def info(ram_mb: int = 1000, vram_free_mb: list[int] | None = None) -> NodeInfo:
    gpus = [GpuInfo(index=i, name="gpu", vram_free_mb=free)
            for i, free in enumerate(vram_free_mb or [])]
    return NodeInfo(hostname="h", os="linux", arch="x86_64", cpu_count=2, cpu_percent=0,
                    ram_total_mb=4000, ram_available_mb=ram_mb, models_dir="/m",
                    disk_free_mb=1, backends=["cpu"], gpus=gpus)


def have(state: NodeState, **fields: Any) -> None:
    state.models = fields.pop("models", [entry()])
    state.workers = fields.pop("workers", [])
    state.info = fields.pop("info", info())


def test_b186_an_idle_warm_worker_wins_over_free_memory() -> None:
    f = fleet("a", "b", "c")
    have(f.states["a"], info=info(vram_free_mb=[80_000]))
    have(f.states["b"], workers=[worker("busy", active=1)])
    have(f.states["c"], workers=[worker("idle")])
    assert f.candidates(MODEL) == ["c", "b", "a"]


def test_b186_least_loaded_per_slot_and_the_gateways_own_requests_count() -> None:
    f = fleet("a", "b")
    have(f.states["a"], workers=[worker("busy", active=2, slots=4)])
    have(f.states["b"], workers=[worker("busy", active=1, slots=1)])
    assert f.candidates(MODEL) == ["a", "b"]  # 0.5 per slot beats 1.0
    for _ in range(3):  # requests sent since the last answer from the node
        f.states["a"].inflight[MODEL] += 1
    assert f.candidates(MODEL) == ["b", "a"]


def test_b186_loading_then_catalog_by_free_vram_or_ram_then_fetchable() -> None:
    f = fleet("a", "b", "c", "d")
    have(f.states["a"], info=info(ram_mb=9_000))
    have(f.states["b"], info=info(ram_mb=100, vram_free_mb=[20_000, 30_000]))
    have(f.states["c"], workers=[worker("loading")])
    have(f.states["d"], models=[], info=info(ram_mb=5_000))
    assert f.candidates(MODEL) == ["c", "b", "a"]  # d has not got it and cannot fetch it
    assert f.candidates("hf:org/repo") == ["b", "a", "d", "c"]


def test_b186_unknown_model_and_no_node_up_are_clear_errors() -> None:
    f = fleet("a")
    have(f.states["a"])
    with pytest.raises(RbeeError) as missing:
        f.candidates("gpt-4o")
    assert missing.value.code == ErrorCode.MODEL_NOT_FOUND and MODEL in str(missing.value)
    f.mark_down("a", "connection refused")
    with pytest.raises(RbeeError) as down:
        f.candidates(MODEL)
    assert down.value.code == ErrorCode.AGENT_UNREACHABLE
    assert "a: connection refused" in down.value.message


def test_b186_a_pin_names_a_registered_node_else_it_is_a_revision() -> None:
    nodes = ["localhost", "gpu1"]
    assert split_pin("smollm2-135m@gpu1", nodes) == ("smollm2-135m", "gpu1")
    assert split_pin("hf:org/repo@main", nodes) == ("hf:org/repo@main", None)
    assert split_pin("hf:org/repo@main@gpu1", nodes) == ("hf:org/repo@main", "gpu1")
    assert split_pin("@gpu1", nodes) == ("@gpu1", None)


async def test_b188_a_pinned_node_that_is_down_is_named() -> None:
    f = fleet("a")
    f.mark_down("a", "connection refused")
    f.settings.gateway_refresh_timeout_s = 0.5
    with pytest.raises(RbeeError) as caught:
        await f.plan(f"{MODEL}@a")  # asked again first: still nothing listens
    assert caught.value.code == ErrorCode.AGENT_UNREACHABLE
    assert "Node 'a' is down" in caught.value.message
