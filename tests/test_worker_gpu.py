"""B108: where the weights go. `--gpu-layers`, `--tensor-split`, and what the worker reports.

The CPU half runs everywhere. The tests marked `gpu` need an NVIDIA GPU and a llama.cpp built
with CUDA, and skip without them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable

import httpx
import pytest

from rbee_agent.worker import native
from rbee_agent.worker.engine import Engine, EngineConfig
from tests.support import REPO, WorkerProc, bundled_model_path, free_port

HAS_CUDA = native.supports_gpu_offload() and shutil.which("nvidia-smi") is not None
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA llama.cpp")


def run_worker_cli(*args: str) -> subprocess.CompletedProcess[str]:
    base = ["--worker-id", "w", "--model", str(bundled_model_path()), "--port",
            str(free_port()), "--api-key", "k"]
    return subprocess.run([sys.executable, "-m", "rbee_agent.worker", *base, *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest.mark.parametrize(("backend", "layers", "reported"), [
    ("cpu", None, 0), ("cpu", -1, 0), ("cuda", None, 30), ("cuda", -1, 30),
    ("cuda", 24, 24), ("cuda", 0, 0), ("cuda", 99, 30),
])
def test_b108_gpu_layers_are_reported_as_a_count_of_layers_total(
    backend: str, layers: int | None, reported: int
) -> None:
    engine = Engine(EngineConfig(model_path=bundled_model_path(), backend=backend,
                                 gpu_layers=layers))
    assert (engine.gpu_layers, engine.layers_total) == (reported, 30)


@pytest.mark.parametrize(("args", "message"), [
    (["--tensor-split", "3,x"], "not a comma-separated list of numbers"),
    (["--tensor-split", "0,0"], "not all 0"),
    (["--tensor-split", "1,-1"], "must be ≥ 0"),
])
def test_b108_bad_tensor_split_is_a_usage_error(args: list[str], message: str) -> None:
    r = run_worker_cli(*args)
    assert r.returncode == 2 and message in r.stderr


def test_b108_bad_gpu_layers_and_queue_settings_exit_1_with_one_line() -> None:
    for args, message in ((["--gpu-layers", "-2"], "--gpu-layers"),
                          (["--queue-depth", "-1"], "--queue-depth"),
                          (["--queue-timeout", "0"], "--queue-timeout"),
                          (["--prefill-chunk", "4"], "--prefill-chunk")):
        r = run_worker_cli(*args)
        assert r.returncode == 1, r.stderr
        assert r.stderr.strip().count("\n") == 0 and message in r.stderr


def test_b108_cpu_worker_reports_no_layers_on_the_gpu(worker: WorkerProc) -> None:
    health = httpx.get(f"{worker.url}/v1/health").json()
    assert (health["gpu_layers"], health["layers_total"]) == (0, 30)


# ---------------------------------------------------------------- on a real GPU


def gpu_worker(start_worker: Callable[..., WorkerProc], *args: str) -> WorkerProc:
    return start_worker("--backend", "cuda", "--device", "0", *args)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("layers", ["-1", "10"])
def test_b108_cuda_worker_offloads_and_generates(
    start_worker: Callable[..., WorkerProc], layers: str
) -> None:
    w = gpu_worker(start_worker, "--gpu-layers", layers)
    health = httpx.get(f"{w.url}/v1/health").json()
    assert health["gpu_layers"] == (30 if layers == "-1" else 10)
    r = httpx.post(f"{w.url}/v1/inference", headers=w.headers, timeout=60,
                   json={"prompt": "The capital of France is", "max_tokens": 8,
                         "temperature": 0, "stream": False})
    assert r.status_code == 200 and r.json()["total_tokens"] == 8
    assert "Paris" in r.json()["text"]


@pytest.mark.gpu
@needs_cuda
def test_b108_cuda_worker_batches_four_streams(start_worker: Callable[..., WorkerProc]) -> None:
    w = gpu_worker(start_worker, "--slots", "4")
    bodies = [{"prompt": p, "max_tokens": 16, "temperature": 0, "stream": False}
              for p in ("Once upon a time", "1, 2, 3,", "Bees are", "The sky is")]
    with httpx.Client(headers=w.headers, timeout=60) as client:
        replies = [client.post(f"{w.url}/v1/inference", json=b) for b in bodies]
    assert all(r.status_code == 200 and r.json()["total_tokens"] == 16 for r in replies)
