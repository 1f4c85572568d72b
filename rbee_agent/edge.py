"""The agent's HTTP edge: limits a client cannot talk its way past (B123).

- A request head must arrive within `header_timeout_s` of the connection (or, on a
  keep-alive connection, of its first byte); uvicorn has no such timeout, so 300 clients
  that open a connection and send nothing would hold 300 file handles for ever.
- At most `max_connections` connections are open at once; one more is closed the moment it
  is accepted, so the agent keeps file handles for its workers, logs and catalog.
- A request body may be at most `max_request_bytes`, counted while it is read (a declared
  Content-Length over the limit is refused before a byte of the body is read).

The open-file limit is raised to what the cap needs when the hard limit allows it.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from rbee_agent.http_errors import error_response
from rbee_agent.protocol import ErrorCode, RbeeError

log = logging.getLogger("rbee.agent")

# File handles the agent needs besides client connections: workers' pipes and sockets,
# logs, the catalog, NVML.
FD_RESERVE = 256


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with a request-head timeout and a connection cap."""

    class GuardedHttp(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                _log_refused(len(self.connections))
                transport.abort()
                return
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._head_timer is None:
                self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_timed_out)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return GuardedHttp


_refused = {"count": 0}


def _log_refused(open_now: int) -> None:
    _refused["count"] += 1
    if _refused["count"] in (1, 10, 100) or _refused["count"] % 1000 == 0:
        log.warning("connection refused: %d connections open (max_connections); %d refused "
                    "so far", open_now - 1, _refused["count"])


def fit_open_files(max_connections: int) -> int:
    """Raise the soft open-file limit toward what `max_connections` needs; the connection
    cap that the limit allows (the setting, or less when the hard limit is lower)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < want:
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= want:
        return max_connections
    allowed = max(8, soft - FD_RESERVE)
    log.warning("the open-file limit is %d: at most %d client connections (not %d)", soft,
                allowed, max_connections)
    return allowed


class BodyLimit:
    """Refuse request bodies over the limit while reading them, before anything parses them."""

    def __init__(self, app: ASGIApp, limit: int, owner: str = "agent") -> None:
        self.app = app
        self.limit = limit
        self.owner = owner  # named in the error: the agent's limit or a worker's

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await error_response(self._too_large(int(length)))(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise self._too_large(None)
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self, size: int | None) -> RbeeError:
        said = f"is {size} bytes" if size is not None else "is larger than that"
        details: dict[str, Any] = {"limit": self.limit}
        if size is not None:
            details["bytes"] = size
        return RbeeError(
            ErrorCode.REQUEST_TOO_LARGE,
            f"The request body {said}; this {self.owner} accepts at most {self.limit} bytes",
            hint="Shorten the prompt or the chat history (max_request_bytes on the node).",
            details=details,
        )
