"""A minimal HTTP/1.1 client for the one hot path: a worker's token stream into the agent.

httpx parses every chunk of a response in pure Python (h11): about 190 µs of agent CPU per
token, which on a 2-core node is taken straight from llama.cpp's threads. This reads the
worker's chunked SSE body with asyncio streams and nothing else. It speaks only to our own
workers on loopback (`Connection: close`, one request per connection), so it needs none of a
general client's features; everything else in the agent uses httpx.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

_MAX_HEAD = 64 * 1024
SSE_DONE_FRAME = b"data: [DONE]\n\n"


class RelayError(Exception):
    """The worker connection failed or broke the protocol."""


@dataclass
class UpstreamResponse:
    status: int
    headers: dict[str, str]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @property
    def chunked(self) -> bool:
        return "chunked" in self.headers.get("transfer-encoding", "").lower()

    async def body_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives: one item per HTTP chunk (the worker writes one per frame)."""
        try:
            if self.chunked:
                while True:
                    size_line = await self.reader.readuntil(b"\r\n")
                    size = int(size_line.split(b";", 1)[0], 16)
                    if size == 0:
                        await self.reader.readuntil(b"\r\n")
                        return
                    data = await self.reader.readexactly(size + 2)
                    yield data[:-2]
            elif "content-length" in self.headers:
                yield await self.reader.readexactly(int(self.headers["content-length"]))
            else:
                while chunk := await self.reader.read(65536):
                    yield chunk
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                ConnectionError) as exc:
            raise RelayError(f"{type(exc).__name__}: the worker broke off the response") from exc

    async def sse_batches(self) -> AsyncIterator[bytes]:
        """The SSE body as whole frames, forwarded the moment they arrive: each item is one or
        more complete `data: …\n\n` frames (a frame split across reads is joined first).
        Ends after the `data: [DONE]` frame; a body that stops before it is a RelayError."""
        pending = b""
        async for chunk in self.body_chunks():
            pending += chunk
            cut = pending.rfind(b"\n\n")
            if cut < 0:
                continue
            frames, pending = pending[: cut + 2], pending[cut + 2 :]
            yield frames
            if frames.endswith(SSE_DONE_FRAME):
                return
        raise RelayError("the stream ended before [DONE]")

    async def read(self, timeout_s: float | None = None) -> bytes:
        try:
            async with asyncio.timeout(timeout_s):
                return b"".join([chunk async for chunk in self.body_chunks()])
        except TimeoutError:
            raise RelayError(f"no complete reply within {timeout_s:g} s") from None

    async def aclose(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


async def post(host: str, port: int, path: str, headers: dict[str, str], body: bytes,
               connect_timeout_s: float = 5.0, headers_timeout_s: float | None = None,
               ) -> UpstreamResponse:
    """Send the request; return once the reply's head is in (within `headers_timeout_s`:
    a frozen worker must not hold a client for ever)."""
    try:
        async with asyncio.timeout(connect_timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError) as exc:
        raise RelayError(f"cannot connect to {host}:{port}: {exc}") from exc
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}",
            "Connection: close", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    try:
        writer.write("\r\n".join(head).encode("latin-1") + body)
        async with asyncio.timeout(headers_timeout_s):
            raw = await reader.readuntil(b"\r\n\r\n")
    except TimeoutError:
        writer.close()
        raise RelayError(f"no reply from {host}:{port} within {headers_timeout_s:g} s") from None
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        writer.close()
        raise RelayError(f"{type(exc).__name__} talking to {host}:{port}") from exc
    if len(raw) > _MAX_HEAD:
        writer.close()
        raise RelayError("response head too large")
    status_line, *lines = raw.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        writer.close()
        raise RelayError(f"bad status line {status_line!r}")
    parsed: dict[str, str] = {}
    for line in lines:
        if ":" in line:
            name, value = line.split(":", 1)
            parsed[name.strip().lower()] = value.strip()
    return UpstreamResponse(int(parts[1]), parsed, reader, writer)
