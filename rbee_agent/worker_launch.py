"""The command line and environment a worker process is started with (B124, B126).

A worker gets only what it needs (principle 6): an allow-listed slice of the agent's
environment (never `RBEE_AGENT_API_KEY` or anything else of the agent's), its own key in
`RBEE_WORKER_API_KEY`, and for a GPU worker the devices it may see. CUDA numbers devices in
its own "fastest first" order unless told otherwise; NVML, which placement reads, numbers
them by PCI bus, so `CUDA_DEVICE_ORDER=PCI_BUS_ID` makes "GPU 1" the same card for both.
Inside the worker the visible cards are numbered from 0, so the worker is told device 0.
"""

from __future__ import annotations

import fnmatch
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from rbee_agent.settings import WORKER_ENV_ALLOWED, AgentSettings

API_KEY_ENV = "RBEE_WORKER_API_KEY"


@dataclass(frozen=True)
class Placement:
    """Where a worker's model runs: GPU indexes as NVML numbers them (empty: CPU only), how
    many layers go to the GPUs (-1: all), and each GPU's share of them."""

    devices: tuple[int, ...] = ()
    gpu_layers: int = 0
    tensor_split: tuple[float, ...] = ()


@dataclass(frozen=True)
class LaunchSpec:
    worker_id: str
    model_path: str
    host: str
    port: int
    backend: str
    ctx_size: int
    slots: int
    placement: Placement
    rpc: tuple[str, ...] = ()  # a split worker's RPC servers (B204)


def worker_env(api_key: str, backend: str, placement: Placement,
               source: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker process, built from an allow-list."""
    env = allowed_env(source)
    env[API_KEY_ENV] = api_key
    env["PYTHONUNBUFFERED"] = "1"
    if backend == "cuda":
        visible = ",".join(str(d) for d in placement.devices)
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["CUDA_VISIBLE_DEVICES"] = visible
        env["HIP_VISIBLE_DEVICES"] = visible  # a ROCm build of llama.cpp reads this one
    return env


def allowed_env(source: Mapping[str, str] | None = None) -> dict[str, str]:
    """The allow-listed slice of the agent's environment a child process may see."""
    environ = os.environ if source is None else source
    return {name: value for name, value in environ.items() if _allowed(name)}


def _allowed(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in WORKER_ENV_ALLOWED)


def worker_command(spec: LaunchSpec, settings: AgentSettings) -> list[str]:
    gpu = spec.backend != "cpu"
    cmd = [
        sys.executable, "-m", "rbee_agent.worker",
        "--worker-id", spec.worker_id, "--model", spec.model_path,
        "--port", str(spec.port), "--host", spec.host,
        # A pinned worker sees only its cards, numbered from 0.
        "--backend", spec.backend, "--device", "0",
        "--ctx-size", str(spec.ctx_size), "--slots", str(spec.slots),
        "--callback-url", f"{settings.url}/v1/workers/ready",
        "--drain-timeout", str(settings.stop_grace_s),
        "--parent-pid", str(os.getpid()),
        "--max-request-bytes", str(settings.max_request_bytes),
    ]
    if settings.worker_threads:
        cmd += ["--threads", str(settings.worker_threads)]
    cmd += ["--queue-depth", str(settings.worker_queue_depth),
            "--queue-timeout", str(settings.worker_queue_timeout_s)]
    if spec.rpc:
        cmd += ["--rpc", ",".join(spec.rpc)]
    if gpu or spec.rpc:
        cmd += ["--gpu-layers", str(spec.placement.gpu_layers)]
        if len(spec.placement.tensor_split) > 1:
            cmd += ["--tensor-split", ",".join(f"{s:.4g}" for s in spec.placement.tensor_split)]
    return cmd
