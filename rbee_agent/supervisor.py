"""Worker processes: spawn, follow start-up, health-check, idle-time-out, stop (B24-B32).

The supervisor is the agent's only owner of worker processes. Each worker is a child
process (`python -m rbee_agent.worker`) with its own API key, its output piped into a
rotated per-worker log, and three watchers: process exit (noticed the moment it happens),
start-up progress (relayed from the worker's own SSE), and the shared health and idle loops.

A worker for an `hf:` model the node does not have yet starts (or joins) its download
first: it is listed as `loading` from the start, its progress stream carries the download
stage, and the process is launched once the model is in the catalog (B37).

It never blocks the event loop: processes are asyncio subprocesses, HTTP is httpx async,
and catalog or resource calls that touch the disk run in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import logging.handlers
import os
import secrets
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import httpx

from rbee_agent import resources
from rbee_agent.auth import new_api_key
from rbee_agent.broadcast import Broadcast
from rbee_agent.catalog import Catalog, derive_id
from rbee_agent.downloads import Download, DownloadManager
from rbee_agent.model_refs import CatalogRef, FileRef, HfRef, parse_model_ref
from rbee_agent.protocol import (
    BACKENDS,
    CatalogEntry,
    DownloadProgress,
    ErrorCode,
    LoadingProgress,
    RbeeError,
    SpawnReply,
    SpawnRequest,
    WorkerInfo,
    WorkerReadyCallback,
    WorkerState,
)
from rbee_agent.provision import Plan
from rbee_agent.settings import AgentSettings

log = logging.getLogger("rbee.agent")

_ADDRESS_IN_USE = "address already in use"
_PORT_RETRIES = 5


class ManagedWorker:
    """What the agent knows about one worker process."""

    def __init__(
        self,
        worker_id: str,
        model: CatalogEntry,
        request: SpawnRequest,
        ctx_size: int,
        slots: int,
        log_path: Path,
        lines_kept: int,
    ) -> None:
        self.id = worker_id
        self.model = model
        self.backend = request.backend
        self.device = request.device
        self.ctx_size = ctx_size
        self.slots_total = slots
        self.slots_busy = 0
        self.api_key = new_api_key()
        self.port = 0
        self.host = "127.0.0.1"
        self.proc: asyncio.subprocess.Process | None = None
        self.state: WorkerState = "loading"
        self.started_at = time.time()
        self.last_activity = time.time()
        self.tokens_served = 0
        self.active_requests = 0
        self.health_failures = 0
        self.exit_code: int | None = None
        self.port_retries = 0
        self.failure: RbeeError | None = None
        self.log_path = log_path
        self.recent_lines: deque[str] = deque(maxlen=lines_kept)
        self.ready = asyncio.Event()
        self.exited = asyncio.Event()
        self.progress: Broadcast[LoadingProgress] = Broadcast(
            LoadingProgress(stage="starting", layers_loaded=0, layers_total=model.layers),
            lambda e: e.stage in ("ready", "failed"),
        )
        self.tasks: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def matches(self, model_id: str, backend: str, device: int) -> bool:
        return (self.model.id, self.backend, self.device) == (model_id, backend, device)

    def begin_request(self) -> None:
        self.active_requests += 1
        self.last_activity = time.time()
        if self.state == "idle":
            self.state = "busy"

    def end_request(self) -> None:
        self.active_requests = max(0, self.active_requests - 1)
        self.last_activity = time.time()
        if self.state == "busy" and self.active_requests == 0:
            self.state = "idle"

    def info(self) -> WorkerInfo:
        rss_mb = vram_mb = None
        if self.proc is not None and self.exit_code is None:
            rss_mb = resources.process_rss_mb(self.proc.pid)
            vram_mb = resources.process_vram_mb(self.proc.pid) if self.backend == "cuda" else None
        return WorkerInfo(
            id=self.id, model_id=self.model.id, model_ref=self.model.reference,
            backend=self.backend, device=self.device, url=self.url, state=self.state,
            slots_total=self.slots_total,
            slots_available=max(0, self.slots_total - self.slots_busy),
            pid=self.pid, started_at=self.started_at, last_activity=self.last_activity,
            rss_mb=rss_mb, vram_mb=vram_mb, tokens_served=self.tokens_served,
            layers_loaded=self.progress.value.layers_loaded, layers_total=self.model.layers,
            active_requests=self.active_requests,
        )


class Supervisor:
    def __init__(self, settings: AgentSettings, catalog: Catalog) -> None:
        self.settings = settings
        self.catalog = catalog
        self.workers: dict[str, ManagedWorker] = {}
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None))
        self._ids = (f"w{n}-{secrets.token_hex(2)}" for n in itertools.count(1))
        self._tasks: set[asyncio.Task[Any]] = set()
        self._spawn_lock = asyncio.Lock()
        self._closing = False
        self._worker_log_dir = settings.log_dir / "workers"
        self.downloads = DownloadManager(settings, catalog)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._worker_log_dir.mkdir(parents=True, exist_ok=True)
        self._background(self._health_loop())
        self._background(self._idle_loop())

    def _background(
        self, coro: Coroutine[Any, Any, Any], owner: ManagedWorker | None = None
    ) -> None:
        task = asyncio.ensure_future(coro)
        tasks = owner.tasks if owner is not None else self._tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def shutdown(self) -> None:
        """Stop every worker in parallel (B31), then the loops. Safe to call twice."""
        if self._closing and not self.workers:
            return
        self._closing = True
        workers = list(self.workers.values())
        if workers:
            log.info("stopping %d worker(s)", len(workers))
        await asyncio.gather(*(self._stop(w) for w in workers), return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.downloads.close()
        await self.http.aclose()

    # ------------------------------------------------------------------ lookup

    def get(self, worker_id: str) -> ManagedWorker:
        worker = self.workers.get(worker_id)
        if worker is None:
            raise RbeeError(
                ErrorCode.WORKER_NOT_FOUND,
                f"No worker {worker_id!r} on this node",
                hint="List the node's workers with 'rbee workers list --node NAME'.",
                details={"worker_id": worker_id, "workers": sorted(self.workers)},
            )
        return worker

    def infos(self) -> list[WorkerInfo]:
        return [w.info() for w in self.workers.values()]

    def by_key(self, token: str) -> ManagedWorker | None:
        for worker in self.workers.values():
            if secrets.compare_digest(worker.api_key.encode(), token.encode()):
                return worker
        return None

    # ------------------------------------------------------------------ models

    async def resolve_model(self, model_ref: str) -> CatalogEntry | Plan:
        """The catalog entry for `model_ref`; for an `hf:` model not on the node yet, the
        plan to download it (the hub is asked; nothing is fetched yet)."""
        ref = parse_model_ref(model_ref)
        if isinstance(ref, CatalogRef):
            entry = await asyncio.to_thread(self.catalog.get, ref.name)
            if entry is None:
                raise RbeeError(
                    ErrorCode.MODEL_NOT_FOUND,
                    f"Model {ref.name!r} is not in this node's catalog",
                    hint="List known models with 'rbee models list --node NAME'.",
                    details={"model_ref": model_ref},
                )
            return entry
        if isinstance(ref, FileRef):
            found = await asyncio.to_thread(self.catalog.find_by_reference, str(ref))
            if found is not None and await asyncio.to_thread(Path(found.local_path).exists):
                return found
            return await asyncio.to_thread(
                self.catalog.register_file, Path(str(ref.path)), None, "file", str(ref)
            )
        assert isinstance(ref, HfRef)
        return await self.downloads.prepare(ref)

    def model_in_use(self, model_id: str) -> list[str]:
        return [w.id for w in self.workers.values() if w.model.id == model_id]

    # ------------------------------------------------------------------ spawn

    async def spawn(self, request: SpawnRequest) -> SpawnReply:
        """Preflight, reuse or start a worker; answers at once with state `loading` (B25).

        The model is resolved before the spawn lock is taken: for an `hf:` model that asks
        the hub, and a slow hub must not hold up spawns of models already here.
        """
        self._check_open()
        model = await self.resolve_model(request.model_ref)
        async with self._spawn_lock:
            self._check_open()
            if isinstance(model, Plan):
                return await self._spawn_after_download(request, model)
            for worker in self.workers.values():
                if worker.state == "idle" and worker.matches(model.id, request.backend,
                                                             request.device):
                    log.info("reusing idle worker %s for %s", worker.id, model.id)
                    worker.last_activity = time.time()
                    return SpawnReply(worker=worker.info(), reused=True)
            await asyncio.to_thread(self._preflight, request, model)
            worker = self._new_worker(request, model)
            await self._launch(worker)
            self.workers[worker.id] = worker
            return SpawnReply(worker=worker.info(), reused=False)

    def _check_open(self) -> None:
        if self._closing:
            raise RbeeError(ErrorCode.AGENT_SHUTTING_DOWN, "The agent is shutting down")

    def _new_worker(self, request: SpawnRequest, model: CatalogEntry) -> ManagedWorker:
        worker = ManagedWorker(
            next(self._ids), model, request,
            ctx_size=request.ctx_size or self.settings.worker_ctx_size,
            slots=request.slots or self.settings.worker_slots,
            log_path=self._worker_log_dir / "pending.log",
            lines_kept=self.settings.worker_log_lines_kept,
        )
        worker.log_path = self._worker_log_dir / f"{worker.id}.log"
        return worker

    async def _spawn_after_download(self, request: SpawnRequest, plan: Plan) -> SpawnReply:
        """A worker that starts (or joins) its model's download, then launches (B37).

        The preflight runs first, on the size the hub announced (no point fetching a model
        that cannot run here), and again before the launch, on the downloaded file.
        """
        name = plan.dest.name
        provisional = CatalogEntry(
            id=derive_id(name), provider="hf", reference=plan.reference,
            local_path=str(plan.dest), size_bytes=plan.total, quantization="unknown",
            architecture="unknown", layers=0, context_length=0, added_at=time.time(),
        )
        await asyncio.to_thread(self._preflight, request, provisional)
        job, _ = self.downloads.begin(plan)
        worker = self._new_worker(request, provisional)
        worker.progress.publish(_download_stage(job.progress.value))
        self.workers[worker.id] = worker
        self._background(self._provision_then_launch(worker, request, job), worker)
        log.info("worker %s waits for download job %s (%s)", worker.id, job.id, plan.reference)
        return SpawnReply(worker=worker.info(), reused=False)

    async def _provision_then_launch(
        self, worker: ManagedWorker, request: SpawnRequest, job: Download
    ) -> None:
        try:
            async for event in job.progress.follow():
                if event.stage == "downloading":
                    worker.progress.publish(_download_stage(event))
            model = await job.wait()
            async with self._spawn_lock:
                if worker.state != "loading" or self._closing:
                    return
                await asyncio.to_thread(self._preflight, request, model)
                worker.model = model
                worker.progress.publish(LoadingProgress(
                    stage="starting", layers_loaded=0, layers_total=model.layers))
                await self._launch(worker)
        except RbeeError as err:
            self._fail_unlaunched(worker, err)
        except OSError as exc:  # the process could not be started
            self._fail_unlaunched(worker, RbeeError(
                ErrorCode.WORKER_START_FAILED,
                f"Worker {worker.id} could not be started: {exc}",
                details={"worker_id": worker.id},
            ))

    def _fail_unlaunched(self, worker: ManagedWorker, err: RbeeError) -> None:
        """End a worker that never got a process (its download failed or it was stopped)."""
        if worker.exited.is_set():
            return
        log.warning("worker %s ends before it started: %s", worker.id, err.message)
        worker.failure = err
        worker.progress.publish(LoadingProgress(
            stage="failed", layers_loaded=0, layers_total=worker.model.layers,
            error=err.to_body().error,
        ))
        worker.state = "failed"
        self.workers.pop(worker.id, None)
        worker.exited.set()
        worker.ready.set()
        for task in list(worker.tasks):
            if task is not asyncio.current_task():
                task.cancel()

    def _preflight(self, request: SpawnRequest, model: CatalogEntry) -> None:
        if request.backend not in BACKENDS:
            raise RbeeError(
                ErrorCode.INVALID_BACKEND,
                f"Unknown backend {request.backend!r}",
                hint=f"Use one of: {', '.join(BACKENDS)}.",
                details={"backend": request.backend, "valid": list(BACKENDS)},
            )
        gpus = resources.gpus()
        available = resources.backends(len(gpus))
        if request.backend not in available:
            raise RbeeError(
                ErrorCode.BACKEND_UNAVAILABLE,
                f"Backend {request.backend} is not available on this node",
                hint=f"Available here: {', '.join(available)}.",
                details={"backend": request.backend, "available": list(available)},
            )
        need_mb = int(model.size_bytes * self.settings.ram_factor / 1024 / 1024) + 1
        if request.backend == "cpu":
            if request.device != 0:
                raise RbeeError(
                    ErrorCode.DEVICE_NOT_FOUND,
                    f"The cpu backend has only device 0, not {request.device}",
                    hint="Leave --device out for cpu workers.",
                    details={"device": request.device, "devices": [0]},
                )
            have_mb = resources.ram_available_mb()
            if need_mb > have_mb:
                raise RbeeError(
                    ErrorCode.INSUFFICIENT_RAM,
                    f"Model {model.id} needs about {need_mb} MB of RAM; {have_mb} MB is free",
                    hint="Stop other workers or pick a smaller model.",
                    details={"required_mb": need_mb, "available_mb": have_mb},
                )
            return
        if request.backend == "cuda":
            devices = [g.index for g in gpus]
            gpu = next((g for g in gpus if g.index == request.device), None)
            if gpu is None:
                raise RbeeError(
                    ErrorCode.DEVICE_NOT_FOUND,
                    f"No CUDA device {request.device} on this node",
                    hint=f"Devices here: {', '.join(map(str, devices)) or 'none'}.",
                    details={"device": request.device, "devices": devices},
                )
            free = gpu.vram_free_mb
            if free is not None and need_mb > free:
                raise RbeeError(
                    ErrorCode.INSUFFICIENT_VRAM,
                    f"Model {model.id} needs about {need_mb} MB of VRAM; GPU {gpu.index} "
                    f"({gpu.name}) has {free} MB free",
                    hint="Stop workers on that GPU, pick another --device, or a smaller model.",
                    details={"required_mb": need_mb, "available_mb": free, "device": gpu.index},
                )

    def _free_port(self, skip: set[int]) -> int:
        used = {w.port for w in self.workers.values()} | skip
        for port in range(self.settings.worker_port_min, self.settings.worker_port_max + 1):
            if port in used:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
        raise RbeeError(
            ErrorCode.NO_FREE_PORT,
            f"No free port in {self.settings.worker_port_min}-{self.settings.worker_port_max}",
            hint="Stop idle workers or widen worker_port_min/worker_port_max.",
        )

    async def _launch(self, worker: ManagedWorker, skip_ports: set[int] | None = None) -> None:
        worker.port = self._free_port(skip_ports or set())
        cmd = [
            sys.executable, "-m", "rbee_agent.worker",
            "--worker-id", worker.id, "--model", worker.model.local_path,
            "--port", str(worker.port), "--host", worker.host,
            "--backend", worker.backend, "--device", str(worker.device),
            "--ctx-size", str(worker.ctx_size), "--slots", str(worker.slots_total),
            "--callback-url", f"{self.settings.url}/v1/workers/ready",
            "--drain-timeout", str(self.settings.stop_grace_s),
            "--parent-pid", str(os.getpid()),
        ]
        if self.settings.worker_threads:
            cmd += ["--threads", str(self.settings.worker_threads)]
        env = {**os.environ, "RBEE_WORKER_API_KEY": worker.api_key, "PYTHONUNBUFFERED": "1"}
        worker.proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True,
        )
        log.info("spawned worker %s (pid %d) for %s on port %d", worker.id, worker.proc.pid,
                 worker.model.id, worker.port)
        self._background(self._pump_output(worker, worker.proc), worker)
        self._background(self._watch_exit(worker, worker.proc), worker)
        self._background(self._follow_start(worker, worker.proc), worker)

    # ------------------------------------------------------------------ watchers

    async def _pump_output(self, worker: ManagedWorker, proc: asyncio.subprocess.Process) -> None:
        """Copy the worker's output into its rotated log, keeping the last lines at hand."""
        handler = logging.handlers.RotatingFileHandler(
            worker.log_path, maxBytes=self.settings.log_max_bytes,
            backupCount=self.settings.log_backups, encoding="utf-8",
        )
        handler.setFormatter(logging.Formatter("%(message)s"))
        sink = logging.getLogger(f"rbee.worker-output.{worker.id}")
        sink.propagate = False
        sink.addHandler(handler)
        sink.setLevel(logging.INFO)
        assert proc.stdout is not None
        try:
            async for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                worker.recent_lines.append(line)
                sink.info(line)
        finally:
            sink.removeHandler(handler)
            handler.close()

    async def _watch_exit(self, worker: ManagedWorker, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        await asyncio.sleep(0)  # let the output pump take the last lines
        if worker.proc is not proc:
            return
        tail = list(worker.recent_lines)[-10:]
        if (worker.state == "loading" and code != 0
                and any(_ADDRESS_IN_USE in line.lower() for line in tail)
                and worker.port_retries < _PORT_RETRIES):
            worker.port_retries += 1
            log.warning("worker %s: port %d was taken; trying the next port", worker.id,
                        worker.port)
            await self._launch(worker, skip_ports={worker.port})
            return
        worker.exit_code = code
        expected = worker.state in ("stopping", "draining")
        level = logging.INFO if expected and code == 0 else logging.WARNING
        log.log(level, "worker %s (pid %d) exited with code %s%s", worker.id, proc.pid, code,
                "" if expected else "; last lines:\n  " + "\n  ".join(tail))
        if worker.state == "loading":
            worker.failure = RbeeError(
                ErrorCode.WORKER_START_FAILED,
                f"Worker {worker.id} for {worker.model.id} exited with code {code} while "
                f"starting: {tail[-1] if tail else 'no output'}",
                hint="See the worker log: rbee logs --node NAME --worker " + worker.id,
                details={"exit_code": code, "last_lines": tail, "worker_id": worker.id},
            )
            worker.progress.publish(LoadingProgress(
                stage="failed", layers_loaded=worker.progress.value.layers_loaded,
                layers_total=worker.model.layers, error=worker.failure.to_body().error,
            ))
        worker.state = "failed" if not expected else worker.state
        self.workers.pop(worker.id, None)
        worker.exited.set()
        worker.ready.set()
        for task in list(worker.tasks):
            if task is not asyncio.current_task():
                task.cancel()

    async def _follow_start(self, worker: ManagedWorker, proc: asyncio.subprocess.Process) -> None:
        """Relay the worker's loading progress until it is ready, failed, or too slow."""
        deadline = time.monotonic() + self.settings.start_timeout_s
        try:
            async with asyncio.timeout(self.settings.start_timeout_s):
                while proc.returncode is None:
                    try:
                        await self._relay_progress(worker)
                        if worker.state != "loading":
                            return
                    except httpx.TransportError:
                        await asyncio.sleep(0.05)
        except TimeoutError:
            if worker.state != "loading" or time.monotonic() < deadline - 1:
                return
            layer = worker.progress.value.layers_loaded
            worker.failure = RbeeError(
                ErrorCode.LOADING_TIMEOUT,
                f"Worker {worker.id} did not finish loading {worker.model.id} within "
                f"{self.settings.start_timeout_s:g} s (stuck at layer {layer} of "
                f"{worker.model.layers})",
                hint="The node may be out of memory or swapping; see its worker log.",
                details={"layers_loaded": layer, "layers_total": worker.model.layers},
            )
            log.error("%s", worker.failure.message)
            worker.progress.publish(LoadingProgress(
                stage="failed", layers_loaded=layer, layers_total=worker.model.layers,
                error=worker.failure.to_body().error,
            ))
            worker.state = "stopping"
            worker.ready.set()
            self._kill(worker)

    async def _relay_progress(self, worker: ManagedWorker) -> None:
        async with self.http.stream("GET", f"{worker.url}/v1/loading/progress",
                                    headers=worker.auth) as reply:
            if reply.status_code != 200:
                raise httpx.TransportError(f"progress answered {reply.status_code}")
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = LoadingProgress.model_validate_json(line[len("data: "):])
                if event.stage == "ready":
                    self._mark_ready(worker)
                    return
                if event.stage == "loading":
                    worker.progress.publish(event)

    def _mark_ready(self, worker: ManagedWorker) -> None:
        if worker.state != "loading":
            return
        worker.state = "idle"
        worker.last_activity = time.time()
        worker.progress.publish(LoadingProgress(
            stage="ready", layers_loaded=worker.model.layers, layers_total=worker.model.layers
        ))
        worker.ready.set()
        log.info("worker %s is ready at %s", worker.id, worker.url)

    def ready_callback(self, worker: ManagedWorker, body: WorkerReadyCallback) -> None:
        """B27: the worker says it is ready, authenticated with its own key."""
        if body.worker_id != worker.id:
            raise RbeeError(ErrorCode.INVALID_REQUEST,
                            f"Callback for {body.worker_id} came with worker {worker.id}'s key")
        self._mark_ready(worker)

    async def wait_ready(self, worker: ManagedWorker) -> WorkerInfo:
        """Until the worker is ready (its own start-up timeout bounds this), or its error."""
        await worker.ready.wait()
        if worker.failure is not None:
            raise worker.failure
        return worker.info()

    async def follow_progress(self, worker: ManagedWorker) -> AsyncIterator[LoadingProgress]:
        async for event in worker.progress.follow():
            yield event

    # ------------------------------------------------------------------ health and idle

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            checks = [self._check_health(w) for w in list(self.workers.values())
                      if w.state in ("idle", "busy")]
            await asyncio.gather(*checks, return_exceptions=True)

    async def _check_health(self, worker: ManagedWorker) -> None:
        try:
            reply = await self.http.get(f"{worker.url}/v1/health",
                                        timeout=self.settings.health_timeout_s)
            body = reply.json()
            worker.slots_busy = int(body.get("slots_busy", 0))
            worker.tokens_served = int(body.get("tokens_served", worker.tokens_served))
            worker.health_failures = 0
        except (httpx.HTTPError, ValueError) as exc:
            worker.health_failures += 1
            log.warning("worker %s failed health check %d/%d: %s", worker.id,
                        worker.health_failures, self.settings.health_failures,
                        type(exc).__name__)
            if worker.health_failures >= self.settings.health_failures:
                log.error("worker %s failed %d health checks in a row; killing it", worker.id,
                          worker.health_failures)
                worker.state = "stopping"
                self._kill(worker)

    async def _idle_loop(self) -> None:
        while True:
            await asyncio.sleep(min(self.settings.idle_check_s, self.settings.idle_timeout_s))
            now = time.time()
            for worker in list(self.workers.values()):
                idle_for = now - worker.last_activity
                if (worker.state == "idle" and worker.active_requests == 0
                        and idle_for >= self.settings.idle_timeout_s):
                    log.info("worker %s idle for %.0f s; stopping it", worker.id, idle_for)
                    self._background(self._stop(worker))

    # ------------------------------------------------------------------ stop

    async def stop(self, worker_id: str) -> WorkerInfo:
        worker = self.get(worker_id)
        await self._stop(worker)
        return worker.info()

    async def _stop(self, worker: ManagedWorker) -> None:
        """Graceful: ask the worker to drain; kill it if it is not gone after the grace."""
        if worker.proc is None and not worker.exited.is_set():  # still waiting for its model
            self._fail_unlaunched(worker, RbeeError(
                ErrorCode.CANCELLED,
                f"Worker {worker.id} was stopped before its model finished downloading",
                hint="The download goes on; cancel it with its job id if it is not wanted.",
                details={"worker_id": worker.id},
            ))
            return
        if worker.proc is None or worker.exited.is_set():
            return
        was_loading = worker.state == "loading"
        worker.state = "stopping"
        if was_loading:
            worker.proc.send_signal(signal.SIGTERM)
        else:
            with contextlib.suppress(httpx.HTTPError):
                await self.http.post(f"{worker.url}/v1/admin/shutdown", headers=worker.auth,
                                     timeout=self.settings.health_timeout_s)
        try:
            await asyncio.wait_for(worker.exited.wait(), self.settings.stop_grace_s + 1)
        except TimeoutError:
            log.warning("worker %s did not stop within %.0f s; killing it", worker.id,
                        self.settings.stop_grace_s)
            self._kill(worker)
            await worker.exited.wait()

    def _kill(self, worker: ManagedWorker) -> None:
        if worker.proc is not None and worker.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.proc.kill()


def _download_stage(event: DownloadProgress) -> LoadingProgress:
    """A download event as a worker's start-up progress (B37): bytes, no layers yet."""
    return LoadingProgress(
        stage="downloading", layers_loaded=0, layers_total=0,
        bytes_downloaded=event.bytes_downloaded, bytes_total=event.bytes_total,
        speed_mbps=event.speed_mbps,
    )
