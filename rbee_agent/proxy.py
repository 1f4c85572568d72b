"""Inference through the agent (B33): the worker's SSE stream, relayed frame by frame.

Each complete frame is forwarded the moment it arrives (no added buffering; a frame split
across TCP reads is joined first so the client never sees half a frame). A client that goes
away closes the upstream connection, which makes the worker cancel the generation. A
worker that dies mid-stream ends the client's stream with an error frame and `[DONE]`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

import httpx
from fastapi import Request, Response

from rbee_agent import relay
from rbee_agent.metrics import StreamMeter
from rbee_agent.protocol import (
    SSE_DONE,
    ErrorCode,
    RbeeError,
    StreamErrorEvent,
    sse_frame,
)
from rbee_agent.sse import SSEResponse
from rbee_agent.supervisor import ManagedWorker, Supervisor

log = logging.getLogger("rbee.agent")

REQUEST_ID_HEADER = "X-Request-Id"
_DONE_FRAME = sse_frame(SSE_DONE)


def _worker_gone(worker: ManagedWorker, why: str) -> RbeeError:
    return RbeeError(
        ErrorCode.WORKER_CRASHED,
        f"Worker {worker.id} ({worker.model.id}) stopped answering mid-request: {why}",
        hint="Spawn the worker again; its log may say why: rbee logs --worker " + worker.id,
        details={"worker_id": worker.id},
    )


async def proxy_inference(sup: Supervisor, worker: ManagedWorker, request: Request) -> Response:
    started = time.perf_counter()
    body = await request.body()
    request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
    upstream = await send_inference(sup, worker, body, request_id)
    headers = {REQUEST_ID_HEADER: request_id}
    if not is_event_stream(upstream):
        payload = await read_reply(worker, upstream)
        return Response(payload, status_code=upstream.status,
                        media_type=upstream.headers.get("content-type", ""), headers=headers)
    meter = request.app.state.metrics.meter(worker.model.id, started)
    return SSEResponse(stream_frames(worker, upstream, meter), headers=headers)


async def send_inference(sup: Supervisor, worker: ManagedWorker, body: bytes, request_id: str
                         ) -> relay.UpstreamResponse:
    """POST an inference body to a worker (once it is ready) and return its response head.

    The request counts as in flight on the worker from here: the caller ends it through
    `read_reply` or `stream_frames`, which close the connection and uncount it.
    """
    if worker.state == "loading":
        await sup.wait_ready(worker)
    headers = {**worker.auth, REQUEST_ID_HEADER: request_id,
               "Content-Type": "application/json"}
    worker.begin_request()
    try:
        return await relay.post(worker.host, worker.port, "/v1/inference", headers, body)
    except relay.RelayError as exc:
        worker.end_request()
        raise _worker_gone(worker, str(exc)) from None


def is_event_stream(upstream: relay.UpstreamResponse) -> bool:
    content_type = upstream.headers.get("content-type", "")
    return upstream.status == 200 and content_type.startswith("text/event-stream")


async def read_reply(worker: ManagedWorker, upstream: relay.UpstreamResponse) -> bytes:
    """The whole body of a reply that is not a token stream (an error, or `stream: false`)."""
    try:
        return await upstream.read()
    except relay.RelayError as exc:
        raise _worker_gone(worker, str(exc)) from None
    finally:
        await upstream.aclose()
        worker.end_request()


async def stream_frames(worker: ManagedWorker, upstream: relay.UpstreamResponse,
                        meter: StreamMeter) -> AsyncIterator[bytes]:
    """The worker's SSE frames as they come (B33); a worker that breaks off mid-stream ends
    it with an error frame and `[DONE]`. Closing this generator closes the connection,
    which makes the worker cancel the generation."""
    try:
        async for frames in upstream.sse_batches():
            meter.frames(frames)
            yield frames
            if b'"done":true' in frames:
                meter.tokens(_count_tokens(worker, frames))
    except relay.RelayError as exc:
        err = _worker_gone(worker, str(exc))
        log.warning("%s", err.message)
        yield sse_frame(StreamErrorEvent(error=err.to_body().error))
        yield _DONE_FRAME
    finally:
        await upstream.aclose()
        worker.end_request()


def _count_tokens(worker: ManagedWorker, frames: bytes) -> int:
    """Add the done frame's token total to the worker's count; return it."""
    for line in frames.split(b"\n"):
        if line.startswith(b"data: {") and b'"done":true' in line:
            with contextlib.suppress(ValueError):
                tokens = int(json.loads(line[6:]).get("total_tokens", 0))
                worker.tokens_served += tokens
                return tokens
    return 0


async def proxy_cancel(sup: Supervisor, worker: ManagedWorker, request_id: str) -> None:
    try:
        await sup.http.delete(f"{worker.url}/v1/inference/{request_id}", headers=worker.auth,
                              timeout=sup.settings.health_timeout_s)
    except httpx.TransportError as exc:
        raise _worker_gone(worker, type(exc).__name__) from None
