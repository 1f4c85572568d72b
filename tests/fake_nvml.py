"""A fake NVML at the one boundary tests may fake (`rbee_agent.resources._nvml`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from rbee_agent import resources

MiB = 1024 * 1024
GiB = 1024 * MiB


@dataclass
class FakeGpu:
    name: str | None = "NVIDIA H100 80GB HBM3"
    uuid: str | None = "GPU-00000000-1111-2222-3333-444444444444"
    memory: tuple[int, int, int] | None = (80 * GiB, 20 * GiB, 60 * GiB)
    utilization: int | None = 37
    temperature: int | None = 54
    power_mw: int | None = 123_456
    processes: list[tuple[int, int | None]] = field(default_factory=list)


class FakeNvml:
    """Stands in for `resources._Nvml`: same methods, answers from a list of FakeGpu."""

    def __init__(self, gpus: list[FakeGpu], driver: str | None = "575.57.08") -> None:
        self.gpus = gpus
        self.driver = driver

    def device_count(self) -> int:
        return len(self.gpus)

    def driver_version(self) -> str | None:
        return self.driver

    def name(self, index: int) -> str | None:
        return self.gpus[index].name

    def uuid(self, index: int) -> str | None:
        return self.gpus[index].uuid

    def memory(self, index: int) -> tuple[int, int, int] | None:
        return self.gpus[index].memory

    def utilization(self, index: int) -> int | None:
        return self.gpus[index].utilization

    def temperature(self, index: int) -> int | None:
        return self.gpus[index].temperature

    def power_mw(self, index: int) -> int | None:
        return self.gpus[index].power_mw

    def compute_processes(self, index: int) -> list[tuple[int, int | None]]:
        return self.gpus[index].processes


def use_nvml(monkeypatch: pytest.MonkeyPatch, nvml: object) -> None:
    monkeypatch.setattr(resources, "_nvml", nvml)
