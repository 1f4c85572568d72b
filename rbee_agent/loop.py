"""Run a coroutine on uvloop when it is installed (it is, with the agent extra).

The agent and its workers relay one SSE frame per token; on a 2-core node every microsecond
the event loop spends per frame is taken from llama.cpp's threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)
