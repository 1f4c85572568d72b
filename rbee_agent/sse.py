"""An SSE response that stops its producer the moment the client goes away.

Starlette's StreamingResponse, under ASGI 2.4 servers, only notices a dropped client when a
write fails, so a generation that is between writes (evaluating a prompt, waiting on a busy
model) would keep running. Here a watcher task reads `http.disconnect` and cancels the
stream at once; the producer's `finally` then cancels the work upstream (B33, B45).
Frames are written as they come: no buffering, no keep-alive chatter in the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

SSE_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
}


class SSEResponse(Response):
    def __init__(self, frames: AsyncIterator[bytes], headers: Mapping[str, str] | None = None):
        # No super().__init__: it would declare a Content-Length for the empty initial body.
        self.status_code = 200
        self.background = None
        self.init_headers({**SSE_HEADERS, **(headers or {})})
        self._frames = frames

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = asyncio.create_task(self._stream(send))
        watcher = asyncio.create_task(self._watch_disconnect(receive, stream))
        try:
            await stream
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # we are being cancelled ourselves, not the client leaving
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            aclose: Any = getattr(self._frames, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def _stream(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        try:
            async for frame in self._frames:
                await send({"type": "http.response.body", "body": frame, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the server reports a vanished client this way (ASGI 2.4)
            return

    @staticmethod
    async def _watch_disconnect(receive: Receive, stream: asyncio.Task[None]) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                stream.cancel()
                return
