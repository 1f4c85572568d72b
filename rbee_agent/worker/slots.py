"""Slot bookkeeping for a worker: which llama.cpp contexts are free (B44)."""

from __future__ import annotations

from rbee_agent.protocol import ErrorCode, RbeeError


class SlotPool:
    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError("a worker needs at least one slot")
        self.total = total
        self._free = list(range(total - 1, -1, -1))

    @property
    def busy(self) -> int:
        return self.total - len(self._free)

    def acquire(self) -> int:
        """Take a free slot now, or fail with ALL_SLOTS_BUSY: callers retry, we never queue."""
        if not self._free:
            raise RbeeError(
                ErrorCode.ALL_SLOTS_BUSY,
                f"All {self.total} slot(s) of this worker are busy",
                hint="Retry in a moment, or start the worker with more --slots.",
                details={"slots_total": self.total, "slots_busy": self.busy},
            )
        return self._free.pop()

    def release(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.total:
            raise ValueError(f"slot {slot} is not taken")
        self._free.append(slot)
