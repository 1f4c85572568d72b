"""HTTP client for an rbee agent: one method per route, errors mapped (B11-B13).

Everything the operator side asks a node goes through `AgentClient`. It speaks only
`rbee_agent.protocol` types: error bodies become `RbeeError` again, malformed replies become
MALFORMED_REPLY (never a traceback), and a failure to reach the agent ends in one
AGENT_UNREACHABLE message naming the node, its address and what to try. Retries are not
here: they live in the transport (`RetryTransport`, the one retry policy), so the client is
a pure mapping from routes to typed replies, testable with `httpx.MockTransport`.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from rbee_agent import __version__
from rbee_agent.protocol import (
    REQUEST_ID_HEADER,
    DownloadJob,
    DownloadProgress,
    DownloadRequest,
    ErrorBody,
    ErrorCode,
    HealthReply,
    InferenceRequest,
    LoadingProgress,
    LogLine,
    LogsReply,
    ModelsReply,
    NodeInfo,
    RbeeError,
    RpcServerInfo,
    RpcServerRequest,
    SpawnReply,
    SpawnRequest,
    WorkerInfo,
    WorkersReply,
    iter_sse_data,
    parse_sse_data,
)
from rbee_tui.config import OperatorSettings
from rbee_tui.events import Attempt
from rbee_tui.retry import RetryPolicy

M = TypeVar("M", bound=BaseModel)
AttemptReporter = Callable[[Attempt], None]
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})


def version_mismatch(node: str, agent_version: str) -> RbeeError:
    """B11/B146: another version on the node, with the command that brings the older side up
    to the newer one (upgrading the node to an older operator would downgrade it)."""
    from rbee_tui.ssh_conn import version_tuple

    node_newer = version_tuple(agent_version) > version_tuple(__version__)
    hint = (f"The node runs the newer rbee: upgrade rbee on this machine to {agent_version}, "
            f"or bring the node back to {__version__} with: rbee nodes install {node}"
            if node_newer else f"Upgrade the node: rbee nodes install {node}")
    return RbeeError(
        ErrorCode.VERSION_MISMATCH,
        f"The agent of node '{node}' runs rbee {agent_version}; this rbee is {__version__}",
        hint=hint,
        details={"node": node, "agent_version": agent_version, "operator_version": __version__,
                 "upgrade": "operator" if node_newer else "node"},
    )


_COMMAND = re.compile(r"\brbee (logs|models \w+|workers \w+)\b")


def localize_hint(hint: str, node: str) -> str:
    """An agent's hint names `rbee …` commands without knowing what the operator calls its
    node; fill the node in so the command works as printed (B146)."""
    hint = hint.replace("--node NAME", f"--node {node}")
    return _COMMAND.sub(lambda m: m.group(0) if "--node" in hint[m.end():m.end() + 8]
                        else f"{m.group(0)} --node {node}", hint)


class RetryTransport(httpx.AsyncBaseTransport):
    """Retries what is safe to retry, by the one retry policy (B142), the way httpx's own
    transport retries connects: a connection that never opened (any method), and a read
    timeout before the reply's headers on an idempotent request (GET). A request that reached
    the agent and then broke is never sent twice. Each failed try is reported as an `Attempt`.
    """

    def __init__(self, inner: httpx.AsyncBaseTransport, policy: RetryPolicy,
                 describe: Callable[[Exception], RbeeError],
                 on_attempt: AttemptReporter | None = None) -> None:
        self.inner = inner
        self.policy = policy
        self.describe = describe
        self.on_attempt = on_attempt

    @staticmethod
    def retryable(request: httpx.Request, exc: httpx.TransportError) -> bool:
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return True
        return isinstance(exc, httpx.ReadTimeout) and request.method in IDEMPOTENT

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        number = 1
        while True:
            try:
                return await self.inner.handle_async_request(request)
            except httpx.TransportError as exc:
                wait = self.policy.wait_after(number) if self.retryable(request, exc) else None
                if wait is None:
                    raise
                if self.on_attempt is not None:
                    self.on_attempt(Attempt("agent", number, self.policy.attempts,
                                            self.describe(exc), retry_in_s=wait))
            await asyncio.sleep(wait)
            number += 1

    async def aclose(self) -> None:
        await self.inner.aclose()


class AgentClient:
    def __init__(
        self,
        node: str,
        base_url: str,
        api_key: str | None,
        settings: OperatorSettings,
        transport: httpx.AsyncBaseTransport | None = None,
        on_attempt: AttemptReporter | None = None,
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
            transport=RetryTransport(transport or httpx.AsyncHTTPTransport(),
                                     settings.http_retry, self.unreachable, on_attempt),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ plumbing

    def unreachable(self, exc: Exception) -> RbeeError:
        reason = (f"no answer within {self.settings.http_timeout_s:g} s"
                  if isinstance(exc, httpx.TimeoutException) else str(exc) or "no answer")
        return RbeeError(
            ErrorCode.AGENT_UNREACHABLE,
            f"Cannot reach the agent of node '{self.node}' at {self.base_url} "
            f"({type(exc).__name__}: {reason})",
            hint=f"Is the agent running? Start it with: rbee nodes start {self.node}",
            details={"node": self.node, "url": self.base_url},
        )

    async def _send(self, request: httpx.Request, stream: bool = False) -> httpx.Response:
        try:
            return await self._http.send(request, stream=stream)
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from None

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
        if err.code in (ErrorCode.INVALID_API_KEY, ErrorCode.MISSING_API_KEY):
            return self.not_our_agent(err)
        if err.hint:
            err.hint = localize_hint(err.hint, self.node)
        err.details.setdefault("node", self.node)
        return err

    def not_our_agent(self, err: RbeeError) -> RbeeError:
        """B140: an agent that refuses this node's key is not the agent rbee set up there."""
        return RbeeError(
            err.code,
            f"The agent answering for node '{self.node}' at {self.base_url} does not accept "
            "this node's API key: it is another agent (another user's, or another config's), "
            "or the node's agent was set up again with a new key",
            hint=f"Reinstall to share the key again (rbee nodes install {self.node}), or give "
            "this node's agent a port of its own (rbee nodes edit "
            f"{self.node} --agent-port N).",
            details={"node": self.node, "url": self.base_url, "cause": err.message},
        )

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
        headers = {**kw.pop("headers", {}), **({REQUEST_ID_HEADER: request_id}
                                                 if request_id else {})}
        request = self._http.build_request(method, path, headers=headers,
                                           timeout=httpx.Timeout(self.settings.http_timeout_s,
                                                                 read=None), **kw)
        reply = await self._send(request, stream=True)
        try:
            if reply.status_code >= 400:
                raise self.error_from(reply, await reply.aread())
            async for data in iter_sse_data(reply.aiter_lines()):
                event = parse_sse_data(data)
                if event is None:
                    return
                yield event
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
            raise version_mismatch(self.node, health.version)
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
        """Waits while the agent drains and stops the worker: that takes up to its stop
        grace, longer than a plain request may (B147)."""
        reply = await self.request("DELETE", f"/v1/workers/{worker_id}",
                                   timeout=self.settings.worker_stop_timeout_s)
        return self.parse(WorkerInfo, reply.content)

    async def start_rpc_server(self, device: str = "cpu") -> RpcServerInfo:
        """A llama.cpp RPC server on the node's loopback, for a split worker (B201)."""
        reply = await self.request("POST", "/v1/rpc-servers",
                                   content=RpcServerRequest(device=device).model_dump_json(),
                                   timeout=self.settings.loading_timeout_s)
        return self.parse(RpcServerInfo, reply.content)

    async def rpc_server(self, server_id: str) -> RpcServerInfo:
        return await self.get_model(f"/v1/rpc-servers/{server_id}", RpcServerInfo)

    async def stop_rpc_server(self, server_id: str) -> RpcServerInfo:
        reply = await self.request("DELETE", f"/v1/rpc-servers/{server_id}",
                                   timeout=self.settings.worker_stop_timeout_s)
        return self.parse(RpcServerInfo, reply.content)

    async def progress(self, worker_id: str) -> AsyncIterator[LoadingProgress]:
        async for data in self.sse("GET", f"/v1/workers/{worker_id}/progress"):
            yield self.parse(LoadingProgress, json.dumps(data).encode())

    def inference(
        self, worker_id: str, request: InferenceRequest, request_id: str
    ) -> AsyncIterator[dict[str, Any]]:
        return self.sse("POST", f"/v1/workers/{worker_id}/inference", request_id=request_id,
                        content=request.model_dump_json(exclude_none=True),
                        headers={"Content-Type": "application/json"})

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
