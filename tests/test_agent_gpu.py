"""What only a real GPU can prove (B126, B129): marked `gpu`, skipped without CUDA.

Run on a GPU node with `.venv/bin/python -m pytest -m gpu tests/test_agent_gpu.py` (a
llama-cpp-python built with CUDA; docs/benchmarks.md records where it last ran). Everything
else about placement is proven on any machine through the fake NVML in
tests/test_agent_placement.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from rbee_agent import resources
from rbee_agent.llama_probe import gpu_offload
from rbee_agent.memory_estimate import ModelShape, vram_need
from rbee_agent.protocol import CatalogEntry
from tests.agent_support import AgentProc
from tests.support import LONG_PROMPT, sse_data

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


def _nvml_process_pids(index: int) -> set[int]:
    """The pids NVML sees holding memory on GPU `index` (compute processes)."""
    import pynvml

    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return {p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}
    finally:
        pynvml.nvmlShutdown()


def test_b126_node_vram_is_what_nvml_says(agent: AgentProc) -> None:
    worker = agent.spawn(backend="cuda")
    agent.wait_state(worker["id"], "idle", timeout=120)
    reported = {g["index"]: g for g in agent.get("/v1/node").json()["gpus"]}
    for gpu in resources.gpus():
        mine = reported[gpu.index]
        assert mine["vram_total_mb"] == gpu.vram_total_mb
        # used memory moves between the two reads only by what other processes allocate
        assert mine["vram_used_mb"] is not None and gpu.vram_used_mb is not None
        assert abs(mine["vram_used_mb"] - gpu.vram_used_mb) <= 64
    agent.delete(f"/v1/workers/{worker['id']}")


def test_b29_idle_timeout_frees_the_vram(start_agent: Callable[..., AgentProc]) -> None:
    a = start_agent(**{"idle-timeout-s": "2", "idle-check-s": "0.2"})
    worker = a.spawn(backend="cuda")
    info = a.wait_state(worker["id"], "idle", timeout=120)
    device = info["device"]
    assert info["pid"] in _nvml_process_pids(device)
    a.wait_gone(worker["id"], timeout=60)
    assert info["pid"] not in _nvml_process_pids(device)


def test_b33_stream_and_cancel_on_a_gpu(agent: AgentProc) -> None:
    worker = agent.spawn(backend="cuda")
    agent.wait_state(worker["id"], "idle", timeout=120)
    url = f"{agent.url}/v1/workers/{worker['id']}"
    with httpx.stream("POST", f"{url}/inference", timeout=60,
                      headers={**agent.headers, "X-Request-Id": "gpu-cancel"},
                      json={"prompt": LONG_PROMPT, "max_tokens": 4000, "temperature": 0,
                            "ignore_eos": True}) as r:
        frames = sse_data(r)
        tokens = [json.loads(next(frames)) for _ in range(8)]
        assert all("token" in t for t in tokens)
        assert httpx.delete(f"{url}/inference/gpu-cancel", headers=agent.headers
                            ).status_code == 204
        rest = [json.loads(f) for f in frames if f != "[DONE]"]
    assert rest[-1]["finish_reason"] == "cancelled"
    again = agent.post(f"/v1/workers/{worker['id']}/inference",
                       json={"prompt": "The capital of France is", "max_tokens": 4,
                             "temperature": 0, "stream": False})
    assert again.status_code == 200 and again.json()["total_tokens"] == 4
    agent.delete(f"/v1/workers/{worker['id']}")
