"""The agent's HTTP routes (thin: parse, call the supervisor or catalog, reply).

Every route but `/v1/health` needs the agent's bearer key; the worker ready callback is the
one exception in kind, authenticated with the calling worker's own key (B27). A test walks
this app's route table, so a new route without auth fails it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse

from rbee_agent import __version__, resources
from rbee_agent.auth import bearer_token, check_bearer
from rbee_agent.bundled import register_bundled
from rbee_agent.catalog import Catalog, owned_file
from rbee_agent.http_errors import install_error_handlers, parse_body
from rbee_agent.logs import follow_lines, tail_lines
from rbee_agent.metrics import AgentMetrics, RequestCounter, route_template
from rbee_agent.metrics_route import metrics_router
from rbee_agent.openai.routes import openai_router
from rbee_agent.protocol import (
    SSE_DONE,
    CatalogEntry,
    DownloadJob,
    DownloadRequest,
    ErrorCode,
    HealthReply,
    LogLine,
    LogsReply,
    ModelsReply,
    NodeInfo,
    RbeeError,
    SpawnReply,
    SpawnRequest,
    WorkerInfo,
    WorkerReadyCallback,
    WorkersReply,
    sse_frame,
)
from rbee_agent.provision import split_parts
from rbee_agent.proxy import proxy_cancel, proxy_inference
from rbee_agent.settings import AgentSettings
from rbee_agent.sse import SSEResponse
from rbee_agent.supervisor import Supervisor

log = logging.getLogger("rbee.agent")

AGENT_LOG = "agent.log"


def create_app(
    settings: AgentSettings,
    catalog: Catalog,
    on_startup: Callable[[Supervisor], None] | None = None,
) -> FastAPI:
    supervisor = Supervisor(settings, catalog)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        settings.models_path.mkdir(parents=True, exist_ok=True)
        added = await asyncio.to_thread(register_bundled, catalog, settings.models_path)
        log.info("agent %s on %s; %d bundled model(s): %s", __version__, settings.url,
                 len(added), ", ".join(e.id for e in added) or "none")
        supervisor.start()
        if on_startup is not None:
            on_startup(supervisor)
        try:
            yield
        finally:
            await supervisor.shutdown()

    # No unauthenticated docs: every route but health needs the key (B22).
    app = FastAPI(title="rbee agent", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.supervisor = supervisor
    app.state.metrics = AgentMetrics(supervisor)
    app.add_middleware(RequestCounter, metrics=app.state.metrics, route_of=route_template)
    install_error_handlers(app)

    def require_key(request: Request) -> None:
        assert settings.api_key is not None
        check_bearer(request, settings.api_key)

    @app.get("/v1/health", response_model=HealthReply, response_model_exclude_none=True)
    async def health() -> HealthReply:
        return HealthReply(version=__version__)

    @app.post("/v1/workers/ready", status_code=204)
    async def worker_ready(request: Request) -> Response:
        worker = supervisor.by_key(bearer_token(request))
        if worker is None:
            raise RbeeError(ErrorCode.INVALID_API_KEY,
                            "The ready callback's key belongs to no worker of this agent")
        body = await parse_body(request, WorkerReadyCallback)
        supervisor.ready_callback(worker, body)
        return Response(status_code=204)

    api = APIRouter(dependencies=[Depends(require_key)])

    @api.get("/v1/node", response_model=NodeInfo)
    async def node() -> NodeInfo:
        return await asyncio.to_thread(resources.node_resources, settings.models_path)

    @api.get("/v1/workers", response_model=WorkersReply)
    @api.get("/v1/workers/list", response_model=WorkersReply)
    async def list_workers() -> WorkersReply:
        return WorkersReply(workers=supervisor.infos())

    @api.post("/v1/workers", response_model=SpawnReply)
    async def spawn(request: Request) -> JSONResponse:
        body = await parse_body(request, SpawnRequest)
        reply = await supervisor.spawn(body)
        return JSONResponse(reply.model_dump(), status_code=200 if reply.reused else 201)

    @api.get("/v1/workers/{worker_id}", response_model=WorkerInfo)
    async def get_worker(worker_id: str) -> WorkerInfo:
        return supervisor.get(worker_id).info()

    @api.delete("/v1/workers/{worker_id}", response_model=WorkerInfo)
    async def stop_worker(worker_id: str) -> WorkerInfo:
        return await supervisor.stop(worker_id)

    @api.get("/v1/workers/{worker_id}/progress")
    async def worker_progress(worker_id: str) -> SSEResponse:
        worker = supervisor.get(worker_id)

        async def frames() -> AsyncIterator[bytes]:
            async for event in supervisor.follow_progress(worker):
                yield sse_frame(event)
            yield sse_frame(SSE_DONE)

        return SSEResponse(frames())

    @api.post("/v1/workers/{worker_id}/inference")
    async def inference(worker_id: str, request: Request) -> Response:
        return await proxy_inference(supervisor, supervisor.get(worker_id), request)

    @api.delete("/v1/workers/{worker_id}/inference/{request_id}", status_code=204)
    async def cancel(worker_id: str, request_id: str) -> Response:
        await proxy_cancel(supervisor, supervisor.get(worker_id), request_id)
        return Response(status_code=204)

    @api.get("/v1/models", response_model=ModelsReply)
    async def list_models() -> ModelsReply:
        return ModelsReply(models=await asyncio.to_thread(catalog.list))

    @api.delete("/v1/models/{model_id}", response_model=CatalogEntry)
    async def delete_model(model_id: str) -> CatalogEntry:
        entry = await asyncio.to_thread(catalog.require, model_id)
        users = supervisor.model_in_use(model_id)
        if users:
            raise RbeeError(
                ErrorCode.MODEL_IN_USE,
                f"Model {model_id} is in use by worker(s) {', '.join(users)}",
                hint="Stop those workers first: rbee workers stop --node NAME --id ID.",
                details={"workers": users},
            )
        if entry.provider == "bundled":
            raise RbeeError(
                ErrorCode.MODEL_PROTECTED,
                f"Model {model_id} ships with an installed package and cannot be deleted here",
                hint="Uninstall its package on the node to remove it.",
            )
        owned = owned_file(entry, settings.models_path)
        if owned is not None:
            parts = split_parts(owned) if entry.provider == "hf" else [owned]
            for part in parts:
                await asyncio.to_thread(part.unlink, missing_ok=True)
        await asyncio.to_thread(catalog.remove, model_id)
        log.info("model %s removed from the catalog%s", model_id,
                 f" and {owned} deleted" if owned else " (its file is not ours; kept)")
        return entry

    # ---------------------------------------------------------------- downloads (B37)

    downloads = supervisor.downloads

    @api.post("/v1/models/download", response_model=DownloadJob)
    async def start_download(request: Request) -> JSONResponse:
        body = await parse_body(request, DownloadRequest)
        job, joined = await downloads.start(body.model_ref)
        info = job.info(joined=joined)
        return JSONResponse(info.model_dump(exclude_none=True),
                            status_code=202 if job.running else 200)

    @api.get("/v1/models/download/{job_id}", response_model=DownloadJob,
             response_model_exclude_none=True)
    async def get_download(job_id: str) -> DownloadJob:
        return downloads.get(job_id).info()

    @api.delete("/v1/models/download/{job_id}", response_model=DownloadJob,
                response_model_exclude_none=True)
    async def cancel_download(job_id: str) -> DownloadJob:
        return (await downloads.cancel(job_id)).info()

    @api.get("/v1/models/download/{job_id}/progress")
    async def download_progress(job_id: str) -> SSEResponse:
        job = downloads.get(job_id)

        async def frames() -> AsyncIterator[bytes]:
            async for event in job.progress.follow():
                yield sse_frame(event)
            yield sse_frame(SSE_DONE)

        return SSEResponse(frames())

    @api.get("/v1/logs", response_model=LogsReply)
    async def logs(
        worker: str | None = None,
        tail: int = Query(default=100, ge=0, le=100_000),
        follow: bool = False,
    ) -> Response:
        path = _log_path(settings, worker)
        source = worker or "agent"
        lines = await asyncio.to_thread(tail_lines, path, tail)
        if not follow:
            return JSONResponse(LogsReply(source=source, lines=lines).model_dump())

        async def frames() -> AsyncIterator[bytes]:
            for line in lines:
                yield sse_frame(LogLine(source=source, line=line))
            async for line in follow_lines(path):
                yield sse_frame(LogLine(source=source, line=line))

        return SSEResponse(frames())

    app.include_router(api)
    app.include_router(openai_router(supervisor, settings, require_key))
    app.include_router(metrics_router(app.state.metrics, settings, require_key))
    return app


def _log_path(settings: AgentSettings, worker: str | None) -> Path:
    if worker is None:
        return settings.log_dir / AGENT_LOG
    path = settings.log_dir / "workers" / f"{worker}.log"
    if "/" in worker or worker.startswith(".") or not path.exists():
        raise RbeeError(
            ErrorCode.WORKER_NOT_FOUND,
            f"No log for worker {worker!r} on this node",
            hint="List workers with 'rbee workers list --node NAME'.",
            details={"worker_id": worker},
        )
    return path
