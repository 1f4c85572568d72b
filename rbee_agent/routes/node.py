"""`GET /v1/node` (B23): this machine's resources, and which agent process answers (B132)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from rbee_agent import resources
from rbee_agent.protocol import NodeInfo
from rbee_agent.routes import SettingsDep, SupervisorDep

router = APIRouter()


@router.get("/v1/node", response_model=NodeInfo)
async def node(request: Request, settings: SettingsDep, supervisor: SupervisorDep
               ) -> NodeInfo:
    info = await asyncio.to_thread(resources.node_resources, settings.models_path)
    identity = request.app.state.identity
    return info.model_copy(update={
        "agent_pid": identity.pid, "agent_instance_id": identity.instance_id,
        "agent_started_at": identity.started_at, "gpu_offload": identity.gpu_offload,
        "rpc_servers": supervisor.rpc.infos(),
    })
