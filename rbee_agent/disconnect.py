"""Stop a request's work when its client hangs up, for replies that are not streams.

An SSE reply notices a client that left (rbee_agent/sse.py); a plain JSON reply is written
only at the end, so without this a non-streaming request whose client gave up would keep a
worker generating until max_tokens. Used by the agent's OpenAI routes and the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

T = TypeVar("T")


async def until_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None (and `work` cancelled) if the client hangs up first.

    Call it once the body has been read: the next ASGI message can only be the disconnect.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(request.receive())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    return None if task.cancelled() else task.result()
