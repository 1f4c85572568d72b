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
import uuid
from collections.abc import AsyncIterator

import httpx
from fastapi import Request, Response

from rbee_agent import relay
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
    if worker.state == "loading":
        await sup.wait_ready(worker)
    body = await request.body()
    request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
    headers = {**worker.auth, REQUEST_ID_HEADER: request_id,
               "Content-Type": "application/json"}
    worker.begin_request()
    try:
        upstream = await relay.post(worker.host, worker.port, "/v1/inference", headers, body)
    except relay.RelayError as exc:
        worker.end_request()
        raise _worker_gone(worker, str(exc)) from None
    content_type = upstream.headers.get("content-type", "")
    if upstream.status != 200 or not content_type.startswith("text/event-stream"):
        try:
            payload = await upstream.read()
        except relay.RelayError as exc:
            raise _worker_gone(worker, str(exc)) from None
        finally:
            await upstream.aclose()
            worker.end_request()
        return Response(payload, status_code=upstream.status, media_type=content_type,
                        headers={REQUEST_ID_HEADER: request_id})
    return SSEResponse(_relay(worker, upstream), headers={REQUEST_ID_HEADER: request_id})


async def _relay(worker: ManagedWorker, upstream: relay.UpstreamResponse
                 ) -> AsyncIterator[bytes]:
    pending = b""
    finished = False
    try:
        async for chunk in upstream.body_chunks():
            pending += chunk
            cut = pending.rfind(b"\n\n")
            if cut < 0:
                continue
            frames, pending = pending[: cut + 2], pending[cut + 2 :]
            finished = finished or frames.endswith(_DONE_FRAME)
            yield frames
            if b'"done":true' in frames:
                _count_tokens(worker, frames)
        if not finished:
            raise relay.RelayError("the stream ended before [DONE]")
    except relay.RelayError as exc:
        err = _worker_gone(worker, str(exc))
        log.warning("%s", err.message)
        yield sse_frame(StreamErrorEvent(error=err.to_body().error))
        yield _DONE_FRAME
    finally:
        await upstream.aclose()
        worker.end_request()


def _count_tokens(worker: ManagedWorker, frames: bytes) -> None:
    for line in frames.split(b"\n"):
        if line.startswith(b"data: {") and b'"done":true' in line:
            with contextlib.suppress(ValueError):
                worker.tokens_served += int(json.loads(line[6:]).get("total_tokens", 0))


async def proxy_cancel(sup: Supervisor, worker: ManagedWorker, request_id: str) -> None:
    try:
        await sup.http.delete(f"{worker.url}/v1/inference/{request_id}", headers=worker.auth,
                              timeout=sup.settings.health_timeout_s)
    except httpx.TransportError as exc:
        raise _worker_gone(worker, type(exc).__name__) from None
