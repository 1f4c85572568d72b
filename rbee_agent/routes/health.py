"""Routes without the agent's key: health (B21) and the workers' ready callback (B27).

Health answers from memory, never waiting on a lock, a thread or a worker, so it stays fast
whatever the inference load (B125).
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from rbee_agent import __version__
from rbee_agent.auth import bearer_token
from rbee_agent.http_errors import parse_body
from rbee_agent.protocol import ErrorCode, HealthReply, RbeeError, WorkerReadyCallback
from rbee_agent.routes import SupervisorDep, json_body

router = APIRouter()


@router.get("/v1/health", response_model=HealthReply, response_model_exclude_none=True)
async def health() -> HealthReply:
    return HealthReply(version=__version__)


@router.post("/v1/workers/ready", status_code=204,
             openapi_extra=json_body(WorkerReadyCallback))
async def worker_ready(request: Request, supervisor: SupervisorDep) -> Response:
    worker = supervisor.by_key(bearer_token(request))
    if worker is None:
        raise RbeeError(ErrorCode.INVALID_API_KEY,
                        "The ready callback's key belongs to no worker of this agent")
    body = await parse_body(request, WorkerReadyCallback)
    supervisor.ready_callback(worker, body)
    return Response(status_code=204)
