"""Inference through the agent (B33): the worker's SSE stream, relayed frame by frame.

Before anything reaches the worker, the agent checks what is cheap to check (B124, B125):
the body must be a valid `InferenceRequest` (its `request_id`, when given, is the id the
request is known and cancelled by), and the worker must have room — a place in a slot or in
its queue, by the agent's own count of the requests it has forwarded. A request with no room
is answered here (QUEUE_FULL, or ALL_SLOTS_BUSY for a worker without a queue, with
`Retry-After`), so a rejection costs the worker nothing.

Each complete frame is forwarded the moment it arrives (no added buffering; a frame split
across TCP reads is joined first so the client never sees half a frame); only the final
frame is decoded, as a `DoneEvent`, to count tokens. A client that goes away closes the
upstream connection, which makes the worker cancel the generation. A worker that dies
mid-stream, or does not start answering in time, ends the client's request with an error.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from fastapi import Request, Response
from pydantic import ValidationError

from rbee_agent import relay
from rbee_agent.http_errors import error_response, parse_body
from rbee_agent.managed_worker import ManagedWorker
from rbee_agent.metrics import StreamMeter
from rbee_agent.protocol import (
    REQUEST_ID_HEADER,
    REQUEST_ID_PATTERN,
    SSE_DONE,
    DoneEvent,
    ErrorCode,
    InferenceRequest,
    InferenceResult,
    RbeeError,
    StreamErrorEvent,
    sse_frame,
)
from rbee_agent.sse import SSEResponse
from rbee_agent.supervisor import Supervisor

log = logging.getLogger("rbee.agent")

_DONE_FRAME = sse_frame(SSE_DONE)
_DONE_MARK = b'"done":true'
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)


def _worker_gone(worker: ManagedWorker, why: str) -> RbeeError:
    return RbeeError(
        ErrorCode.WORKER_CRASHED,
        f"Worker {worker.id} ({worker.model.id}) stopped answering mid-request: {why}"
        f"{worker.peer_note()}",
        hint="Spawn the worker again; its log may say why: rbee logs --worker " + worker.id,
        details={"worker_id": worker.id},
    )


def _request_id(request: Request, body: InferenceRequest) -> str:
    """The body's id, else the header's, else a new one; a bad header id is refused."""
    if body.request_id is not None:
        return body.request_id
    given = request.headers.get(REQUEST_ID_HEADER)
    if given is None:
        return uuid.uuid4().hex
    if not _REQUEST_ID.fullmatch(given):
        raise RbeeError(
            ErrorCode.INVALID_REQUEST,
            f"The {REQUEST_ID_HEADER} header is not a usable request id",
            hint=f"Use up to 128 letters, digits, '.', '_', ':' or '-' ({REQUEST_ID_PATTERN}).",
        )
    return given


def _no_room(worker: ManagedWorker) -> RbeeError:
    retry = worker.retry_after_s()
    details = {"slots_total": worker.slots_total, "slots_busy": worker.slots_total,
               "retry_after_s": retry}
    if worker.queue_depth > 0:
        return RbeeError(
            ErrorCode.QUEUE_FULL,
            f"Worker {worker.id} is busy and its queue is full ({worker.queue_depth} waiting)",
            hint=f"Retry in {retry} s, or spawn another worker for this model.",
            details={**details, "queued": worker.queue_depth,
                     "queue_depth": worker.queue_depth},
        )
    return RbeeError(
        ErrorCode.ALL_SLOTS_BUSY,
        f"All {worker.slots_total} slot(s) of worker {worker.id} are busy",
        hint=f"Retry in {retry} s, spawn with more slots, or spawn another worker.",
        details=details,
    )


async def proxy_inference(sup: Supervisor, worker: ManagedWorker, request: Request) -> Response:
    arrived = time.perf_counter()
    body = await request.body()
    parsed = await parse_body(request, InferenceRequest)
    request_id = _request_id(request, parsed)
    try:
        upstream = await send_inference(sup, worker, parsed, body, request_id)
    except RbeeError as err:
        if err.code not in (ErrorCode.QUEUE_FULL, ErrorCode.ALL_SLOTS_BUSY):
            raise
        return error_response(err, headers={"Retry-After": str(err.details["retry_after_s"]),
                                            REQUEST_ID_HEADER: request_id})
    if not upstream.is_event_stream:
        payload = await read_reply(upstream)
        extra = {k: v for k, v in upstream.response.headers.items() if k == "retry-after"}
        return Response(payload, status_code=upstream.response.status,
                        media_type=upstream.response.headers.get("content-type", ""),
                        headers={REQUEST_ID_HEADER: request_id, **extra})
    meter = request.app.state.metrics.meter(worker.model.id, arrived)
    return SSEResponse(stream_frames(upstream, meter), headers={REQUEST_ID_HEADER: request_id})


@dataclass
class Upstream:
    """A request in flight on a worker: its reply, and what ends it (`read_reply` or
    `stream_frames`, which close the connection and uncount the request)."""

    worker: ManagedWorker
    response: relay.UpstreamResponse
    started: float  # from worker.begin_request()
    wait_s: float

    @property
    def is_event_stream(self) -> bool:
        content_type = self.response.headers.get("content-type", "")
        return self.response.status == 200 and content_type.startswith("text/event-stream")


async def send_inference(sup: Supervisor, worker: ManagedWorker, parsed: InferenceRequest,
                         body: bytes, request_id: str) -> Upstream:
    """Send a request to a worker once it is ready and has room (B124, B125), and return
    the head of its reply. Shared by rbee's own route and the OpenAI routes."""
    if worker.state == "loading":
        await sup.wait_ready(worker)
    if worker.state == "failed" and worker.failure is not None:
        raise worker.failure
    if worker.state in ("failed", "stopping", "draining") or worker.exited.is_set():
        raise RbeeError(ErrorCode.WORKER_DRAINING, f"Worker {worker.id} is {worker.state}",
                        hint="Spawn a worker for the model again.",
                        details={"worker_id": worker.id, "state": worker.state})
    if worker.in_flight >= worker.capacity:
        raise _no_room(worker)
    headers = {**worker.auth, REQUEST_ID_HEADER: request_id,
               "Content-Type": "application/json"}
    settings = sup.settings
    wait_s = settings.worker_headers_timeout_s if parsed.stream else \
        settings.worker_result_timeout_s
    started = worker.begin_request()
    try:
        response = await relay.post(worker.host, worker.port, "/v1/inference", headers, body,
                                    headers_timeout_s=wait_s)
    except relay.RelayError as exc:
        worker.end_request(started)
        raise _worker_gone(worker, str(exc)) from None
    return Upstream(worker, response, started, wait_s)


async def read_reply(upstream: Upstream) -> bytes:
    """The whole body of a reply that is not a token stream (an error, or `stream: false`)."""
    try:
        payload = await upstream.response.read(timeout_s=upstream.wait_s)
        if upstream.response.status == 200:
            try:
                upstream.worker.count_tokens(
                    InferenceResult.model_validate_json(payload).total_tokens)
            except ValidationError:
                log.warning("worker %s sent a reply that is not an InferenceResult",
                            upstream.worker.id)
        return payload
    except relay.RelayError as exc:
        raise _worker_gone(upstream.worker, str(exc)) from None
    finally:
        await upstream.response.aclose()
        upstream.worker.end_request(upstream.started)


async def stream_frames(upstream: Upstream, meter: StreamMeter) -> AsyncIterator[bytes]:
    """The worker's SSE frames as they come (B33); a worker that breaks off mid-stream ends
    it with an error frame and `[DONE]`. Closing this generator closes the connection,
    which makes the worker cancel the generation. `meter` spots rbee's token frames (its
    default marker): what it counts is also the worker's live token count."""
    worker = upstream.worker
    counted = 0  # token frames of this stream already added to the worker's count
    try:
        async for frames in upstream.response.sse_batches():
            # Counted as the relay passes them (the meter spots them anyway), so a node's
            # tokens/s moves while a reply streams rather than jumping when it ends (B134).
            live = meter.frames(frames)
            worker.count_tokens(live)
            counted += live
            yield frames
            if _DONE_MARK in frames:
                total = _total_tokens(worker, frames)
                meter.tokens(total)
                # A frame may carry several tokens (held back for a stop string): the
                # stream's own total settles the count.
                worker.count_tokens(max(0, total - counted))
    except relay.RelayError as exc:
        err = _worker_gone(worker, str(exc))
        log.warning("%s", err.message)
        yield sse_frame(StreamErrorEvent(error=err.to_body().error))
        yield _DONE_FRAME
    finally:
        await upstream.response.aclose()
        worker.end_request(upstream.started)


def _total_tokens(worker: ManagedWorker, frames: bytes) -> int:
    """The token total of the final frame (the only frame the relay parses)."""
    for line in frames.split(b"\n"):
        if line.startswith(b"data: {") and _DONE_MARK in line:
            try:
                return DoneEvent.model_validate_json(line[6:]).total_tokens
            except ValidationError:
                log.warning("worker %s sent a final frame that is not a DoneEvent", worker.id)
                return 0
    return 0


async def proxy_cancel(sup: Supervisor, worker: ManagedWorker, request_id: str) -> None:
    try:
        await sup.http.delete(f"{worker.url}/v1/inference/{request_id}", headers=worker.auth,
                              timeout=sup.settings.health_timeout_s)
    except httpx.TransportError as exc:
        raise _worker_gone(worker, type(exc).__name__) from None
