"""Worker processes: spawn, follow start-up, health-check, idle-time-out, stop (B24-B32).

The supervisor is the agent's only owner of worker processes. Each worker is a child
process (`python -m rbee_agent.worker`) with its own API key, its output piped into a
rotated per-worker log, and three watchers: process exit (noticed the moment it happens),
start-up progress (relayed from the worker's own SSE), and the shared health and idle loops.

One worker per spawn intent (B122): a spawn that matches a worker still loading, or an idle
one, of the same model, backend, devices, slots and context gets that worker back (unless it
asks for a `new` one); admission runs under one lock and counts what loading workers are
still about to take, so parallel spawns cannot all pass a check only one of them fits.

A worker for an `hf:` model the node does not have yet starts (or joins) its download
first: it is listed as `loading` from the start, its progress stream carries the download
stage, and the process is launched once the model is in the catalog (B37).

Teardown happens in one place, `_retire`; a worker that failed to start stays answerable as
state `failed`, with its error, for `failed_kept_s` (B127).

It never blocks the event loop: processes are asyncio subprocesses, HTTP is httpx async,
and catalog or resource calls that touch the disk run in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import logging.handlers
import secrets
import signal
import socket
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from rbee_agent import resources
from rbee_agent.catalog import Catalog, derive_id, owned_file
from rbee_agent.downloads import Download, DownloadManager
from rbee_agent.managed_worker import ManagedWorker
from rbee_agent.model_refs import CatalogRef, FileRef, HfRef, parse_model_ref
from rbee_agent.preflight import Admission, Reserved, admit
from rbee_agent.protocol import (
    SSE_DONE,
    CatalogEntry,
    DownloadProgress,
    ErrorCode,
    HealthReply,
    LoadingProgress,
    RbeeError,
    SpawnReply,
    SpawnRequest,
    WorkerInfo,
    WorkerReadyCallback,
    iter_sse_data,
)
from rbee_agent.provision import Plan, split_parts
from rbee_agent.rpc_servers import RpcServers
from rbee_agent.settings import AgentSettings
from rbee_agent.split_placement import admit_split
from rbee_agent.worker_launch import LaunchSpec, worker_command, worker_env

log = logging.getLogger("rbee.agent")

_ADDRESS_IN_USE = "address already in use"
_PORT_RETRIES = 5


class Supervisor:
    def __init__(self, settings: AgentSettings, catalog: Catalog) -> None:
        self.settings = settings
        self.catalog = catalog
        self.workers: dict[str, ManagedWorker] = {}
        self.failed: dict[str, ManagedWorker] = {}  # failed starts, kept for a while
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None))
        self._ids = (f"w{n}-{secrets.token_hex(2)}" for n in itertools.count(1))
        self._tasks: set[asyncio.Task[Any]] = set()
        self._spawn_lock = asyncio.Lock()
        self._closing = False
        self._worker_log_dir = settings.log_dir / "workers"
        self.downloads = DownloadManager(settings, catalog)
        self.rpc = RpcServers(settings)  # llama.cpp RPC servers for split workers (B201)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._worker_log_dir.mkdir(parents=True, exist_ok=True)
        self._background(self._health_loop())
        self._background(self._idle_loop())
        self._background(self.rpc.reap_unused(self.settings.idle_check_s))

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
        await self.rpc.shutdown()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.downloads.close()
        await self.http.aclose()

    def _check_open(self) -> None:
        if self._closing:
            raise RbeeError(ErrorCode.AGENT_SHUTTING_DOWN, "The agent is shutting down")

    # ------------------------------------------------------------------ lookup

    def get(self, worker_id: str) -> ManagedWorker:
        """A live worker, or one that failed to start not long ago (state `failed`)."""
        self._forget_old_failures()
        worker = self.workers.get(worker_id) or self.failed.get(worker_id)
        if worker is None:
            raise RbeeError(
                ErrorCode.WORKER_NOT_FOUND,
                f"No worker {_shown(worker_id)} on this node",
                hint="List the node's workers with 'rbee workers list --node NAME'.",
                details={"worker_id": worker_id[:80], "workers": sorted(self.workers)},
            )
        return worker

    def infos(self) -> list[WorkerInfo]:
        self._forget_old_failures()
        return [w.info() for w in [*self.workers.values(), *self.failed.values()]]

    def by_key(self, token: str) -> ManagedWorker | None:
        for worker in self.workers.values():
            if secrets.compare_digest(worker.api_key.encode(), token.encode()):
                return worker
        return None

    def _forget_old_failures(self) -> None:
        cutoff = time.time() - self.settings.failed_kept_s
        for worker_id, worker in list(self.failed.items()):
            if (worker.failed_at or 0) < cutoff:
                del self.failed[worker_id]

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

    async def delete_model(self, model_id: str) -> CatalogEntry:
        """Remove a model from the catalog (B35): refused while a worker uses it and for a
        bundled model; the file goes too only when rbee downloaded it (`owned_file`)."""
        entry = await asyncio.to_thread(self.catalog.require, model_id)
        users = self.model_in_use(model_id)
        if users:
            raise RbeeError(
                ErrorCode.MODEL_IN_USE,
                f"Model {model_id} is in use by worker(s) {', '.join(users)}",
                hint="Stop those workers first: rbee workers stop --node NAME --id ID.",
                details={"workers": users},
            )
        if entry.provider == "bundled":
            raise RbeeError(
                ErrorCode.MODEL_PROTECTED,
                f"Model {model_id} ships with an installed package and cannot be deleted here",
                hint="Uninstall its package on the node to remove it.",
            )
        owned = owned_file(entry, self.settings.models_path)
        await asyncio.to_thread(self.catalog.remove, model_id)
        if owned is not None:
            for part in split_parts(owned):
                await asyncio.to_thread(part.unlink, missing_ok=True)
        log.info("model %s removed from the catalog%s", model_id,
                 f" and {owned} deleted" if owned else " (its file is not rbee's; kept)")
        return entry

    # ------------------------------------------------------------------ spawn

    async def spawn(self, request: SpawnRequest) -> SpawnReply:
        """Reuse, join or admit and start a worker; answers at once with state `loading`.

        The model is resolved before the spawn lock is taken: for an `hf:` model that asks
        the hub, and a slow hub must not hold up spawns of models already here.
        """
        self._check_open()
        model = await self.resolve_model(request.model_ref)
        async with self._spawn_lock:
            self._check_open()
            reference = model.reference
            same = (None if request.new or request.rpc
                    else self._same_intent(request, reference))
            if same is not None:
                how = "joins the start of" if same.state == "loading" else "reuses idle"
                log.info("spawn of %s %s worker %s", reference, how, same.id)
                same.last_activity = time.time()
                return SpawnReply(worker=same.info(), reused=True)
            entry = _provisional(model) if isinstance(model, Plan) else model
            if request.rpc:
                worker = await self._new_split_worker(request, model)
            else:
                admission = await asyncio.to_thread(self._admit, request, entry, None)
                worker = self._new_worker(request, entry, admission)
            if isinstance(model, Plan):
                return self._spawn_after_download(worker, request, model)
            try:
                await self._launch(worker)
            except OSError as exc:
                raise _start_failed(worker, exc) from None
            self.workers[worker.id] = worker
            return SpawnReply(worker=worker.info(), reused=False)

    def _same_intent(self, request: SpawnRequest, reference: str) -> ManagedWorker | None:
        for worker in self.workers.values():
            if worker.split:
                continue  # a split worker serves only the split that asked for it (B204)
            if worker.state in ("loading", "idle") and _matches(worker, request, reference):
                return worker
        return None

    def _admit(self, request: SpawnRequest, model: CatalogEntry,
               exclude: ManagedWorker | None) -> Admission:
        """Preflight against what is free now, less what loading workers will still take."""
        return admit(request, model, self.settings, self._reserved(exclude))

    def _reserved(self, exclude: ManagedWorker | None) -> Reserved:
        ram = 0
        vram: dict[int, int] = {}
        for worker in self.workers.values():
            if worker is exclude or worker.state != "loading":
                continue
            pid = worker.pid
            rss = (resources.process_rss_mb(pid) or 0) if pid else 0
            ram += max(0, worker.ram_need_mb - rss)
            held = (resources.process_vram_mb(pid) or 0) if pid else 0
            for device, need in worker.vram_need_mb.items():
                share = held // max(1, len(worker.vram_need_mb))
                vram[device] = vram.get(device, 0) + max(0, need - share)
        return Reserved(ram_mb=ram, vram_mb=vram)

    def _new_worker(self, request: SpawnRequest, model: CatalogEntry,
                    admission: Admission) -> ManagedWorker:
        worker_id = next(self._ids)
        worker = ManagedWorker(
            worker_id, model, request.backend, ctx_size=admission.ctx_size,
            slots=admission.slots, placement=admission.placement,
            queue_depth=self.settings.worker_queue_depth,
            log_path=self._worker_log_dir / f"{worker_id}.log",
            lines_kept=self.settings.worker_log_lines_kept,
        )
        _admitted(worker, admission)
        return worker

    async def _new_split_worker(self, request: SpawnRequest, model: CatalogEntry | Plan
                                ) -> ManagedWorker:
        """A worker whose last layers run on RPC servers of other nodes (B204)."""
        if isinstance(model, Plan):
            raise RbeeError(
                ErrorCode.INVALID_REQUEST,
                f"{model.reference} is not on the head node yet; a split needs it there",
                hint="Download it first: rbee models download --node NODE --model REF.",
                details={"model_ref": request.model_ref})
        admission, parts = await asyncio.to_thread(
            admit_split, request, model, self.settings, self._reserved(None))
        worker = self._new_worker(request, model, admission)
        worker.split, worker.rpc_peers = parts, list(request.rpc or [])
        log.info("worker %s splits %s: %s", worker.id, model.id, ", ".join(
            f"{p.node or 'here'} {p.layers}" for p in parts))
        return worker

    def _spawn_after_download(self, worker: ManagedWorker, request: SpawnRequest,
                              plan: Plan) -> SpawnReply:
        """A worker that starts (or joins) its model's download, then launches (B37).

        Admission ran on the size the hub announced (no point fetching a model that cannot
        run here), and runs again before the launch, on the downloaded file's header.
        """
        job, _ = self.downloads.begin(plan)
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
                admission = await asyncio.to_thread(self._admit, request, model, worker)
                worker.model = model
                worker.ctx_size, worker.placement = admission.ctx_size, admission.placement
                _admitted(worker, admission)
                worker.progress.publish(LoadingProgress(
                    stage="starting", layers_loaded=0, layers_total=model.layers))
                await self._launch(worker)
        except RbeeError as err:
            self._retire(worker, "failed", err)
        except OSError as exc:  # the process could not be started
            self._retire(worker, "failed", _start_failed(worker, exc))

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
        spec = LaunchSpec(
            worker_id=worker.id, model_path=worker.model.local_path, host=worker.host,
            port=worker.port, backend=worker.backend, ctx_size=worker.ctx_size,
            slots=worker.slots_total, placement=worker.placement,
            rpc=tuple(p.endpoint for p in worker.rpc_peers),
        )
        worker.proc = await asyncio.create_subprocess_exec(
            *worker_command(spec, self.settings), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env=worker_env(worker.api_key, worker.backend, worker.placement),
            start_new_session=True,
        )
        log.info("spawned worker %s (pid %d) for %s on port %d (ctx %d × %d slot(s)%s)",
                 worker.id, worker.proc.pid, worker.model.id, worker.port, worker.ctx_size,
                 worker.slots_total, _where(worker))
        self._background(self._pump_output(worker, worker.proc), worker)
        self._background(self._watch_exit(worker, worker.proc), worker)
        self._background(self._follow_start(worker, worker.proc), worker)

    # ------------------------------------------------------------------ teardown

    def _retire(self, worker: ManagedWorker, state: Any, failure: RbeeError | None = None
                ) -> None:
        """The one teardown: final state, out of the live table (a failed start is kept
        for `failed_kept_s`), waiters woken, the worker's watchers cancelled."""
        if worker.exited.is_set():
            return
        worker.set_state(state, failure)
        self.workers.pop(worker.id, None)
        if state == "failed" and worker.failure is not None and self.settings.failed_kept_s > 0:
            self.failed[worker.id] = worker
        worker.exited.set()
        worker.ready.set()
        for task in list(worker.tasks):
            if task is not asyncio.current_task():
                task.cancel()

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
                and any(_ADDRESS_IN_USE in line.lower() for line in worker.recent_lines)
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
        failure = worker.failure
        if worker.state == "loading" and failure is None:
            failure = RbeeError(
                ErrorCode.WORKER_START_FAILED,
                f"Worker {worker.id} for {worker.model.id} exited with code {code} while "
                f"starting: {tail[-1] if tail else 'no output'}{worker.peer_note()}",
                hint="See the worker log: rbee logs --node NAME --worker " + worker.id,
                details={"exit_code": code, "last_lines": tail, "worker_id": worker.id},
            )
        if failure is None and not expected and worker.split:
            failure = RbeeError(
                ErrorCode.WORKER_CRASHED,
                f"Split worker {worker.id} for {worker.model.id} exited with code {code}"
                f"{worker.peer_note()}",
                hint="Spawn the split again once every node answers; see the worker log: "
                     "rbee logs --worker " + worker.id,
                details={"exit_code": code, "last_lines": tail, "worker_id": worker.id,
                         "split": [p.model_dump() for p in worker.split]},
            )
        final = "failed" if failure is not None or not expected else worker.state
        self._retire(worker, final, failure)

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
                    except (httpx.TransportError, ValidationError):
                        await asyncio.sleep(0.05)
        except TimeoutError:
            if worker.state != "loading" or time.monotonic() < deadline - 1:
                return
            layer = worker.progress.value.layers_loaded
            failure = RbeeError(
                ErrorCode.LOADING_TIMEOUT,
                f"Worker {worker.id} did not finish loading {worker.model.id} within "
                f"{self.settings.start_timeout_s:g} s (stuck at layer {layer} of "
                f"{worker.model.layers})",
                hint="The node may be out of memory or swapping; see its worker log.",
                details={"layers_loaded": layer, "layers_total": worker.model.layers},
            )
            log.error("%s", failure.message)
            worker.failure = failure  # the exit watcher ends it as failed
            worker.progress.publish(LoadingProgress(
                stage="failed", layers_loaded=layer, layers_total=worker.model.layers,
                error=failure.to_body().error,
            ))
            worker.set_state("stopping")
            self._kill(worker)

    async def _relay_progress(self, worker: ManagedWorker) -> None:
        async with self.http.stream("GET", f"{worker.url}/v1/loading/progress",
                                    headers=worker.auth) as reply:
            if reply.status_code != 200:
                raise httpx.TransportError(f"progress answered {reply.status_code}")
            async for data in iter_sse_data(reply.aiter_lines()):
                if data == SSE_DONE:
                    return
                event = LoadingProgress.model_validate_json(data)
                if event.stage == "ready":
                    self._mark_ready(worker)
                    return
                if event.stage == "loading":
                    worker.progress.publish(event)

    def _mark_ready(self, worker: ManagedWorker) -> None:
        if worker.state != "loading":
            return
        worker.last_activity = time.time()
        worker.progress.publish(LoadingProgress(
            stage="ready", layers_loaded=worker.model.layers, layers_total=worker.model.layers
        ))
        worker.set_state("idle")
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
            body = HealthReply.model_validate_json(reply.content)
        except (httpx.HTTPError, ValidationError) as exc:
            worker.health_failures += 1
            log.warning("worker %s failed health check %d/%d: %s", worker.id,
                        worker.health_failures, self.settings.health_failures,
                        type(exc).__name__)
            if worker.health_failures >= self.settings.health_failures:
                log.error("worker %s failed %d health checks in a row; killing it", worker.id,
                          worker.health_failures)
                worker.set_state("stopping")
                self._kill(worker)
            return
        worker.health_failures = 0
        worker.slots_busy = body.slots_busy or 0
        worker.queued = body.queued or 0
        if body.tokens_served is not None:  # the relay's live count may be ahead of it
            worker.tokens_served = max(worker.tokens_served, body.tokens_served)

    async def _idle_loop(self) -> None:
        while True:
            await asyncio.sleep(min(self.settings.idle_check_s, self.settings.idle_timeout_s))
            now = time.time()
            for worker in list(self.workers.values()):
                idle_for = now - worker.last_activity
                if (worker.state == "idle" and worker.in_flight == 0
                        and idle_for >= self.settings.idle_timeout_s):
                    log.info("worker %s idle for %.0f s; stopping it", worker.id, idle_for)
                    self._background(self._stop(worker))

    # ------------------------------------------------------------------ stop

    async def stop(self, worker_id: str) -> WorkerInfo:
        worker = self.get(worker_id)
        if worker.state == "failed":  # a kept failure: forget it
            self.failed.pop(worker.id, None)
            return worker.info()
        await self._stop(worker)
        return worker.info()

    async def _stop(self, worker: ManagedWorker) -> None:
        """Graceful: ask the worker to drain; kill it if it is not gone after the grace."""
        if worker.proc is None and not worker.exited.is_set():  # still waiting for its model
            self._retire(worker, "stopping", RbeeError(
                ErrorCode.CANCELLED,
                f"Worker {worker.id} was stopped before its model finished downloading",
                hint="The download goes on; cancel it with its job id if it is not wanted.",
                details={"worker_id": worker.id},
            ))
            return
        if worker.proc is None or worker.exited.is_set():
            return
        was_loading = worker.state == "loading"
        worker.set_state("stopping")
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


# ---------------------------------------------------------------------- helpers


def _matches(worker: ManagedWorker, request: SpawnRequest, reference: str) -> bool:
    """Whether `worker` serves this spawn's intent; what the spawn leaves out matches any."""
    asked_devices = request.devices or ([request.device] if request.device is not None
                                        else None)
    devices = list(worker.placement.devices) or [0]
    layers = worker.placement.gpu_layers
    return (worker.model.reference == reference and worker.backend == request.backend
            and (asked_devices is None or asked_devices == devices)
            and (request.slots is None or request.slots == worker.slots_total)
            and (request.ctx_size is None or request.ctx_size == worker.ctx_size)
            and (not isinstance(request.gpu_layers, int) or request.gpu_layers == layers))


def _admitted(worker: ManagedWorker, admission: Admission) -> None:
    worker.ram_need_mb = admission.ram.total_mb
    worker.vram_need_mb = {d: n.total_mb for d, n in admission.vram.items()}


def _provisional(plan: Plan) -> CatalogEntry:
    """A catalog entry for a model still to be downloaded: the size the hub announced."""
    return CatalogEntry(
        id=derive_id(plan.dest.name), provider="hf", reference=plan.reference,
        local_path=str(plan.dest), size_bytes=plan.total, quantization="unknown",
        architecture="unknown", layers=0, context_length=0, added_at=time.time(),
    )


def _start_failed(worker: ManagedWorker, exc: OSError) -> RbeeError:
    return RbeeError(
        ErrorCode.WORKER_START_FAILED,
        f"Worker {worker.id} could not be started: {exc}",
        details={"worker_id": worker.id},
    )


def _where(worker: ManagedWorker) -> str:
    placement = worker.placement
    if not placement.devices or worker.backend == "cpu":
        return ""
    layers = "all" if placement.gpu_layers < 0 else str(placement.gpu_layers)
    return f", {layers} layer(s) on GPU {','.join(map(str, placement.devices))}"


def _shown(text: str) -> str:
    """A client-given id in a message: quoted, cut short, control characters escaped."""
    return repr(text[:80] + ("…" if len(text) > 80 else ""))


def _download_stage(event: DownloadProgress) -> LoadingProgress:
    """A download event as a worker's start-up progress (B37): bytes, no layers yet."""
    return LoadingProgress(
        stage="downloading", layers_loaded=0, layers_total=0,
        bytes_downloaded=event.bytes_downloaded, bytes_total=event.bytes_total,
        speed_mbps=event.speed_mbps,
    )
