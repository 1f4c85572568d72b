"""HTTP client for an rbee agent: retries, SSE, version check, error mapping (B11-B13).

Everything the operator side asks a node goes through `AgentClient`. It speaks only
`rbee_agent.protocol` types: error bodies become `RbeeError` again, malformed replies become
MALFORMED_REPLY (never a traceback), and connection failures are retried with backoff and
end in one AGENT_UNREACHABLE message naming the node, its address and what to try.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import httpx
from httpx_sse import EventSource
from pydantic import BaseModel, ValidationError

from rbee_agent import __version__
from rbee_agent.protocol import (
    DownloadJob,
    DownloadProgress,
    DownloadRequest,
    ErrorBody,
    ErrorCode,
    HealthReply,
    LoadingProgress,
    LogLine,
    LogsReply,
    ModelsReply,
    NodeInfo,
    RbeeError,
    SpawnReply,
    SpawnRequest,
    WorkerInfo,
    WorkersReply,
    parse_sse_data,
)
from rbee_tui.config import OperatorSettings

M = TypeVar("M", bound=BaseModel)
REQUEST_ID_HEADER = "X-Request-Id"


class AgentClient:
    def __init__(
        self,
        node: str,
        base_url: str,
        api_key: str | None,
        settings: OperatorSettings,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.node = node
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.settings = settings
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(settings.http_timeout_s),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ plumbing

    def unreachable(self, exc: Exception) -> RbeeError:
        return RbeeError(
            ErrorCode.AGENT_UNREACHABLE,
            f"Cannot reach the agent of node '{self.node}' at {self.base_url} "
            f"({type(exc).__name__}: {exc or 'no answer'})",
            hint=f"Is the agent running? Start it with: rbee nodes start {self.node}",
            details={"node": self.node, "url": self.base_url},
        )

    async def _send(self, request: httpx.Request, stream: bool = False) -> httpx.Response:
        """Send with retries on connection failures only (a request that reached the agent
        is never repeated)."""
        attempts = self.settings.http_attempts
        backoff = self.settings.http_backoff_s
        last: Exception | None = None
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(backoff[min(attempt, len(backoff) - 1)])
            try:
                return await self._http.send(request, stream=stream)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                last = exc
            except httpx.TransportError as exc:  # reached it, then lost it: do not repeat
                raise self.unreachable(exc) from None
        assert last is not None
        raise self.unreachable(last)

    async def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        reply = await self._send(self._http.build_request(method, path, **kw))
        if reply.status_code >= 400:
            raise self.error_from(reply, reply.content)
        return reply

    def error_from(self, reply: httpx.Response, content: bytes) -> RbeeError:
        try:
            err = RbeeError.from_body(ErrorBody.model_validate_json(content))
        except ValidationError:
            return RbeeError(
                ErrorCode.MALFORMED_REPLY,
                f"The agent of node '{self.node}' answered HTTP {reply.status_code} with a body "
                f"rbee cannot read: {content[:120]!r}",
                hint="Is something else listening on that port? Check with rbee nodes check.",
                details={"status": reply.status_code},
            )
        err.details.setdefault("node", self.node)
        return err

    async def get_model(self, path: str, model: type[M], **kw: Any) -> M:
        return self.parse(model, (await self.request("GET", path, **kw)).content)

    def parse(self, model: type[M], content: bytes) -> M:
        try:
            return model.model_validate_json(content)
        except ValidationError as exc:
            raise RbeeError(
                ErrorCode.MALFORMED_REPLY,
                f"The agent of node '{self.node}' sent a reply of the wrong shape for "
                f"{model.__name__}: {exc.errors()[0]['msg']}",
                hint="The agent may be a different version: rbee nodes install "
                f"{self.node} upgrades it.",
                details={"node": self.node},
            ) from None

    async def sse(
        self, method: str, path: str, request_id: str | None = None, **kw: Any
    ) -> AsyncIterator[dict[str, Any]]:
        """JSON events of an SSE route, ending at `[DONE]`; errors before the stream starts
        are raised as RbeeError."""
        headers = {REQUEST_ID_HEADER: request_id} if request_id else {}
        request = self._http.build_request(method, path, headers=headers,
                                           timeout=httpx.Timeout(self.settings.http_timeout_s,
                                                                 read=None), **kw)
        reply = await self._send(request, stream=True)
        try:
            if reply.status_code >= 400:
                raise self.error_from(reply, await reply.aread())
            async for event in EventSource(reply).aiter_sse():
                data = parse_sse_data(event.data)
                if data is None:
                    return
                yield data
            raise RbeeError(
                ErrorCode.STREAM_INTERRUPTED,
                f"The stream from node '{self.node}' ended without its [DONE] marker",
                details={"node": self.node},
            )
        except httpx.TransportError as exc:
            raise RbeeError(
                ErrorCode.STREAM_INTERRUPTED,
                f"The stream from node '{self.node}' broke: {type(exc).__name__}",
                details={"node": self.node},
            ) from None
        finally:
            await reply.aclose()

    # ------------------------------------------------------------------ routes

    async def health(self) -> HealthReply:
        return await self.get_model("/v1/health", HealthReply)

    async def check_version(self) -> HealthReply:
        """B11: an agent of another version is refused with the upgrade command."""
        health = await self.health()
        if health.version != __version__:
            raise RbeeError(
                ErrorCode.VERSION_MISMATCH,
                f"The agent of node '{self.node}' runs rbee {health.version}; this rbee is "
                f"{__version__}",
                hint=f"Upgrade the node: rbee nodes install {self.node}",
                details={"node": self.node, "agent_version": health.version,
                         "operator_version": __version__},
            )
        return health

    async def node_info(self) -> NodeInfo:
        return await self.get_model("/v1/node", NodeInfo)

    async def workers(self) -> list[WorkerInfo]:
        return (await self.get_model("/v1/workers", WorkersReply)).workers

    async def worker(self, worker_id: str) -> WorkerInfo:
        return await self.get_model(f"/v1/workers/{worker_id}", WorkerInfo)

    async def spawn(self, request: SpawnRequest) -> SpawnReply:
        reply = await self.request("POST", "/v1/workers",
                                   content=request.model_dump_json(exclude_none=True))
        return self.parse(SpawnReply, reply.content)

    async def stop_worker(self, worker_id: str) -> WorkerInfo:
        return self.parse(WorkerInfo,
                          (await self.request("DELETE", f"/v1/workers/{worker_id}")).content)

    async def progress(self, worker_id: str) -> AsyncIterator[LoadingProgress]:
        async for data in self.sse("GET", f"/v1/workers/{worker_id}/progress"):
            yield self.parse(LoadingProgress, json.dumps(data).encode())

    def inference(
        self, worker_id: str, body: dict[str, Any], request_id: str
    ) -> AsyncIterator[dict[str, Any]]:
        return self.sse("POST", f"/v1/workers/{worker_id}/inference", request_id=request_id,
                        json=body)

    async def cancel(self, worker_id: str, request_id: str) -> None:
        await self.request("DELETE", f"/v1/workers/{worker_id}/inference/{request_id}")

    async def download(self, model_ref: str) -> DownloadJob:
        reply = await self.request("POST", "/v1/models/download",
                                   content=DownloadRequest(model_ref=model_ref)
                                   .model_dump_json())
        return self.parse(DownloadJob, reply.content)

    async def download_progress(self, job_id: str) -> AsyncIterator[DownloadProgress]:
        async for data in self.sse("GET", f"/v1/models/download/{job_id}/progress"):
            yield self.parse(DownloadProgress, json.dumps(data).encode())

    async def cancel_download(self, job_id: str) -> None:
        await self.request("DELETE", f"/v1/models/download/{job_id}")

    async def models(self) -> ModelsReply:
        return await self.get_model("/v1/models", ModelsReply)

    async def delete_model(self, model_id: str) -> None:
        await self.request("DELETE", f"/v1/models/{model_id}")

    async def logs(self, worker: str | None, tail: int) -> LogsReply:
        params: dict[str, Any] = {"tail": tail}
        if worker:
            params["worker"] = worker
        return await self.get_model("/v1/logs", LogsReply, params=params)

    async def follow_logs(self, worker: str | None, tail: int) -> AsyncIterator[LogLine]:
        params: dict[str, Any] = {"tail": tail, "follow": "true"}
        if worker:
            params["worker"] = worker
        async for data in self.sse("GET", "/v1/logs", params=params):
            yield self.parse(LogLine, json.dumps(data).encode())
