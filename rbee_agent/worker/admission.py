"""Slots and the queue in front of them (B44, B100), kept on the event loop.

At most `total` requests are in the engine at once. One that finds every slot taken waits
in a first-in-first-out queue of at most `depth` places, and is told its position whenever
it changes; only when the queue too is full is it refused. A slot that frees goes to the
head of the queue at once, in the same loop callback, so a request can never overtake one
that waited (there is no moment at which a slot looks free to a newcomer).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable


class Ticket:
    """A place in the queue: `granted` resolves when a slot is this request's."""

    def __init__(self, on_position: Callable[[int], None]) -> None:
        self.granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.position = -1
        self._on_position = on_position

    def _move(self, position: int) -> None:
        if position != self.position:
            self.position = position
            self._on_position(position)


class Admission:
    def __init__(self, total: int, depth: int) -> None:
        if total < 1 or depth < 0:
            raise ValueError("a worker needs at least one slot and a queue depth ≥ 0")
        self.total = total
        self.depth = depth
        self.busy = 0
        self._waiting: deque[Ticket] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def full(self) -> bool:
        """No slot now and no place in the queue."""
        return self.busy >= self.total and len(self._waiting) >= self.depth

    def enter(self, ticket: Ticket) -> bool:
        """Take a slot now (True) or a place in the queue (False). Check `full` first."""
        if self.busy < self.total and not self._waiting:
            self.busy += 1
            ticket.granted.set_result(None)
            return True
        if len(self._waiting) >= self.depth:
            raise RuntimeError("queue full: callers check `full` before entering")
        self._waiting.append(ticket)
        ticket._move(len(self._waiting) - 1)
        return False

    def leave(self, ticket: Ticket) -> bool:
        """Give up a place in the queue (timeout, cancel, drain); False if not queued."""
        try:
            self._waiting.remove(ticket)
        except ValueError:
            return False
        self._renumber()
        return True

    def release(self) -> None:
        """A slot is free again: hand it to the head of the queue."""
        self.busy -= 1
        while self._waiting and self.busy < self.total:
            ticket = self._waiting.popleft()
            self.busy += 1
            ticket.granted.set_result(None)
        self._renumber()

    def drain(self) -> list[Ticket]:
        """Empty the queue (shutdown); the tickets are returned unanswered."""
        waiting = list(self._waiting)
        self._waiting.clear()
        return waiting

    def _renumber(self) -> None:
        for position, ticket in enumerate(self._waiting):
            ticket._move(position)
