"""What this node has and how busy it is: CPU, RAM, disk, backends and GPUs (B23).

`node_resources()` answers `GET /v1/node`; `ram_available_mb()` and `process_vram_mb()` feed
the supervisor's admission checks and worker rows. Sizes are MiB, written MB as nvidia-smi does.

Every NVML call goes through `_Nvml`, the one boundary tests replace (monkeypatch
`rbee_agent.resources._nvml`); nothing else in rbee imports pynvml. NVML is initialised once
per process, lazily and under a lock, and the outcome is cached: a node without the NVIDIA
driver (or without nvidia-ml-py) simply has no GPUs.

This module must never raise because a GPU, a driver or one NVML field is missing — it reports
less instead — and must never block for long: CPU load is sampled without waiting.
"""

from __future__ import annotations

import platform
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import psutil

from rbee_agent.protocol import Backend, GpuInfo, NodeInfo

MB = 1024 * 1024

T = TypeVar("T")


class NvmlBoundary(Protocol):
    """What resources.py asks of NVML. Every method answers `None`/empty when NVML cannot."""

    def device_count(self) -> int: ...
    def driver_version(self) -> str | None: ...
    def name(self, index: int) -> str | None: ...
    def uuid(self, index: int) -> str | None: ...
    def memory(self, index: int) -> tuple[int, int, int] | None: ...
    def utilization(self, index: int) -> int | None: ...
    def temperature(self, index: int) -> int | None: ...
    def power_mw(self, index: int) -> int | None: ...
    def compute_processes(self, index: int) -> list[tuple[int, int | None]]: ...


class _Nvml:
    """The only code that calls pynvml. A refused call (NVMLError) becomes `None`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._initialised = False
        self._lib: Any = None  # the pynvml module once nvmlInit succeeded

    def _nvml(self) -> Any:
        with self._lock:
            if not self._initialised:
                self._lib = _init_pynvml()
                self._initialised = True
            return self._lib

    def _call(self, fn: Callable[[Any], T]) -> T | None:
        lib = self._nvml()
        if lib is None:
            return None
        try:
            return fn(lib)
        except lib.NVMLError:
            return None

    def _on_device(self, index: int, fn: Callable[[Any, Any], T]) -> T | None:
        return self._call(lambda lib: fn(lib, lib.nvmlDeviceGetHandleByIndex(index)))

    def device_count(self) -> int:
        return self._call(lambda lib: int(lib.nvmlDeviceGetCount())) or 0

    def driver_version(self) -> str | None:
        return self._call(lambda lib: str(lib.nvmlSystemGetDriverVersion()))

    def name(self, index: int) -> str | None:
        return self._on_device(index, lambda lib, h: str(lib.nvmlDeviceGetName(h)))

    def uuid(self, index: int) -> str | None:
        return self._on_device(index, lambda lib, h: str(lib.nvmlDeviceGetUUID(h)))

    def memory(self, index: int) -> tuple[int, int, int] | None:
        """(total, used, free) in bytes."""

        def read(lib: Any, h: Any) -> tuple[int, int, int]:
            mem = lib.nvmlDeviceGetMemoryInfo(h)
            return int(mem.total), int(mem.used), int(mem.free)

        return self._on_device(index, read)

    def utilization(self, index: int) -> int | None:
        return self._on_device(index, lambda lib, h: int(lib.nvmlDeviceGetUtilizationRates(h).gpu))

    def temperature(self, index: int) -> int | None:
        return self._on_device(
            index, lambda lib, h: int(lib.nvmlDeviceGetTemperature(h, lib.NVML_TEMPERATURE_GPU))
        )

    def power_mw(self, index: int) -> int | None:
        return self._on_device(index, lambda lib, h: int(lib.nvmlDeviceGetPowerUsage(h)))

    def compute_processes(self, index: int) -> list[tuple[int, int | None]]:
        """(pid, bytes used or None when the driver hides it) per compute process."""

        def read(lib: Any, h: Any) -> list[tuple[int, int | None]]:
            procs = lib.nvmlDeviceGetComputeRunningProcesses(h)
            return [(int(p.pid), _int_or_none(p.usedGpuMemory)) for p in procs]

        return self._on_device(index, read) or []


def _init_pynvml() -> Any:
    """The pynvml module after a successful nvmlInit, or None (no package, no driver)."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    except OSError:  # a broken libnvidia-ml.so can fail below pynvml's own checks
        return None
    return pynvml


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


_nvml: NvmlBoundary | None = None
_nvml_lock = threading.Lock()


def _get_nvml() -> NvmlBoundary:
    global _nvml
    with _nvml_lock:
        if _nvml is None:
            _nvml = _Nvml()
        return _nvml


# --------------------------------------------------------------------------- public


def gpus() -> list[GpuInfo]:
    """Every GPU NVML reports, in index order; empty without NVML."""
    nv = _get_nvml()
    return [_gpu_info(nv, i) for i in range(nv.device_count())]


def _gpu_info(nv: NvmlBoundary, index: int) -> GpuInfo:
    memory = nv.memory(index)
    total, used, free = (b // MB for b in memory) if memory else (None, None, None)
    power_mw = nv.power_mw(index)
    return GpuInfo(
        index=index,
        name=nv.name(index) or f"GPU {index}",
        uuid=nv.uuid(index),
        vram_total_mb=total,
        vram_used_mb=used,
        vram_free_mb=free,
        utilization_percent=nv.utilization(index),
        temperature_c=nv.temperature(index),
        power_w=None if power_mw is None else round(power_mw / 1000, 1),
    )


def process_vram_mb(pid: int) -> int | None:
    """GPU memory a process holds across all GPUs, from NVML's compute-process lists.

    `None` when NVML is absent, the process is on no GPU, or the driver hides its usage
    (inside some containers NVML lists host PIDs, which then never match).
    """
    nv = _get_nvml()
    found: list[int] = []
    for index in range(nv.device_count()):
        found += [used for p, used in nv.compute_processes(index) if p == pid and used is not None]
    return sum(found) // MB if found else None


def ram_available_mb() -> int:
    return int(psutil.virtual_memory().available) // MB


def backends(gpu_count: int) -> list[Backend]:
    """cpu always; cuda with at least one NVIDIA GPU; metal on Apple silicon."""
    found: list[Backend] = ["cpu"]
    if gpu_count > 0:
        found.append("cuda")
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        found.append("metal")
    return found


def disk_free_mb(path: Path) -> int:
    """Free space on the file system that holds `path` (or would, once it is created)."""
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return int(psutil.disk_usage(str(probe)).free) // MB


def _load_average() -> tuple[float, float, float] | None:
    try:
        one, five, fifteen = psutil.getloadavg()
    except (AttributeError, OSError):
        return None
    return (round(one, 2), round(five, 2), round(fifteen, 2))


def node_resources(models_dir: Path) -> NodeInfo:
    """A snapshot of this node for `GET /v1/node` (B23).

    CPU load is psutil's non-blocking figure: the load since the previous call (the very first
    call in a process reads 0.0).
    """
    nv = _get_nvml()
    gpu_list = gpus()
    memory = psutil.virtual_memory()
    return NodeInfo(
        hostname=socket.gethostname(),
        os=platform.platform(),
        arch=platform.machine(),
        cpu_count=psutil.cpu_count(logical=True) or 1,
        cpu_percent=float(psutil.cpu_percent(interval=None)),
        load_average=_load_average(),
        ram_total_mb=int(memory.total) // MB,
        ram_available_mb=int(memory.available) // MB,
        models_dir=str(models_dir),
        disk_free_mb=disk_free_mb(models_dir),
        backends=backends(len(gpu_list)),
        gpus=gpu_list,
        nvidia_driver=nv.driver_version() if gpu_list else None,
    )


def process_rss_mb(pid: int) -> int | None:
    """Resident memory of a process in MiB; None when it is gone or not ours to see."""
    try:
        return int(psutil.Process(pid).memory_info().rss // (1024 * 1024))
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
