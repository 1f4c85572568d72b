"""B23: node resources. GPUs are faked at the NVML boundary (`resources._nvml`) only; CPU,
RAM and disk figures are this machine's real ones."""

from __future__ import annotations

import ctypes.util
import os
import platform
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from rbee_agent import resources
from rbee_agent.protocol import NodeInfo
from tests.fake_nvml import FakeGpu, FakeNvml, GiB, MiB, use_nvml


def no_driver_here() -> bool:
    return ctypes.util.find_library("nvidia-ml") is None and not Path("/dev/nvidiactl").exists()


# --------------------------------------------------------------------------- NVML absent


def test_b23_nvml_absent_reports_no_gpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py not installed
    use_nvml(monkeypatch, resources._Nvml())
    info = resources.node_resources(tmp_path)
    assert info.gpus == []
    assert "cuda" not in info.backends
    assert info.nvidia_driver is None
    assert resources.process_vram_mb(os.getpid()) is None


@pytest.mark.skipif(not no_driver_here(), reason="this machine has an NVIDIA driver")
def test_b23_nvml_without_driver_reports_no_gpus(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import pynvml

    with pytest.raises(pynvml.NVMLError):  # the real library really refuses here
        pynvml.nvmlInit()
    use_nvml(monkeypatch, resources._Nvml())
    nv = resources._get_nvml()
    assert nv.device_count() == 0
    assert nv.name(0) is None
    assert nv.memory(0) is None
    assert nv.compute_processes(0) == []
    assert resources.node_resources(tmp_path).gpus == []


def test_b23_nvml_initialised_once_across_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def slow_init() -> None:
        calls.append(1)
        time.sleep(0.05)  # widen the race window
        return None

    monkeypatch.setattr(resources, "_init_pynvml", slow_init)
    nv = resources._Nvml()
    threads = [threading.Thread(target=nv.device_count) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    nv.name(0)
    nv.memory(0)
    assert len(calls) == 1


def test_b23_boundary_is_created_once(monkeypatch: pytest.MonkeyPatch) -> None:
    use_nvml(monkeypatch, None)
    first = resources._get_nvml()
    assert isinstance(first, resources._Nvml)
    assert resources._get_nvml() is first


# --------------------------------------------------------------------------- fake GPUs


def test_b23_fake_nvml_reports_vram(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    small = FakeGpu(
        name="NVIDIA RTX 4090",
        uuid="GPU-b",
        memory=(24 * GiB, 1 * GiB + 512 * MiB, 22 * GiB + 512 * MiB),
        utilization=3,
        temperature=41,
        power_mw=30_049,
    )
    use_nvml(monkeypatch, FakeNvml([FakeGpu(), small]))
    info = resources.node_resources(tmp_path)
    assert [g.index for g in info.gpus] == [0, 1]
    big = info.gpus[0]
    assert big.name == "NVIDIA H100 80GB HBM3"
    assert big.uuid == "GPU-00000000-1111-2222-3333-444444444444"
    assert (big.vram_total_mb, big.vram_used_mb, big.vram_free_mb) == (81920, 20480, 61440)
    assert (big.utilization_percent, big.temperature_c, big.power_w) == (37, 54, 123.5)
    second = info.gpus[1]
    assert (second.vram_total_mb, second.vram_used_mb, second.vram_free_mb) == (24576, 1536, 23040)
    assert second.power_w == 30.0
    assert "cuda" in info.backends and "cpu" in info.backends
    assert info.nvidia_driver == "575.57.08"
    assert NodeInfo.model_validate_json(info.model_dump_json()) == info


def test_b23_refused_nvml_fields_are_none(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    refusing = FakeGpu(
        name=None, uuid=None, memory=None, utilization=None, temperature=None, power_mw=None
    )
    use_nvml(monkeypatch, FakeNvml([refusing], driver=None))
    (gpu,) = resources.node_resources(tmp_path).gpus
    assert gpu.name == "GPU 0"
    assert gpu.uuid is None
    assert gpu.vram_total_mb is None and gpu.vram_used_mb is None and gpu.vram_free_mb is None
    assert gpu.utilization_percent is None
    assert gpu.temperature_c is None
    assert gpu.power_w is None


def test_b23_process_vram_sums_across_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    use_nvml(
        monkeypatch,
        FakeNvml(
            [
                FakeGpu(processes=[(111, 300 * MiB), (222, 50 * MiB)]),
                FakeGpu(processes=[(111, 200 * MiB), (333, None)]),
            ]
        ),
    )
    assert resources.process_vram_mb(111) == 500
    assert resources.process_vram_mb(222) == 50
    assert resources.process_vram_mb(333) is None  # listed, but the driver hides its usage
    assert resources.process_vram_mb(444) is None  # on no GPU


# --------------------------------------------------------------------------- host figures


def test_b23_node_reports_host_cpu_ram_disk(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    use_nvml(monkeypatch, FakeNvml([]))
    info = resources.node_resources(tmp_path)
    assert info.hostname == socket.gethostname()
    assert info.os == platform.platform()
    assert info.arch == platform.machine()
    assert info.cpu_count == os.cpu_count()
    assert 0.0 <= info.cpu_percent <= 100.0
    assert info.load_average is not None and len(info.load_average) == 3
    assert 0 < info.ram_available_mb <= info.ram_total_mb
    assert abs(info.ram_available_mb - resources.ram_available_mb()) < 512
    assert info.models_dir == str(tmp_path)
    free = shutil.disk_usage(tmp_path).free // MiB
    assert abs(info.disk_free_mb - free) < 256
    assert info.gpus == []


def test_b23_disk_free_for_a_models_dir_not_created_yet(tmp_path: Path) -> None:
    missing = tmp_path / "not" / "yet" / "models"
    free = shutil.disk_usage(tmp_path).free // MiB
    assert abs(resources.disk_free_mb(missing) - free) < 256
    assert not missing.exists()


def test_b23_cpu_load_is_sampled_without_waiting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    use_nvml(monkeypatch, FakeNvml([FakeGpu()]))
    start = time.perf_counter()
    for _ in range(5):
        resources.node_resources(tmp_path)
    assert time.perf_counter() - start < 1.0  # a blocking sample takes ≥ 0.1 s per call


@pytest.mark.parametrize(
    ("system", "machine", "gpus", "expected"),
    [
        ("Linux", "x86_64", 0, ["cpu"]),
        ("Linux", "x86_64", 1, ["cpu", "cuda"]),
        ("Linux", "aarch64", 4, ["cpu", "cuda"]),
        ("Darwin", "arm64", 0, ["cpu", "metal"]),
        ("Darwin", "x86_64", 0, ["cpu"]),
    ],
)
def test_b23_backends_available(
    monkeypatch: pytest.MonkeyPatch, system: str, machine: str, gpus: int, expected: list[str]
) -> None:
    monkeypatch.setattr(platform, "system", lambda: system)
    monkeypatch.setattr(platform, "machine", lambda: machine)
    assert resources.backends(gpus) == expected
