"""The worker's state machine: loading → idle ⇄ busy → draining → stopping (B41-B46).

It owns the engine, the slots and the in-flight generations, and is the only place that
crosses from the event loop to llama.cpp threads: work goes out through a dedicated
executor, results come back with `loop.call_soon_threadsafe`, so nothing here polls and
nothing blocks the loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from rbee_agent.broadcast import Broadcast
from rbee_agent.protocol import (
    DoneEvent,
    ErrorCode,
    InferenceRequest,
    InferenceResult,
    LoadingProgress,
    RbeeError,
    ReadyReply,
    TokenEvent,
    WorkerReadyCallback,
    WorkerState,
)
from rbee_agent.worker.engine import Engine, Generation
from rbee_agent.worker.slots import SlotPool

log = logging.getLogger("rbee.worker")

StreamItem = TokenEvent | DoneEvent | RbeeError


@dataclass(frozen=True)
class WorkerSettings:
    worker_id: str
    model_path: Path
    port: int
    api_key: str
    host: str = "127.0.0.1"
    callback_url: str | None = None
    backend: str = "cpu"
    device: int = 0
    ctx_size: int = 2048
    threads: int | None = None
    slots: int = 1
    drain_timeout_s: float = 30.0
    max_request_bytes: int = 4 * 1024 * 1024
    callback_attempts: int = 6
    callback_backoff_s: float = 0.1

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


class WorkerService:
    def __init__(self, settings: WorkerSettings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.slots = SlotPool(settings.slots)
        self.state: WorkerState = "loading"
        self.layers_loaded = 0
        self.load_error: RbeeError | None = None
        self.load_ms = 0.0
        self.tokens_served = 0
        self.started_at = time.time()
        self.last_activity = time.time()
        self.exit_code = 0
        self.exit_requested = asyncio.Event()
        self._active: dict[str, Generation] = {}
        self._none_active = asyncio.Event()
        self._none_active.set()
        self.progress: Broadcast[LoadingProgress] = Broadcast(
            LoadingProgress(stage="loading", layers_loaded=0, layers_total=engine.layers_total),
            lambda event: event.stage != "loading",
        )
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="llama-misc")
        # One thread per slot, for good: llama.cpp (OpenMP) keeps a thread pool per calling
        # OS thread, and a generation that lands on a second thread doubles the spinning
        # pools and halves the speed on a small node (seen: 155 -> 60-90 tokens/s).
        self.slot_executors = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-slot{i}")
            for i in range(settings.slots)
        ]
        self._abort_load = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ loading

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._spawn(self._load())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _load(self) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        log.info(
            "loading %s (%d layers, backend %s, device %d, %d slot(s))",
            self.settings.model_path, self.engine.layers_total, self.settings.backend,
            self.settings.device, self.settings.slots,
        )
        def on_layers(layers: int) -> None:
            loop.call_soon_threadsafe(self._set_layers, layers)

        try:
            await loop.run_in_executor(
                self._executor, self.engine.load, on_layers, self._abort_load.is_set
            )
        except RbeeError as err:
            self._fail_load(err)
            return
        except Exception as exc:  # llama.cpp surprises must still end in a clear state
            self._fail_load(RbeeError(ErrorCode.MODEL_LOAD_FAILED, f"Loading failed: {exc}"))
            return
        self.load_ms = (time.perf_counter() - started) * 1000
        if self.state != "loading":  # shutdown arrived while loading
            return
        self.state = "idle"
        self.last_activity = time.time()
        log.info("ready in %.0f ms at %s", self.load_ms, self.settings.url)
        self._publish(LoadingProgress(
            stage="ready", layers_loaded=self.engine.layers_total,
            layers_total=self.engine.layers_total,
        ))
        if self.settings.callback_url:
            await self._send_ready_callback()

    def _set_layers(self, layers: int) -> None:
        self.layers_loaded = layers
        self._publish(LoadingProgress(
            stage="loading", layers_loaded=layers, layers_total=self.engine.layers_total
        ))

    def _fail_load(self, err: RbeeError) -> None:
        self.state = "failed"
        self.load_error = err
        # One clear line for whoever reads our stderr (the agent keeps the last lines, B32).
        log.error("%s", err.message)
        self._publish(LoadingProgress(
            stage="failed", layers_loaded=self.layers_loaded,
            layers_total=self.engine.layers_total, error=err.to_body().error,
        ))
        self.exit_code = 1
        self.exit_requested.set()

    def _publish(self, event: LoadingProgress) -> None:
        self.progress.publish(event)

    def ready_reply(self) -> ReadyReply:
        loaded = self.state in ("idle", "busy", "draining")
        return ReadyReply(
            ready=self.state in ("idle", "busy"),
            state=self.state,
            model_loaded=loaded,
            progress_url="/v1/loading/progress" if self.state == "loading" else None,
            error=self.load_error.to_body().error if self.load_error else None,
        )

    async def _send_ready_callback(self) -> None:
        assert self.settings.callback_url is not None
        body = WorkerReadyCallback(
            worker_id=self.settings.worker_id,
            url=self.settings.url,
            model=str(self.settings.model_path),
            backend=self.settings.backend,
            device=self.settings.device,
            pid=os.getpid(),
            slots=self.settings.slots,
            layers_total=self.engine.layers_total,
            load_ms=round(self.load_ms, 1),
        )
        headers = {"Authorization": f"Bearer {self.settings.api_key}"}
        delay = self.settings.callback_backoff_s
        async with httpx.AsyncClient(timeout=5.0) as client:
            for attempt in range(1, self.settings.callback_attempts + 1):
                try:
                    reply = await client.post(
                        self.settings.callback_url, content=body.model_dump_json(),
                        headers={**headers, "content-type": "application/json"},
                    )
                    if reply.status_code < 300:
                        log.info("ready callback accepted by %s", self.settings.callback_url)
                        return
                    log.warning("ready callback attempt %d: HTTP %d", attempt, reply.status_code)
                except httpx.HTTPError as exc:
                    log.warning("ready callback attempt %d failed: %s", attempt, exc)
                if attempt < self.settings.callback_attempts:
                    await asyncio.sleep(delay)
                    delay *= 2
        log.error("ready callback to %s failed after %d attempts; serving anyway",
                  self.settings.callback_url, self.settings.callback_attempts)

    # ------------------------------------------------------------------ inference

    def _check_accepting(self) -> None:
        if self.state == "loading":
            raise RbeeError(
                ErrorCode.MODEL_LOADING,
                f"Worker {self.settings.worker_id} is still loading its model "
                f"(layer {self.layers_loaded} of {self.engine.layers_total})",
                hint="Wait for GET /v1/ready, or follow GET /v1/loading/progress.",
                details={"layers_loaded": self.layers_loaded,
                         "layers_total": self.engine.layers_total},
            )
        if self.state == "failed":
            raise RbeeError(
                ErrorCode.MODEL_LOAD_FAILED,
                self.load_error.message if self.load_error else "The model failed to load",
            )
        if self.state in ("draining", "stopping"):
            raise RbeeError(
                ErrorCode.WORKER_DRAINING,
                f"Worker {self.settings.worker_id} is shutting down and takes no new requests",
                hint="Send the request to another worker, or spawn a new one.",
            )

    async def begin(self, request: InferenceRequest, request_id: str | None) -> InferenceRun:
        """Admit a request: take a slot, tokenize, start the generation thread."""
        self._check_accepting()
        rid = request_id or request.request_id or uuid.uuid4().hex
        if rid in self._active:
            raise RbeeError(ErrorCode.INVALID_REQUEST, f"Request id {rid} is already running")
        slot = self.slots.acquire()
        try:
            loop = asyncio.get_running_loop()
            tokens = await loop.run_in_executor(
                self._executor, self.engine.prompt_tokens, slot, request
            )
        except BaseException:
            self.slots.release(slot)
            raise
        generation = Generation(rid, threading.Event(), time.perf_counter())
        self._active[rid] = generation
        self._none_active.clear()
        self._refresh_state()
        return InferenceRun(self, slot, tokens, request, generation)

    def _finished(self, run: InferenceRun) -> None:
        self._active.pop(run.generation.request_id, None)
        if not self._active:
            self._none_active.set()
        self.slots.release(run.slot)
        self.tokens_served += run.generation.produced
        self.last_activity = time.time()
        self._refresh_state()

    def _refresh_state(self) -> None:
        if self.state in ("idle", "busy"):
            self.state = "busy" if self._active else "idle"

    def cancel(self, request_id: str) -> bool:
        generation = self._active.get(request_id)
        if generation is None:
            return False
        generation.cancel.set()
        log.info("request %s cancelled", request_id)
        return True

    @property
    def active_requests(self) -> int:
        return len(self._active)

    # ------------------------------------------------------------------ shutdown

    def request_shutdown(self) -> None:
        """Start draining (idempotent): finish what runs, refuse the rest, then exit 0."""
        if self._drain_task is not None:
            return
        log.info("shutdown requested: draining %d active request(s)", len(self._active))
        was_loading = self.state == "loading"
        self.state = "draining"
        if was_loading:
            self._abort_load.set()
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            await asyncio.wait_for(self._none_active.wait(), self.settings.drain_timeout_s)
        except TimeoutError:
            log.warning("drain timeout: cancelling %d request(s)", len(self._active))
            for generation in list(self._active.values()):
                generation.cancel.set()
            await self._none_active.wait()
        self.state = "stopping"
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.engine.close)
        self._executor.shutdown(wait=False)
        for executor in self.slot_executors:
            executor.shutdown(wait=False)
        log.info("model unloaded; exiting")
        self.exit_requested.set()


class InferenceRun:
    """One admitted request: the generation thread and the queue its tokens arrive on."""

    def __init__(
        self,
        service: WorkerService,
        slot: int,
        prompt_tokens: list[int],
        request: InferenceRequest,
        generation: Generation,
    ) -> None:
        self.service = service
        self.slot = slot
        self.request = request
        self.generation = generation
        self._queue: asyncio.Queue[StreamItem] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        put = self._queue.put_nowait

        def emit(item: StreamItem) -> None:
            loop.call_soon_threadsafe(put, item)

        def run() -> None:
            try:
                service.engine.generate(slot, prompt_tokens, request, generation, emit)
            except Exception as exc:
                log.exception("generation %s failed", generation.request_id)
                emit(RbeeError(ErrorCode.GENERATION_FAILED, f"Generation failed: {exc}"))

        self._future = loop.run_in_executor(service.slot_executors[slot], run)
        # The slot is free only once the thread has really let go of the context.
        self._future.add_done_callback(lambda _f: service._finished(self))

    @property
    def request_id(self) -> str:
        return self.generation.request_id

    async def events(self) -> AsyncIterator[StreamItem]:
        """Tokens as they come, ending with a DoneEvent or an RbeeError.

        Leaving early (client gone, task cancelled) cancels the generation.
        """
        try:
            while True:
                item = await self._queue.get()
                if not isinstance(item, TokenEvent):
                    # Let the thread finish first: the slot must be free before the client
                    # sees the end, or a request sent right after it would find it busy.
                    await asyncio.shield(self._future)
                    yield item
                    return
                yield item
        finally:
            self.generation.cancel.set()

    async def collect(self) -> InferenceResult:
        parts: list[str] = []
        async for item in self.events():
            if isinstance(item, TokenEvent):
                parts.append(item.token)
            elif isinstance(item, RbeeError):
                raise item
            else:
                return InferenceResult(
                    request_id=item.request_id, text="".join(parts),
                    total_tokens=item.total_tokens, duration_ms=item.duration_ms,
                    finish_reason=item.finish_reason, prompt_tokens=item.prompt_tokens,
                )
        raise RbeeError(ErrorCode.GENERATION_FAILED, "The generation ended without a result")
