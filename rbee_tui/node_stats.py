"""What the dashboard derives from a node's polls: short histories and token rates (B70, B161).

Plain Python beside `NodeSnapshot`: fed one snapshot per poll, read by the widgets that draw
graphs and rates. It never imports Textual, so it is tested on its own and can serve the CLI.

Rates are per worker and a node's rate is the sum of its workers' (a worker that went away
takes its count with it instead of making the node's total jump backwards). A worker's rate
is the tokens it served since its count last moved, over the time it has been producing
them: since that last change, or since the last poll that found it idle, whichever is later.
With an agent that counts tokens as they stream that is the change over one poll; with one
that counts a request's tokens when it ends, the rate is the reply's average (300
tokens after about 20 busy seconds read 14 tokens/s, not 150 for one poll).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from rbee_tui.node_source import NodeSnapshot

HISTORY_POINTS = 150  # 5 minutes at the default 2 s poll


def _series(points: int) -> deque[float]:
    return deque(maxlen=points)


@dataclass
class GpuHistory:
    """One GPU's readings over the last polls; a reading NVML refused is not recorded."""

    name: str
    vram_total_mb: float
    points: int = HISTORY_POINTS
    vram_used_mb: deque[float] = field(init=False)
    utilization_percent: deque[float] = field(init=False)
    temperature_c: deque[float] = field(init=False)
    power_w: deque[float] = field(init=False)

    def __post_init__(self) -> None:
        self.vram_used_mb = _series(self.points)
        self.utilization_percent = _series(self.points)
        self.temperature_c = _series(self.points)
        self.power_w = _series(self.points)


class NodeStats:
    """Histories (RAM, and per GPU: VRAM, utilisation, temperature, power) and token rates."""

    def __init__(self, points: int = HISTORY_POINTS) -> None:
        self.points = points
        self.ram_used_mb: deque[float] = _series(points)
        self.ram_total_mb = 0.0
        self.gpus: dict[int, GpuHistory] = {}
        self.worker_rates: dict[str, float] = {}
        self._tokens: dict[str, tuple[float, int]] = {}  # worker → (counting since, count)

    @property
    def rate(self) -> float:
        """Tokens per second over the node's workers, as of the last two polls."""
        return sum(self.worker_rates.values())

    def add(self, snapshot: NodeSnapshot) -> None:
        info = snapshot.info
        if info is None:  # a node that did not answer: its workers' rates are unknown
            self.worker_rates.clear()
            self._tokens.clear()
            return
        self.ram_total_mb = float(info.ram_total_mb)
        self.ram_used_mb.append(float(info.ram_total_mb - info.ram_available_mb))
        for gpu in info.gpus:
            history = self.gpus.get(gpu.index)
            if history is None or history.name != gpu.name:
                history = self.gpus[gpu.index] = GpuHistory(gpu.name, 0.0, self.points)
            history.vram_total_mb = float(gpu.vram_total_mb or 0)
            for series, value in ((history.vram_used_mb, gpu.vram_used_mb),
                                  (history.utilization_percent, gpu.utilization_percent),
                                  (history.temperature_c, gpu.temperature_c),
                                  (history.power_w, gpu.power_w)):
                if value is not None:
                    series.append(float(value))
        for gone in set(self.gpus) - {g.index for g in info.gpus}:
            del self.gpus[gone]
        self._add_rates(snapshot)

    def _add_rates(self, snapshot: NodeSnapshot) -> None:
        now = snapshot.polled_at
        rates: dict[str, float] = {}
        tokens: dict[str, tuple[float, int]] = {}
        for worker in snapshot.workers:
            before = self._tokens.get(worker.id)
            busy = worker.state == "busy" or worker.active_requests > 0
            since, counted = before if before is not None else (now, worker.tokens_served)
            served = worker.tokens_served - counted
            if before is None:
                pass  # a worker's first poll: no rate yet
            elif served > 0 and now > since:
                rates[worker.id] = served / (now - since)
                since, counted = now, worker.tokens_served
            elif served < 0 or not busy:  # restarted, or idle: nothing left uncounted
                rates[worker.id] = 0.0
                since, counted = now, worker.tokens_served
            else:  # busy, count unchanged: stalled, or an agent that counts at the end
                rates[worker.id] = 0.0
            tokens[worker.id] = (since, counted)
        self.worker_rates = rates
        self._tokens = tokens
