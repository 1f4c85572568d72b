"""The worker's state machine: loading → idle ⇄ busy → draining → stopping (B41-B46).

It owns the engine, the slots and their queue (admission.py) and the requests in flight, and
is the only place that crosses from the event loop to llama.cpp's threads: loading and
prompt preparation run in executors, admitted jobs go to the engine thread's inbox, and the
engine's events come back in one `loop.call_soon_threadsafe` per step. Nothing here polls
and nothing blocks the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
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
    REQUEST_ID_PATTERN,
    DoneEvent,
    ErrorCode,
    InferenceRequest,
    InferenceResult,
    LoadingProgress,
    QueuedEvent,
    RbeeError,
    ReadyReply,
    TokenEvent,
    WorkerReadyCallback,
    WorkerState,
)
from rbee_agent.worker.admission import Admission, Ticket
from rbee_agent.worker.engine import Engine
from rbee_agent.worker.scheduler import Job, StreamItem

log = logging.getLogger("rbee.worker")

RunItem = QueuedEvent | StreamItem
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)


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
    queue_depth: int = 64
    queue_timeout_s: float = 300.0
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
        self.admission = Admission(settings.slots, settings.queue_depth)
        self.state: WorkerState = "loading"
        self.layers_loaded = 0
        self.load_error: RbeeError | None = None
        self.load_ms = 0.0
        self.tokens_served = 0
        self.started_at = time.time()
        self.last_activity = time.time()
        self.exit_code = 0
        self.exit_requested = asyncio.Event()
        self._runs: dict[str, InferenceRun] = {}  # queued and running, by request id
        self._by_job: dict[Job, InferenceRun] = {}
        self._none_active = asyncio.Event()
        self._none_active.set()
        self._mean_run_s = 1.0  # moving average of request durations, for Retry-After
        self.progress: Broadcast[LoadingProgress] = Broadcast(
            LoadingProgress(stage="loading", layers_loaded=0, layers_total=engine.layers_total),
            lambda event: event.stage != "loading",
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-load")
        # Prompts are rendered and tokenized here, one at a time, beside the engine thread.
        self._prepare = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-prepare")
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
            "loading %s (%d layers, %d on the GPU, backend %s, device %d, %d slot(s), "
            "queue %d)", self.settings.model_path, self.engine.layers_total,
            self.engine.gpu_layers, self.settings.backend, self.settings.device,
            self.settings.slots, self.settings.queue_depth,
        )

        def on_layers(layers: int) -> None:
            try:
                loop.call_soon_threadsafe(self._set_layers, layers)
            except RuntimeError:  # the loop has closed (the server never bound its port):
                self._abort_load.set()  # stop loading quietly, keep stderr's real reason

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
        self.engine.start(self._from_engine)
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
            queued=self.admission.queued if loaded else None,
            queue_depth=self.settings.queue_depth if loaded else None,
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
            gpu_layers=self.engine.gpu_layers,
            tensor_split=list(self.engine.config.tensor_split)
            if self.engine.config.tensor_split else None,
            queue_depth=self.settings.queue_depth,
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
            raise self._draining()

    def _draining(self) -> RbeeError:
        return RbeeError(
            ErrorCode.WORKER_DRAINING,
            f"Worker {self.settings.worker_id} is shutting down and takes no new requests",
            hint="Send the request to another worker, or spawn a new one.",
        )

    def retry_after_s(self) -> int:
        """A client's fair wait before trying again: the queue ahead, served `slots` at a
        time, at the recent mean request duration (1-60 s)."""
        waves = 1 + self.admission.queued / self.admission.total
        return max(1, min(60, math.ceil(self._mean_run_s * waves)))

    def _slot_details(self) -> dict[str, Any]:
        return {"slots_total": self.admission.total, "slots_busy": self.admission.busy,
                "queued": self.admission.queued, "queue_depth": self.settings.queue_depth,
                "retry_after_s": self.retry_after_s()}

    def _queue_full(self) -> RbeeError:
        return RbeeError(
            ErrorCode.QUEUE_FULL,
            f"All {self.admission.total} slot(s) of worker {self.settings.worker_id} are busy "
            f"and its queue of {self.settings.queue_depth} is full",
            hint=f"Retry in {self.retry_after_s()} s, or spawn another worker for this model.",
            details=self._slot_details(),
        )

    def _queue_timeout(self) -> RbeeError:
        return RbeeError(
            ErrorCode.ALL_SLOTS_BUSY,
            f"All {self.admission.total} slot(s) of worker {self.settings.worker_id} stayed "
            f"busy for {self.settings.queue_timeout_s:g} s while this request waited in the "
            "queue",
            hint=f"Retry in {self.retry_after_s()} s, or spawn another worker for this model.",
            details=self._slot_details(),
        )

    async def begin(self, request: InferenceRequest, request_id: str | None) -> InferenceRun:
        """Admit a request: cheap checks, then its prompt tokens (off the loop), then a slot
        or a place in the queue. Nothing costly happens before a refusal (B106)."""
        started = time.perf_counter()
        self._check_accepting()
        if request_id is not None and not _REQUEST_ID.match(request_id):
            raise RbeeError(
                ErrorCode.INVALID_REQUEST,
                "Invalid request: X-Request-Id: use 1-128 letters, digits or ._:@+=~-",
                details={"pattern": REQUEST_ID_PATTERN},
            )
        rid = request_id or request.request_id or uuid.uuid4().hex
        if rid in self._runs:
            raise RbeeError(ErrorCode.INVALID_REQUEST, f"Request id {rid} is already running")
        if self.admission.full:
            raise self._queue_full()
        loop = asyncio.get_running_loop()
        tokens = await loop.run_in_executor(self._prepare, self.engine.prepare, request)
        self._check_accepting()
        if rid in self._runs:
            raise RbeeError(ErrorCode.INVALID_REQUEST, f"Request id {rid} is already running")
        if self.admission.full:
            raise self._queue_full()
        run = InferenceRun(self, Job(rid, request, tokens, started=started))
        self._runs[rid] = run
        self._by_job[run.job] = run
        self._none_active.clear()
        if not self.admission.enter(run.ticket):
            run.timer = loop.call_later(self.settings.queue_timeout_s, self._expire, run)
            log.info("request %s queued (%d ahead)", rid, run.ticket.position)
        run.ticket.granted.add_done_callback(lambda _f: self._launch(run))
        self._refresh_state()
        return run

    def _launch(self, run: InferenceRun) -> None:
        if run.timer is not None:
            run.timer.cancel()
        if not run.ended:
            self.engine.submit(run.job)

    def _expire(self, run: InferenceRun) -> None:
        if self.admission.leave(run.ticket):
            log.info("request %s left the queue after %.0f s", run.request_id,
                     self.settings.queue_timeout_s)
            self._end(run, self._queue_timeout())

    def _from_engine(self, items: list[tuple[Job, StreamItem]]) -> None:
        """Engine thread → loop, once per step."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
                loop.call_soon_threadsafe(self._deliver, items)

    def _deliver(self, items: list[tuple[Job, StreamItem]]) -> None:
        for job, item in items:
            run = self._by_job.get(job)
            if run is None:
                continue
            if isinstance(item, TokenEvent):
                run.put(item)
                continue
            # The engine has freed the slot: give it to the next in line before the client
            # can see the end, so a request sent right after it never finds the slot taken.
            self.admission.release()
            self.tokens_served += job.produced
            took = time.perf_counter() - job.started
            self._mean_run_s = 0.8 * self._mean_run_s + 0.2 * took
            self._end(run, item)

    def _end(self, run: InferenceRun, item: StreamItem) -> None:
        """A run's last item: forget it, then hand the item over."""
        run.ended = True
        if run.timer is not None:
            run.timer.cancel()
        self._runs.pop(run.request_id, None)
        self._by_job.pop(run.job, None)
        if not self._runs:
            self._none_active.set()
        self.last_activity = time.time()
        self._refresh_state()
        run.put(item)

    def _refresh_state(self) -> None:
        if self.state in ("idle", "busy"):
            self.state = "busy" if self._runs else "idle"

    def cancel(self, request_id: str) -> bool:
        run = self._runs.get(request_id)
        if run is None:
            return False
        run.cancel()
        log.info("request %s cancelled", request_id)
        return True

    def _cancel_run(self, run: InferenceRun) -> None:
        if run.ended:
            return
        if self.admission.leave(run.ticket):
            self._end(run, DoneEvent(
                total_tokens=0, finish_reason="cancelled", request_id=run.request_id,
                duration_ms=round((time.perf_counter() - run.job.started) * 1000, 2),
                prompt_tokens=len(run.job.prompt),
            ))
        else:
            run.job.cancelled = True  # the engine ends it within a step

    @property
    def active_requests(self) -> int:
        return len(self._runs)

    # ------------------------------------------------------------------ shutdown

    def request_shutdown(self) -> None:
        """Start draining (idempotent): refuse new and queued requests, finish what runs,
        then exit 0."""
        if self._drain_task is not None:
            return
        was_loading = self.state == "loading"
        self.state = "draining"
        for ticket in self.admission.drain():
            run = next((r for r in self._runs.values() if r.ticket is ticket), None)
            if run is not None:
                self._end(run, self._draining())
        log.info("shutdown requested: draining %d active request(s)", len(self._runs))
        if was_loading:
            self._abort_load.set()
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            await asyncio.wait_for(self._none_active.wait(), self.settings.drain_timeout_s)
        except TimeoutError:
            log.warning("drain timeout: cancelling %d request(s)", len(self._runs))
            for run in list(self._runs.values()):
                run.job.cancelled = True
            await self._none_active.wait()
        self.state = "stopping"
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.engine.close)
        self._executor.shutdown(wait=False)
        self._prepare.shutdown(wait=False)
        log.info("model unloaded; exiting")
        self.exit_requested.set()


class InferenceRun:
    """One admitted request as its HTTP handler sees it: a queue of items that ends with a
    DoneEvent or an RbeeError, with `{"queued": N}` events first while it waits."""

    def __init__(self, service: WorkerService, job: Job) -> None:
        self.service = service
        self.job = job
        self.ticket = Ticket(self._queued)
        self.timer: asyncio.TimerHandle | None = None
        self.ended = False
        self._items: asyncio.Queue[RunItem] = asyncio.Queue()

    @property
    def request_id(self) -> str:
        return self.job.request_id

    @property
    def request(self) -> InferenceRequest:
        return self.job.request

    def _queued(self, position: int) -> None:
        self._items.put_nowait(QueuedEvent(queued=position))

    def put(self, item: RunItem) -> None:
        self._items.put_nowait(item)

    def cancel(self) -> None:
        self.service._cancel_run(self)

    async def events(self) -> AsyncIterator[RunItem]:
        """Queue positions, tokens, then the DoneEvent or RbeeError. Leaving early (the
        client went away, the task was cancelled) cancels the request, queued or running."""
        try:
            while True:
                item = await self._items.get()
                yield item
                if isinstance(item, DoneEvent | RbeeError):
                    return
        finally:
            self.cancel()

    async def collect(self) -> InferenceResult:
        parts: list[str] = []
        async for item in self.events():
            if isinstance(item, TokenEvent):
                parts.append(item.token)
            elif isinstance(item, RbeeError):
                raise item
            elif isinstance(item, DoneEvent):
                return InferenceResult(
                    request_id=item.request_id, text="".join(parts),
                    total_tokens=item.total_tokens, duration_ms=item.duration_ms,
                    finish_reason=item.finish_reason, prompt_tokens=item.prompt_tokens,
                )
        raise RbeeError(ErrorCode.GENERATION_FAILED, "The generation ended without a result")
