"""`GET /v1/logs` (B34): the agent's log or a worker's, the last lines, then follow."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse

from rbee_agent.logs import follow_lines, tail_lines
from rbee_agent.protocol import ErrorCode, LogLine, LogsReply, RbeeError, sse_frame
from rbee_agent.routes import SettingsDep
from rbee_agent.settings import AgentSettings
from rbee_agent.sse import SSEResponse

router = APIRouter()

AGENT_LOG = "agent.log"
# A worker id as the supervisor makes them (w<n>-<hex>); anything else names no log.
_WORKER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


@router.get("/v1/logs", response_model=LogsReply)
async def logs(
    settings: SettingsDep,
    worker: Annotated[str | None, Query(max_length=64)] = None,
    tail: Annotated[int, Query(ge=0, le=100_000)] = 100,
    follow: bool = False,
) -> Response:
    path = log_path(settings, worker)
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


def log_path(settings: AgentSettings, worker: str | None) -> Path:
    """The log file to read; WORKER_NOT_FOUND for a name that is not a worker's log."""
    if worker is None:
        return settings.log_dir / AGENT_LOG
    path = settings.log_dir / "workers" / f"{worker}.log"
    if not _WORKER_ID.fullmatch(worker) or not path.is_file():
        raise RbeeError(
            ErrorCode.WORKER_NOT_FOUND,
            f"No log for worker {worker[:64]!r} on this node",
            hint="List workers with 'rbee workers list --node NAME'.",
            details={"worker_id": worker[:64]},
        )
    return path
