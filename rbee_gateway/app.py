"""The gateway's HTTP app (B186-B189): OpenAI's routes for every node at once.

`POST /v1/chat/completions` and `/v1/completions` are relayed to the chosen node's agent
(`/openai/v1/…`) frame by frame, through the same lean HTTP client the agent uses for its
workers (on a 2-core operator machine every microsecond per token is taken from inference).
A node that cannot be reached, or that is full (503), is skipped for the next candidate
before anything has been sent to the client; one that breaks off mid-stream is marked down
and the client gets an error event, which the OpenAI SDK raises as `APIError`.

Every route but `/health` needs the gateway's key; errors have OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rbee_agent import relay
from rbee_agent.disconnect import until_disconnect
from rbee_agent.metrics import (
    CONTENT_TYPE,
    MB,
    OPENAI_TOKEN_CHUNK,
    RequestCounter,
    StreamMeter,
    StreamMetrics,
    metrics_open,
    route_template,
)
from rbee_agent.openai.errors import error_headers, openai_error, openai_status
from rbee_agent.protocol import ErrorCode, RbeeError
from rbee_agent.sse import SSEResponse
from rbee_gateway.routing import Fleet, NodeState

log = logging.getLogger("rbee.gateway")

AGENT_PREFIX = "/openai/v1"
REQUEST_ID_HEADER = "X-Request-Id"
NODE_HEADER = "X-Rbee-Node"  # which node answered
RETRY_ELSEWHERE = (502, 503, 504)  # before the first byte: another node may do better
_USAGE_CHUNK = b'"choices":[],"usage":'
_KEPT_HEADERS = ("retry-after",)


def error_response(err: RbeeError) -> JSONResponse:
    return JSONResponse(openai_error(err), status_code=openai_status(err),
                        headers=error_headers(err))


# --------------------------------------------------------------------------- metrics


class FleetCollector(Collector):
    """Each node as the gateway last saw it: up or down, requests in flight, workers,
    slots and queue, VRAM."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def collect(self) -> Iterable[Metric]:
        states = list(self.fleet.states.values())
        up = GaugeMetricFamily("rbee_gateway_node_up", "1 when the node's agent answers",
                               labels=["node"])
        inflight = GaugeMetricFamily("rbee_gateway_inflight",
                                     "Requests the gateway has in flight to the node",
                                     labels=["node"])
        workers = GaugeMetricFamily("rbee_gateway_node_workers", "Workers by state",
                                    labels=["node", "state"])
        busy = GaugeMetricFamily("rbee_gateway_node_slots_busy", "Slots generating",
                                 labels=["node"])
        queued = GaugeMetricFamily("rbee_gateway_node_queue_length",
                                   "Requests waiting for a slot", labels=["node"])
        used = GaugeMetricFamily("rbee_gateway_node_vram_used_bytes", "VRAM in use",
                                 labels=["node", "gpu"])
        total = GaugeMetricFamily("rbee_gateway_node_vram_total_bytes", "VRAM",
                                  labels=["node", "gpu"])
        for s in states:
            up.add_metric([s.name], 1 if s.up else 0)
            inflight.add_metric([s.name], sum(s.inflight.values()))
            for state in ("loading", "idle", "busy", "draining", "stopping", "failed"):
                workers.add_metric([s.name, state], sum(1 for w in s.workers
                                                        if w.state == state))
            busy.add_metric([s.name], sum(w.active_requests for w in s.workers))
            queued.add_metric([s.name], sum(w.queued for w in s.workers))
            for gpu in s.info.gpus if s.info else []:
                if gpu.vram_used_mb is not None:
                    used.add_metric([s.name, str(gpu.index)], gpu.vram_used_mb * MB)
                if gpu.vram_total_mb is not None:
                    total.add_metric([s.name, str(gpu.index)], gpu.vram_total_mb * MB)
        yield from (up, inflight, workers, busy, queued, used, total)


class GatewayMetrics(StreamMetrics):
    def __init__(self, fleet: Fleet) -> None:
        super().__init__(CollectorRegistry(auto_describe=False), "rbee_gateway")
        self.routed = Counter("rbee_gateway_routed", "Requests relayed, by node and status",
                              ["node", "status"], registry=self.registry)
        self.registry.register(FleetCollector(fleet))


# --------------------------------------------------------------------------- relaying


@dataclass(frozen=True)
class _Call:
    model: str  # as the agents know it
    order: list[str]  # nodes to try
    body: bytes
    stream: bool
    wants_usage: bool


def _request_fields(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise RbeeError(ErrorCode.INVALID_REQUEST, f"The request body is not valid JSON: {exc}",
                        hint='Send a JSON object, e.g. {"model": "…", "messages": […]}.'
                        ) from None
    if not isinstance(body, dict) or not isinstance(body.get("model"), str) \
            or not body["model"]:
        raise RbeeError(ErrorCode.INVALID_REQUEST, "The request names no model",
                        hint="Send \"model\": a name from GET /v1/models.",
                        details={"param": "model"})
    return body


def _usage(frame_batch: bytes) -> tuple[bytes, int | None]:
    """The batch without its usage chunk, and the completion tokens that chunk counted."""
    kept: list[bytes] = []
    tokens = None
    for frame in frame_batch.split(b"\n\n"):
        if _USAGE_CHUNK in frame:
            usage = json.loads(frame[6:]).get("usage") or {}
            tokens = int(usage.get("completion_tokens", 0))
            continue
        if frame:
            kept.append(frame + b"\n\n")
    return b"".join(kept), tokens


class Gateway:
    def __init__(self, fleet: Fleet, api_key: str, host: str) -> None:
        self.fleet = fleet
        self.api_key = api_key
        self.metrics = GatewayMetrics(fleet)
        self.metrics_public = metrics_open(fleet.settings.gateway_metrics_public, host)

    def check_key(self, request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise RbeeError(ErrorCode.MISSING_API_KEY, f"{request.url.path} needs an API key",
                            hint="Send 'Authorization: Bearer <key>' with the key rbee serve "
                            "printed")
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise RbeeError(ErrorCode.INVALID_API_KEY, "The API key is not this gateway's",
                            hint="Use the key rbee serve printed (it is in the gateway's key "
                            "file)")

    async def forward(self, request: Request, path: str) -> Response:
        started = time.perf_counter()
        call = await self._route(await request.body())
        request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        state, upstream = await self._send(call, AGENT_PREFIX + path, request_id)
        self.metrics.routed.labels(state.name, str(upstream.status)).inc()
        headers = {REQUEST_ID_HEADER: request_id, NODE_HEADER: state.name}
        headers.update({k: v for k, v in upstream.headers.items() if k in _KEPT_HEADERS})
        if upstream.status == 200 and call.stream:
            meter = self.metrics.meter(call.model, started, OPENAI_TOKEN_CHUNK)
            return SSEResponse(self._frames(state, call, upstream, meter), headers=headers)
        return await self._whole(request, state, call.model, upstream, headers)

    async def _route(self, raw: bytes) -> _Call:
        """Where the request goes, and its body as the agents get it: the model without its
        `@node`, and usage always asked for in a stream (to count tokens; dropped again
        before the client sees it if the client did not ask)."""
        body = _request_fields(raw)
        model, order = await self.fleet.plan(body["model"])
        stream = bool(body.get("stream"))
        options = body.get("stream_options")
        options = options if isinstance(options, dict) else {}
        wants_usage = stream and bool(options.get("include_usage"))
        if model != body["model"] or (stream and not wants_usage):
            body["model"] = model
            if stream:
                body["stream_options"] = {**options, "include_usage": True}
            raw = json.dumps(body).encode()
        return _Call(model, order, raw, stream, wants_usage)

    async def _send(self, call: _Call, path: str, request_id: str
                    ) -> tuple[NodeState, relay.UpstreamResponse]:
        """The first node, in routing order, that takes the request (B188)."""
        problems: list[str] = []
        for position, node in enumerate(call.order):
            state = self.fleet.states[node]
            if state.endpoint is None:
                continue
            headers = {"Content-Type": "application/json", REQUEST_ID_HEADER: request_id}
            if state.endpoint.api_key:
                headers["Authorization"] = f"Bearer {state.endpoint.api_key}"
            with self.fleet.in_flight(node, call.model):
                try:
                    upstream = await relay.post(state.endpoint.host, state.endpoint.port,
                                                path, headers, call.body)
                except relay.RelayError as exc:
                    self.fleet.mark_down(node, str(exc))
                    problems.append(f"{node}: {exc}")
                    continue
                if upstream.status in RETRY_ELSEWHERE and position < len(call.order) - 1:
                    payload = await _read(upstream)
                    problems.append(f"{node}: HTTP {upstream.status}")
                    log.info("node %s answered %d; trying the next node: %s", node,
                             upstream.status, payload[:200])
                    continue
            return state, upstream
        raise RbeeError(ErrorCode.AGENT_UNREACHABLE,
                        f"No node could take the request ({'; '.join(problems) or 'none'})",
                        hint="See which nodes are up: rbee nodes list; rbee nodes check NAME",
                        details={"retry_after_s": 1})

    async def _frames(self, state: NodeState, call: _Call, upstream: relay.UpstreamResponse,
                      meter: StreamMeter) -> AsyncIterator[bytes]:
        with self.fleet.in_flight(state.name, call.model):
            try:
                async for batch in upstream.sse_batches():
                    meter.frames(batch)
                    if _USAGE_CHUNK in batch:
                        kept, tokens = _usage(batch)
                        meter.tokens(tokens or 0)
                        batch = batch if call.wants_usage else kept
                    if batch:
                        yield batch
            except relay.RelayError as exc:
                self.fleet.mark_down(state.name, f"broke off a stream: {exc}")
                err = RbeeError(ErrorCode.STREAM_INTERRUPTED,
                                f"Node '{state.name}' broke off the stream: {exc}",
                                hint="Send the request again; the gateway routes it to "
                                "another node")
                yield (b"data: " + json.dumps(openai_error(err)).encode()
                       + b"\n\ndata: [DONE]\n\n")
            finally:
                await upstream.aclose()

    async def _whole(self, request: Request, state: NodeState, model: str,
                     upstream: relay.UpstreamResponse, headers: dict[str, str]) -> Response:
        with self.fleet.in_flight(state.name, model):
            try:
                payload = await until_disconnect(request, _read(upstream))
            except relay.RelayError as exc:
                self.fleet.mark_down(state.name, f"broke off a reply: {exc}")
                raise RbeeError(ErrorCode.STREAM_INTERRUPTED,
                                f"Node '{state.name}' broke off the reply: {exc}",
                                hint="Send the request again") from None
        if payload is None:
            return Response(status_code=499)
        if upstream.status == 200:
            try:
                usage = json.loads(payload).get("usage") or {}
                self.metrics.tokens.labels(model).inc(int(usage.get("completion_tokens", 0)))
            except (ValueError, AttributeError):
                pass
        return Response(payload, status_code=upstream.status, headers=headers,
                        media_type=upstream.headers.get("content-type", "application/json"))

    # ------------------------------------------------------------------ models

    async def model_list(self) -> dict[str, Any]:
        """Every model of every reachable node, once, then once per node (`name@node`)."""
        await self.fleet.refresh_stale()
        data: list[dict[str, Any]] = []
        pinned: list[dict[str, Any]] = []
        for entry, nodes in self.fleet.models():
            data.append({"id": entry.id, "object": "model", "created": int(entry.added_at),
                         "owned_by": "rbee", "nodes": nodes})
            pinned += [{"id": f"{entry.id}@{node}", "object": "model",
                        "created": int(entry.added_at), "owned_by": node, "nodes": [node]}
                       for node in nodes]
        return {"object": "list", "data": data + pinned}


async def _read(upstream: relay.UpstreamResponse) -> bytes:
    try:
        return await upstream.read()
    finally:
        await upstream.aclose()


# --------------------------------------------------------------------------- app


def create_gateway_app(gateway: Gateway) -> Starlette:
    fleet = gateway.fleet

    async def guarded(request: Request, work: Any) -> Response:
        try:
            gateway.check_key(request)
            result = await work()
            return result if isinstance(result, Response) else JSONResponse(result)
        except RbeeError as err:
            return error_response(err)

    async def chat(request: Request) -> Response:
        return await guarded(request, lambda: gateway.forward(request, "/chat/completions"))

    async def completions(request: Request) -> Response:
        return await guarded(request, lambda: gateway.forward(request, "/completions"))

    async def models(request: Request) -> Response:
        return await guarded(request, gateway.model_list)

    async def model(request: Request) -> Response:
        async def one() -> dict[str, Any]:
            wanted = request.path_params["model"]
            for item in (await gateway.model_list())["data"]:
                if item["id"] == wanted:
                    return dict(item)
            raise RbeeError(ErrorCode.MODEL_NOT_FOUND,
                            f"No reachable node has the model '{wanted}'",
                            hint="GET /v1/models lists them", details={"param": "model"})

        return await guarded(request, one)

    async def metrics(request: Request) -> Response:
        if not gateway.metrics_public:
            try:
                gateway.check_key(request)
            except RbeeError as err:
                return error_response(err)
        text = await asyncio.to_thread(gateway.metrics.render)
        return Response(text, media_type=CONTENT_TYPE)

    async def health(_: Request) -> Response:
        up = sorted(s.name for s in fleet.states.values() if s.up)
        return JSONResponse({"status": "ok", "nodes": len(fleet.states), "nodes_up": up})

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        code = ErrorCode.METHOD_NOT_ALLOWED if status == 405 else ErrorCode.NOT_FOUND
        return error_response(RbeeError(
            code, f"The gateway does not serve {request.method} {request.url.path}",
            hint="It serves POST /v1/chat/completions, POST /v1/completions and "
            "GET /v1/models"))

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        first = asyncio.ensure_future(fleet.refresh_stale())
        healer = asyncio.ensure_future(fleet.heal())
        try:
            yield
        finally:
            for task in (first, healer):
                task.cancel()
            await asyncio.gather(first, healer, return_exceptions=True)
            await fleet.aclose()

    app = Starlette(routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ], exception_handlers={404: not_found, 405: not_found}, lifespan=lifespan)
    app.add_middleware(RequestCounter, metrics=gateway.metrics, route_of=route_template)
    return app
