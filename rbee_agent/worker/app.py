"""The worker's HTTP routes (thin: parse, call the service, reply)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from rbee_agent import __version__
from rbee_agent.auth import check_bearer
from rbee_agent.edge import BodyLimit
from rbee_agent.http_errors import error_response, install_error_handlers, parse_body
from rbee_agent.protocol import (
    REQUEST_ID_HEADER,
    SSE_DONE,
    HealthReply,
    InferenceRequest,
    InferenceResult,
    RbeeError,
    ReadyReply,
    ShutdownReply,
    StreamErrorEvent,
    sse_frame,
)
from rbee_agent.sse import SSEResponse
from rbee_agent.worker.service import InferenceRun, WorkerService


def _rbee_error_response(err: RbeeError) -> JSONResponse:
    """The one error body; a refusal that says when to come back also says it in the
    standard `Retry-After` header (QUEUE_FULL, a queue timeout)."""
    retry = err.details.get("retry_after_s")
    headers = {"Retry-After": str(int(retry))} if isinstance(retry, int | float) else None
    return error_response(err, headers=headers)


def create_app(
    service: WorkerService, on_startup: Callable[[], None] | None = None
) -> FastAPI:
    """The worker's HTTP face: health without a key, everything else behind it."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.start()
        if on_startup is not None:
            on_startup()
        yield

    app = FastAPI(title="rbee worker", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)

    @app.exception_handler(RbeeError)
    async def _rbee_error(_: Request, exc: RbeeError) -> JSONResponse:
        return _rbee_error_response(exc)

    app.add_middleware(BodyLimit, limit=service.settings.max_request_bytes, owner="worker")
    app.include_router(_health_routes(service))
    app.include_router(_api_routes(service))
    return app


def _health_routes(service: WorkerService) -> APIRouter:
    router = APIRouter()
    settings = service.settings

    @router.get("/v1/health", response_model=HealthReply, response_model_exclude_none=True)
    async def health() -> HealthReply:
        return HealthReply(
            version=__version__, worker_id=settings.worker_id, state=service.state,
            slots_total=service.admission.total, slots_busy=service.admission.busy,
            tokens_served=service.tokens_served, queued=service.admission.queued,
            queue_depth=settings.queue_depth, gpu_layers=service.engine.gpu_layers,
            layers_total=service.engine.layers_total,
        )

    return router


def _api_routes(service: WorkerService) -> APIRouter:
    """The routes that need the worker's key (the agent holds it)."""

    def require_key(request: Request) -> None:
        check_bearer(request, service.settings.api_key)

    api = APIRouter(dependencies=[Depends(require_key)])

    @api.get("/v1/ready", response_model=ReadyReply, response_model_exclude_none=True)
    async def ready() -> ReadyReply:
        return service.ready_reply()

    @api.get("/v1/loading/progress")
    async def loading_progress() -> SSEResponse:
        async def frames() -> AsyncIterator[bytes]:
            async for event in service.progress.follow():
                yield sse_frame(event)
            yield sse_frame(SSE_DONE)

        return SSEResponse(frames())

    @api.post("/v1/inference", openapi_extra=_json_body(InferenceRequest))
    async def inference(request: Request) -> Response:
        body = await parse_body(request, InferenceRequest)
        run = await service.begin(body, request.headers.get(REQUEST_ID_HEADER))
        headers = {REQUEST_ID_HEADER: run.request_id}
        if not body.stream:
            result = await _collect_unless_gone(run, request)
            if result is None:  # nobody is listening any more
                return Response(status_code=499)
            return JSONResponse(result.model_dump(), headers=headers)
        return SSEResponse(_token_frames(run), headers=headers)

    @api.delete("/v1/inference/{request_id}", status_code=204)
    async def cancel(request_id: str) -> Response:
        service.cancel(request_id)
        return Response(status_code=204)

    @api.post("/v1/admin/shutdown", response_model=ShutdownReply)
    async def shutdown() -> ShutdownReply:
        service.request_shutdown()
        return ShutdownReply(state=service.state, active_requests=service.active_requests)

    return api


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """Document a body we parse by hand in the OpenAPI schema."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


async def _collect_unless_gone(run: InferenceRun, request: Request) -> InferenceResult | None:
    """A non-streamed result; a client that hangs up meanwhile (even while its request
    waits in the queue) cancels it, as a streaming client's does (B45)."""
    collect = asyncio.ensure_future(run.collect())

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({collect, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    if not collect.done():
        collect.cancel()
        with contextlib.suppress(asyncio.CancelledError, RbeeError):
            await collect
        run.cancel()
        return None
    return collect.result()


async def _token_frames(run: InferenceRun) -> AsyncIterator[bytes]:
    async for item in run.events():
        if isinstance(item, RbeeError):
            yield sse_frame(StreamErrorEvent(error=item.to_body().error))
            break
        yield sse_frame(item)
    yield sse_frame(SSE_DONE)
