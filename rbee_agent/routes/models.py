"""Model routes: the catalog (B35) and downloads (B37)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse

from rbee_agent.http_errors import parse_body
from rbee_agent.protocol import (
    SSE_DONE,
    CatalogEntry,
    DownloadJob,
    DownloadRequest,
    ModelsReply,
    sse_frame,
)
from rbee_agent.routes import CatalogDep, SupervisorDep, json_body
from rbee_agent.sse import SSEResponse

router = APIRouter()

ModelId = Annotated[str, Path(max_length=128)]
JobId = Annotated[str, Path(max_length=64)]


@router.get("/v1/models", response_model=ModelsReply)
async def list_models(catalog: CatalogDep) -> ModelsReply:
    return ModelsReply(models=await asyncio.to_thread(catalog.list))


@router.delete("/v1/models/{model_id}", response_model=CatalogEntry)
async def delete_model(model_id: ModelId, supervisor: SupervisorDep) -> CatalogEntry:
    return await supervisor.delete_model(model_id)


@router.post("/v1/models/download", response_model=DownloadJob,
             openapi_extra=json_body(DownloadRequest))
async def start_download(request: Request, supervisor: SupervisorDep) -> JSONResponse:
    body = await parse_body(request, DownloadRequest)
    job, joined = await supervisor.downloads.start(body.model_ref)
    info = job.info(joined=joined)
    return JSONResponse(info.model_dump(exclude_none=True),
                        status_code=202 if job.running else 200)


@router.get("/v1/models/download/{job_id}", response_model=DownloadJob,
            response_model_exclude_none=True)
async def get_download(job_id: JobId, supervisor: SupervisorDep) -> DownloadJob:
    return supervisor.downloads.get(job_id).info()


@router.delete("/v1/models/download/{job_id}", response_model=DownloadJob,
               response_model_exclude_none=True)
async def cancel_download(job_id: JobId, supervisor: SupervisorDep) -> DownloadJob:
    return (await supervisor.downloads.cancel(job_id)).info()


@router.get("/v1/models/download/{job_id}/progress")
async def download_progress(job_id: JobId, supervisor: SupervisorDep) -> SSEResponse:
    job = supervisor.downloads.get(job_id)

    async def frames() -> AsyncIterator[bytes]:
        async for event in job.progress.follow():
            yield sse_frame(event)
        yield sse_frame(SSE_DONE)

    return SSEResponse(frames())
