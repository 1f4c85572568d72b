"""A latest-value broadcast: every subscriber sees the current value, then each change.

Used for loading progress, in the worker (layers loaded) and in the agent (a worker's
start-up as seen from outside), so any number of SSE clients can follow one load.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Broadcast(Generic[T]):
    def __init__(self, initial: T, is_final: Callable[[T], bool]) -> None:
        self.value = initial
        self._is_final = is_final
        self._queues: set[asyncio.Queue[T]] = set()

    def publish(self, value: T) -> None:
        self.value = value
        for queue in self._queues:
            queue.put_nowait(value)

    async def follow(self) -> AsyncIterator[T]:
        """The current value, then every change, ending after a final value."""
        queue: asyncio.Queue[T] = asyncio.Queue()
        self._queues.add(queue)
        try:
            value = self.value
            while True:
                yield value
                if self._is_final(value):
                    return
                value = await queue.get()
        finally:
            self._queues.discard(queue)
