"""What only a real GPU can prove (B126, B129): marked `gpu`, skipped without CUDA.

Run on a GPU node with `.venv/bin/python -m pytest -m gpu tests/test_agent_gpu.py` (a
llama-cpp-python built with CUDA; docs/benchmarks.md records where it last ran). Everything
else about placement is proven on any machine through the fake NVML in
tests/test_agent_placement.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rbee_agent import resources
from rbee_agent.llama_probe import gpu_offload
from rbee_agent.memory_estimate import ModelShape, vram_need
from rbee_agent.protocol import CatalogEntry
from tests.agent_support import AgentProc

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not resources.gpus() or not gpu_offload(),
                       reason="needs an NVIDIA GPU and a llama.cpp built with CUDA"),
]


def test_b126_cuda_worker_is_pinned_and_its_vram_matches_nvml_and_the_estimate(
    agent: AgentProc,
) -> None:
    r = agent.post("/v1/workers", json={"model_ref": "smollm2-135m", "backend": "cuda"})
    assert r.status_code == 201, r.text
    worker = r.json()["worker"]
    device = worker["device"]
    environ = Path(f"/proc/{worker['pid']}/environ").read_bytes().split(b"\0")
    assert f"CUDA_VISIBLE_DEVICES={device}".encode() in environ
    info = agent.wait_state(worker["id"], "idle", timeout=120)
    assert info["gpu_layers"] == info["layers_total"]
    node = agent.get("/v1/node").json()
    assert node["gpu_offload"] is True
    assert info["vram_mb"] and info["vram_mb"] > 0
    # the estimate the spawn was admitted with, against what NVML shows after load
    model = next(CatalogEntry.model_validate(m) for m in agent.get("/v1/models").json()["models"]
                 if m["id"] == "smollm2-135m")
    shape = ModelShape.of_entry(model)
    need = vram_need(shape, info["ctx_size"], info["slots_total"], 64, shape.layers)
    assert abs(need.total_mb - info["vram_mb"]) / info["vram_mb"] < 0.15
    agent.delete(f"/v1/workers/{worker['id']}")


def test_b129_auto_layers_on_a_real_gpu_serves(agent: AgentProc) -> None:
    worker = agent.spawn(backend="cuda", gpu_layers="auto")
    info = agent.wait_state(worker["id"], "idle", timeout=120)
    assert 0 < info["gpu_layers"] <= info["layers_total"]
    r = agent.post(f"/v1/workers/{worker['id']}/inference",
                   json={"prompt": "The capital of France is", "max_tokens": 4,
                         "temperature": 0, "stream": False})
    assert r.status_code == 200 and r.json()["total_tokens"] == 4
    agent.delete(f"/v1/workers/{worker['id']}")
