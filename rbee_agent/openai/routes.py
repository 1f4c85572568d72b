"""The OpenAI-compatible API of an agent, under `/openai/v1` (B180-B185).

`base_url="http://127.0.0.1:9200/openai/v1"` and the agent's key are all an OpenAI client
needs. The prefix keeps rbee's own `GET /v1/models` (the catalog, which rbee's operator side
reads) apart from OpenAI's `GET …/models`, which has another shape; serving both on one path
would mean guessing the client from its headers.

A request names a model (a catalog name or a model reference). It goes to the least busy
ready worker serving that model; with none, one is started (the request waits while it
loads, or downloads first for an `hf:` model) and stays for the next request. Everything
after that is the native inference path: the same relay to the worker, the same
cancellation when the client hangs up, the same metrics.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from rbee_agent import resources
from rbee_agent.disconnect import until_disconnect
from rbee_agent.managed_worker import ManagedWorker
from rbee_agent.model_refs import CatalogRef, parse_model_ref
from rbee_agent.openai.errors import error_headers, from_rbee_body, openai_error, openai_status
from rbee_agent.openai.translate import (
    Kind,
    ReplyCollector,
    Shape,
    StreamTranslator,
    chat_inference,
    completion_inference,
    parse,
)
from rbee_agent.openai.wire import ChatCompletionRequest, CompletionRequest
from rbee_agent.protocol import (
    REQUEST_ID_HEADER,
    CatalogEntry,
    ErrorCode,
    InferenceRequest,
    RbeeError,
    SpawnRequest,
)
from rbee_agent.provision import Plan
from rbee_agent.proxy import (
    Upstream,
    read_reply,
    send_inference,
    stream_frames,
)
from rbee_agent.routes import json_body
from rbee_agent.settings import AgentSettings
from rbee_agent.sse import SSEResponse
from rbee_agent.supervisor import Supervisor

log = logging.getLogger("rbee.agent")

PREFIX = "/openai/v1"
_SERVING = ("idle", "busy", "loading")
_FALLBACK_TO_CPU = (ErrorCode.INSUFFICIENT_VRAM, ErrorCode.BACKEND_UNAVAILABLE,
                    ErrorCode.DEVICE_NOT_FOUND)


def error_response(err: RbeeError) -> JSONResponse:
    return JSONResponse(openai_error(err), status_code=openai_status(err),
                        headers=error_headers(err))


class OpenAIRoute(APIRoute):
    """A route whose errors (its key check included) leave in OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except RbeeError as err:
                return error_response(err)
            except Exception as exc:
                log.exception("unhandled error on %s %s", request.method, request.url.path)
                return error_response(RbeeError(
                    ErrorCode.INTERNAL_ERROR,
                    f"Internal error on {request.method} {request.url.path}: "
                    f"{type(exc).__name__}", hint="See the agent log for the traceback"))

        return handle


def answer_route_errors(app: FastAPI) -> None:
    """404 and 405 under `/openai/` in OpenAI's shape too; everything else as before.

    Routing answers these before any route runs, so they reach the app's handler; this one
    wraps it rather than replacing it.
    """
    rbee_handler = app.exception_handlers[StarletteHTTPException]

    async def handler(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", None)
        if not request.url.path.startswith(PREFIX + "/") or status not in (404, 405):
            reply = rbee_handler(request, exc)
            return await reply if inspect.isawaitable(reply) else reply
        code = ErrorCode.NOT_FOUND if status == 404 else ErrorCode.METHOD_NOT_ALLOWED
        return error_response(RbeeError(
            code, f"rbee does not serve {request.method} {request.url.path}",
            hint=f"It serves POST {PREFIX}/chat/completions, POST {PREFIX}/completions and "
            f"GET {PREFIX}/models"))

    app.add_exception_handler(StarletteHTTPException, handler)


def model_object(entry: CatalogEntry) -> dict[str, Any]:
    return {"id": entry.id, "object": "model", "created": int(entry.added_at),
            "owned_by": "rbee"}


# --------------------------------------------------------------------------- workers


class WorkerPicker:
    """Finds or starts the worker a request's model runs on."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self._locks: dict[str, asyncio.Lock] = {}

    async def worker_for(self, model: str) -> ManagedWorker:
        resolved = await self._resolve(model)
        key = resolved.id if isinstance(resolved, CatalogEntry) else resolved.reference
        # One spawn per model at a time: requests that arrive together share the new worker.
        async with self._locks.setdefault(key, asyncio.Lock()):
            worker = self._least_busy(key)
            if worker is None:
                worker = await self._spawn(model)
        return worker

    async def _resolve(self, model: str) -> CatalogEntry | Plan:
        try:
            ref = parse_model_ref(model)
        except RbeeError:
            raise await self._not_here(model) from None
        try:
            return await self.supervisor.resolve_model(model)
        except RbeeError as err:
            if err.code == ErrorCode.MODEL_NOT_FOUND and isinstance(ref, CatalogRef):
                raise await self._not_here(model) from None
            err.details.setdefault("param", "model")  # e.g. the hub's own answer, as it is
            raise

    async def _not_here(self, model: str) -> RbeeError:
        known = [e.id for e in await asyncio.to_thread(self.supervisor.catalog.list)]
        return RbeeError(
            ErrorCode.MODEL_NOT_FOUND, f"The model '{model}' does not exist on this node",
            hint=f"Models here: {', '.join(known) or 'none'} (GET {PREFIX}/models); or name "
            "one by reference, e.g. hf:org/repo",
            details={"param": "model", "model": model},
        )

    def _least_busy(self, key: str) -> ManagedWorker | None:
        candidates = [w for w in self.supervisor.workers.values()
                      if w.state in _SERVING and key in (w.model.id, w.model.reference)]
        if not candidates:
            return None
        return min(candidates, key=lambda w: (w.state == "loading",
                                              w.in_flight / max(1, w.slots_total)))

    async def _spawn(self, model: str) -> ManagedWorker:
        """A GPU when the node has one (the supervisor picks the GPU with the most free VRAM
        and offloads as many layers as fit), else, or when the model does not fit there,
        the CPU."""
        sup = self.supervisor
        if await asyncio.to_thread(resources.gpus):
            try:
                reply = await sup.spawn(SpawnRequest(model_ref=model, backend="cuda",
                                                     gpu_layers="auto"))
                return sup.get(reply.worker.id)
            except RbeeError as err:
                if err.code not in _FALLBACK_TO_CPU:
                    raise
                log.info("no room for %s on a GPU (%s); starting it on the CPU", model,
                         err.message)
        reply = await sup.spawn(SpawnRequest(model_ref=model))
        log.info("worker %s serves %s for an OpenAI request", reply.worker.id, model)
        return sup.get(reply.worker.id)


# --------------------------------------------------------------------------- requests


class OpenAIService:
    def __init__(self, supervisor: Supervisor, settings: AgentSettings) -> None:
        self.supervisor = supervisor
        self.settings = settings
        self.picker = WorkerPicker(supervisor)

    async def answer(self, request: Request, kind: Kind) -> Response:
        started = time.perf_counter()
        raw = await request.body()
        default_max = self.settings.openai_default_max_tokens
        body: ChatCompletionRequest | CompletionRequest
        if kind == "chat":
            body = parse(ChatCompletionRequest, raw)
            inference = chat_inference(body, default_max)
            given = body.max_tokens is not None or body.max_completion_tokens is not None
        else:
            body = parse(CompletionRequest, raw)
            inference = completion_inference(body, default_max)
            given = body.max_tokens is not None
        shape = _shape(request, body, kind, inference)
        return await self.complete(request, started, shape, body.model, inference, given)

    async def complete(self, request: Request, started: float, shape: Shape, model: str,
                       inference: InferenceRequest, max_tokens_given: bool) -> Response:
        worker = await self.picker.worker_for(model)
        upstream = await self._send(worker, inference, shape.request_id, max_tokens_given)
        meter = request.app.state.metrics.meter(worker.model.id, started)
        frames = stream_frames(upstream, meter)
        headers = {REQUEST_ID_HEADER: shape.request_id}
        if shape.stream:
            return SSEResponse(_openai_stream(frames, StreamTranslator(shape)), headers=headers)
        body = await until_disconnect(request, _collect(frames, ReplyCollector(shape)))
        if body is None:
            return Response(status_code=499)
        return JSONResponse(body, headers=headers)

    async def _send(self, worker: ManagedWorker, inference: InferenceRequest, request_id: str,
                    max_tokens_given: bool) -> Upstream:
        """The worker's stream; a prompt too long for the default max_tokens is sent again
        with the room the context has left (OpenAI's default is "until the context ends")."""
        upstream = await self._post(worker, inference, request_id)
        if upstream.is_event_stream:
            return upstream
        err = from_rbee_body(await read_reply(upstream), upstream.response.status)
        room = int(err.details.get("ctx_size", 0)) - int(err.details.get("prompt_tokens", 0))
        if err.code != ErrorCode.PROMPT_TOO_LONG or max_tokens_given or room < 1:
            raise err
        upstream = await self._post(worker, inference.model_copy(update={"max_tokens": room}),
                                    request_id)
        if upstream.is_event_stream:
            return upstream
        raise from_rbee_body(await read_reply(upstream), upstream.response.status)

    async def _post(self, worker: ManagedWorker, inference: InferenceRequest, request_id: str
                    ) -> Upstream:
        return await send_inference(self.supervisor, worker, inference,
                                    inference.model_dump_json().encode(), request_id)


async def _openai_stream(frames: AsyncIterator[bytes], translator: StreamTranslator
                         ) -> AsyncIterator[bytes]:
    try:
        async for batch in frames:
            out = translator.translate(batch)
            if out:
                yield out
    except RbeeError as err:  # the worker failed mid-stream: the SDK raises APIError on it
        yield b"data: " + json.dumps(openai_error(err)).encode() + b"\n\ndata: [DONE]\n\n"
    finally:
        await frames.aclose()  # type: ignore[attr-defined]


async def _collect(frames: AsyncIterator[bytes], collector: ReplyCollector) -> dict[str, Any]:
    try:
        async for batch in frames:
            collector.feed(batch)
    finally:
        await frames.aclose()  # type: ignore[attr-defined]
    return collector.body()


# --------------------------------------------------------------------------- routes


def openai_router(supervisor: Supervisor, settings: AgentSettings) -> APIRouter:
    """Mounted behind the agent's key like the other routers; OpenAIRoute answers a missing
    or wrong key in OpenAI's shape too."""
    service = OpenAIService(supervisor, settings)
    router = APIRouter(prefix=PREFIX, route_class=OpenAIRoute)

    @router.post("/chat/completions", openapi_extra=json_body(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        return await service.answer(request, "chat")

    @router.post("/completions", openapi_extra=json_body(CompletionRequest))
    async def completions(request: Request) -> Response:
        return await service.answer(request, "text")

    @router.get("/models")
    async def list_models() -> dict[str, Any]:
        entries = await asyncio.to_thread(supervisor.catalog.list)
        return {"object": "list", "data": [model_object(e) for e in entries]}

    @router.get("/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        entry = await asyncio.to_thread(supervisor.catalog.get, model)
        if entry is None:
            raise RbeeError(ErrorCode.MODEL_NOT_FOUND,
                            f"The model '{model}' does not exist on this node",
                            hint=f"GET {PREFIX}/models lists the models here",
                            details={"param": "model"})
        return model_object(entry)

    return router


def _shape(request: Request, body: ChatCompletionRequest | CompletionRequest, kind: Kind,
           inference: InferenceRequest) -> Shape:
    options = body.stream_options
    request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
    return Shape(
        kind=kind, request_id=request_id,
        completion_id=("chatcmpl-" if kind == "chat" else "cmpl-") + request_id,
        created=int(time.time()), model=body.model, stream=bool(body.stream),
        include_usage=bool(options and options.include_usage),
        logprobs=inference.top_logprobs is not None,
    )
