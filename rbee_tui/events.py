"""Typed events of the operator's flows (principle 1: one flow, two faces).

Every flow (inference, node check, agent install, model download) is an async generator of
these. The CLI prints them; the TUI turns them into messages. A flow ends by returning after
`Finished`, or by raising `RbeeError` (which faces show as message + hint).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rbee_agent.protocol import RbeeError


@dataclass(frozen=True)
class PhaseStarted:
    """A visible step begins: 'agent', 'provision', 'spawn', 'loading', 'ssh', 'install'…"""

    phase: str
    message: str


@dataclass(frozen=True)
class PhaseDone:
    phase: str
    message: str = ""


@dataclass(frozen=True)
class Attempt:
    """One try of a retried step (B01, B12, B44). `error` is set when this try failed."""

    phase: str
    number: int
    total: int
    error: RbeeError | None = None
    retry_in_s: float | None = None


@dataclass(frozen=True)
class Progress:
    """Progress of a phase: layers loaded, bytes downloaded…"""

    phase: str
    done: float
    total: float
    unit: str
    message: str = ""


@dataclass(frozen=True)
class OutputLine:
    """A line of remote output (install step stderr/stdout, logs)."""

    phase: str
    line: str


@dataclass(frozen=True)
class Note:
    """A line worth showing inside a phase that is neither progress nor output: a download
    resumed or retried (B37), a worker handed back instead of started, a port moved."""

    phase: str
    message: str


@dataclass(frozen=True)
class Queued:
    """The request waits in the worker's queue with `ahead` requests before it (B148, B170)."""

    ahead: int


@dataclass(frozen=True)
class HostKeyUnknown:
    """SSH met a host key rbee has not seen: the operator must confirm it (B01)."""

    host: str
    port: int
    key_type: str
    fingerprint: str


@dataclass(frozen=True)
class Token:
    text: str
    index: int


@dataclass(frozen=True)
class Finished:
    """The flow's result. For inference: tokens, duration, tokens/s, finish reason."""

    message: str
    data: dict[str, Any] = field(default_factory=dict)


Event = (
    PhaseStarted | PhaseDone | Attempt | Progress | OutputLine | Note | Queued | HostKeyUnknown
    | Token | Finished
)
