"""Worker routes (B24-B33): list, spawn, inspect, stop, follow start-up, infer, cancel."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import JSONResponse

from rbee_agent.http_errors import parse_body
from rbee_agent.protocol import (
    REQUEST_ID_PATTERN,
    SSE_DONE,
    SpawnReply,
    SpawnRequest,
    WorkerInfo,
    WorkersReply,
    sse_frame,
)
from rbee_agent.proxy import proxy_cancel, proxy_inference
from rbee_agent.routes import SupervisorDep, json_body
from rbee_agent.sse import SSEResponse

router = APIRouter()

WorkerId = Annotated[str, Path(max_length=64)]
RequestId = Annotated[str, Path(max_length=128, pattern=REQUEST_ID_PATTERN)]


@router.get("/v1/workers", response_model=WorkersReply)
@router.get("/v1/workers/list", response_model=WorkersReply)
async def list_workers(supervisor: SupervisorDep) -> WorkersReply:
    return WorkersReply(workers=supervisor.infos())


@router.post("/v1/workers", response_model=SpawnReply, openapi_extra=json_body(SpawnRequest))
async def spawn(request: Request, supervisor: SupervisorDep) -> JSONResponse:
    body = await parse_body(request, SpawnRequest)
    reply = await supervisor.spawn(body)
    return JSONResponse(reply.model_dump(), status_code=200 if reply.reused else 201)


@router.get("/v1/workers/{worker_id}", response_model=WorkerInfo)
async def get_worker(worker_id: WorkerId, supervisor: SupervisorDep) -> WorkerInfo:
    return supervisor.get(worker_id).info()


@router.delete("/v1/workers/{worker_id}", response_model=WorkerInfo)
async def stop_worker(worker_id: WorkerId, supervisor: SupervisorDep) -> WorkerInfo:
    return await supervisor.stop(worker_id)


@router.get("/v1/workers/{worker_id}/progress")
async def worker_progress(worker_id: WorkerId, supervisor: SupervisorDep) -> SSEResponse:
    worker = supervisor.get(worker_id)

    async def frames() -> AsyncIterator[bytes]:
        async for event in supervisor.follow_progress(worker):
            yield sse_frame(event)
        yield sse_frame(SSE_DONE)

    return SSEResponse(frames())


@router.post("/v1/workers/{worker_id}/inference")
async def inference(worker_id: WorkerId, request: Request,
                    supervisor: SupervisorDep) -> Response:
    return await proxy_inference(supervisor, supervisor.get(worker_id), request)


@router.delete("/v1/workers/{worker_id}/inference/{request_id}", status_code=204)
async def cancel(worker_id: WorkerId, request_id: RequestId,
                 supervisor: SupervisorDep) -> Response:
    await proxy_cancel(supervisor, supervisor.get(worker_id), request_id)
    return Response(status_code=204)
