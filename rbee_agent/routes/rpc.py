"""RPC server routes (B201): start, list, inspect and stop llama.cpp RPC servers."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse

from rbee_agent.http_errors import parse_body
from rbee_agent.protocol import RpcServerInfo, RpcServerRequest
from rbee_agent.routes import SupervisorDep, json_body

router = APIRouter()

ServerId = Annotated[str, Path(max_length=64)]


@router.get("/v1/rpc-servers", response_model=list[RpcServerInfo])
async def list_rpc_servers(supervisor: SupervisorDep) -> list[RpcServerInfo]:
    return supervisor.rpc.infos()


@router.post("/v1/rpc-servers", response_model=RpcServerInfo,
             openapi_extra=json_body(RpcServerRequest))
async def start_rpc_server(request: Request, supervisor: SupervisorDep) -> JSONResponse:
    body = await parse_body(request, RpcServerRequest)
    info = await supervisor.rpc.start(body)
    return JSONResponse(info.model_dump(), status_code=201)


@router.get("/v1/rpc-servers/{server_id}", response_model=RpcServerInfo)
async def get_rpc_server(server_id: ServerId, supervisor: SupervisorDep) -> RpcServerInfo:
    rpc = supervisor.rpc
    server = rpc.get(server_id)
    return server.info(rpc.offered_mb(server))


@router.delete("/v1/rpc-servers/{server_id}", response_model=RpcServerInfo)
async def stop_rpc_server(server_id: ServerId, supervisor: SupervisorDep) -> RpcServerInfo:
    return await supervisor.rpc.stop(server_id)
