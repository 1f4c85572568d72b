"""Download jobs: one per model being fetched, shared by everyone who asks for it (B37).

`DownloadManager.start("hf:org/repo…")` plans the download (`prepare`: hub listing, file
choice, disk check; errors are raised to the caller at once) and starts it (`begin`),
returning a `Download` job — or the job already fetching the same files, so two requests
(two `POST /v1/models/download`, or a download and a worker spawn) share one transfer. A
job publishes `DownloadProgress` events through a `Broadcast` (any number of SSE clients
follow it) and ends `complete` with the model in the catalog, or `failed` with its error.
A job can be cancelled: its partial files are deleted. When the agent stops, running jobs
end and keep their partial files, so the next download resumes them.

A model the catalog already has (the same reference, or for `hf:org/repo` any model
downloaded from that repo and revision) gives a job that is complete at once, without asking
the hub. Finished jobs are kept (the last `download_jobs_kept`) so their progress URL still
answers.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path

from rbee_agent.broadcast import Broadcast
from rbee_agent.catalog import Catalog, derive_id, file_sha256
from rbee_agent.hub import HubClient
from rbee_agent.model_refs import HfRef, parse_model_ref
from rbee_agent.protocol import (
    CatalogEntry,
    DownloadJob,
    DownloadProgress,
    ErrorCode,
    RbeeError,
)
from rbee_agent.provision import (
    MB,
    PREFERRED_QUANT,
    SPLIT_RE,
    Plan,
    fetch_file,
    make_plan,
)
from rbee_agent.settings import AgentSettings

log = logging.getLogger("rbee.agent")


class _Meter:
    """Bytes so far and the speed over a sliding window; says when to publish next."""

    def __init__(self, window_s: float, interval_s: float) -> None:
        self.window_s = window_s
        self.interval_s = interval_s
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._received = 0
        self._last_publish = 0.0

    def add(self, n: int) -> None:
        now = time.monotonic()
        self._received += n
        self._samples.append((now, self._received))
        while len(self._samples) > 2 and now - self._samples[0][0] > self.window_s:
            self._samples.popleft()

    def speed_mbps(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        span = max(t1 - t0, time.monotonic() - t0) if t1 > t0 else 0.0
        return round((b1 - b0) / MB / span, 2) if span > 0 else 0.0

    def due(self) -> bool:
        now = time.monotonic()
        if now - self._last_publish < self.interval_s:
            return False
        self._last_publish = now
        return True


class Download:
    """One download job: its plan (None when the model was already here), its progress."""

    def __init__(self, job_id: str, model_ref: str, plan: Plan | None,
                 settings: AgentSettings) -> None:
        self.id = job_id
        self.model_ref = model_ref
        self.plan = plan
        self.entry: CatalogEntry | None = None
        self.error: RbeeError | None = None
        self.task: asyncio.Task[None] | None = None
        self.cancel_requested = False
        self.done = asyncio.Event()
        self.meter = _Meter(settings.download_speed_window_s,
                            settings.download_progress_interval_s)
        # Updated on every chunk (cheap); an event is built only when one is published.
        self.bytes_downloaded = 0
        self.file = plan.files[0].path if plan else None
        self.attempt = 1
        self.note: str | None = None
        self.progress = _broadcast(DownloadProgress(
            stage="downloading", job_id=job_id, model_ref=model_ref,
            bytes_total=plan.total if plan else 0,
            file=plan.files[0].path if plan else None,
        ))

    @property
    def running(self) -> bool:
        return not self.done.is_set()

    async def wait(self) -> CatalogEntry:
        """The catalog entry once the job is complete, or its error."""
        await self.done.wait()
        if self.error is not None:
            raise self.error
        assert self.entry is not None
        return self.entry

    def info(self, joined: bool = False) -> DownloadJob:
        event = self.progress.value
        plan = self.plan
        return DownloadJob(
            job_id=self.id, model_ref=self.model_ref,
            reference=plan.reference if plan else (self.entry.reference if self.entry else ""),
            stage=event.stage,
            files=[f.path for f in plan.files] if plan else [],
            bytes_total=event.bytes_total,
            bytes_downloaded=max(event.bytes_downloaded, self.bytes_downloaded),
            progress_url=f"/v1/models/download/{self.id}/progress", joined=joined,
            local_path=event.local_path, model_id=event.model_id, error=event.error,
        )

    # ------------------------------------------------------------------ publishing

    def on_bytes(self, done: int, received: int) -> None:
        """Per chunk: count, and publish a `downloading` event when one is due."""
        self.bytes_downloaded = done
        self.meter.add(received)
        if received == 0 or self.meter.due():
            self.publish()

    def publish(self) -> None:
        self.progress.publish(self.progress.value.model_copy(update={
            "bytes_downloaded": self.bytes_downloaded, "file": self.file,
            "attempt": self.attempt, "speed_mbps": self.meter.speed_mbps(),
            "note": self.note,
        }))

    def complete(self, entry: CatalogEntry) -> None:
        self.entry = entry
        self.progress.publish(self.progress.value.model_copy(update={
            "stage": "complete", "bytes_downloaded": self.progress.value.bytes_total
            or entry.size_bytes, "bytes_total": self.progress.value.bytes_total
            or entry.size_bytes, "local_path": entry.local_path, "model_id": entry.id,
            "speed_mbps": self.meter.speed_mbps(),
        }))
        self.done.set()

    def fail(self, error: RbeeError) -> None:
        self.error = error
        self.progress.publish(self.progress.value.model_copy(update={
            "stage": "failed", "error": error.to_body().error, "speed_mbps": 0.0,
        }))
        self.done.set()


def _broadcast(initial: DownloadProgress) -> Broadcast[DownloadProgress]:
    return Broadcast(initial, lambda e: e.stage in ("complete", "failed"))


class DownloadManager:
    def __init__(self, settings: AgentSettings, catalog: Catalog,
                 env: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.catalog = catalog
        self.hub = HubClient.from_env(settings, os.environ if env is None else env)
        self.jobs: collections.OrderedDict[str, Download] = collections.OrderedDict()
        self._running: dict[str, Download] = {}  # by plan key
        self._ids = (f"d{n}-{secrets.token_hex(3)}" for n in itertools.count(1))
        self._closing = False
        self.bytes_received = 0  # over every job, for the agent's metrics

    # ------------------------------------------------------------------ lookup

    def get(self, job_id: str) -> Download:
        job = self.jobs.get(job_id)
        if job is None:
            raise RbeeError(
                ErrorCode.DOWNLOAD_NOT_FOUND,
                f"No download job {job_id!r} on this node",
                hint="Start one with 'rbee models download --node NAME --model hf:org/repo'.",
                details={"job_id": job_id, "jobs": list(self.jobs)},
            )
        return job

    def find_local(self, ref: HfRef) -> CatalogEntry | None:
        """The catalog's model for `ref` whose file is still there (blocking: sqlite)."""
        if ref.filename is not None:
            entry = self.catalog.find_by_reference(str(ref))
            return entry if entry is not None and Path(entry.local_path).exists() else None
        same_repo = []
        for entry in self.catalog.list():
            if entry.provider != "hf" or not Path(entry.local_path).exists():
                continue
            try:
                known = parse_model_ref(entry.reference)
            except RbeeError:
                continue
            if (isinstance(known, HfRef) and (known.org, known.repo, known.revision)
                    == (ref.org, ref.repo, ref.revision)):
                same_repo.append(entry)
        same_repo.sort(key=lambda e: (PREFERRED_QUANT not in e.reference.lower(), e.size_bytes))
        return same_repo[0] if same_repo else None

    # ------------------------------------------------------------------ start, cancel

    async def prepare(self, model_ref: str | HfRef) -> CatalogEntry | Plan:
        """The catalog's model for `model_ref` when the node has it, else the plan to fetch
        it. Raises what planning finds: a bad reference, not found, access denied, not
        enough disk (the transfer has not started then)."""
        ref = model_ref if isinstance(model_ref, HfRef) else parse_model_ref(model_ref)
        if not isinstance(ref, HfRef):
            raise RbeeError(
                ErrorCode.INVALID_MODEL_REF,
                f"{model_ref!r} is not a Hugging Face reference: downloads take hf:org/repo "
                "or hf:org/repo/file.gguf",
                hint="file:// models and catalog names are already on the node.",
                details={"reference": str(model_ref)},
            )
        self._check_open()
        local = await asyncio.to_thread(self.find_local, ref)
        if local is not None:
            return local
        plan = await make_plan(self.hub, ref, self.settings)
        local = await asyncio.to_thread(self.catalog.find_by_reference, plan.reference)
        if local is not None and await asyncio.to_thread(Path(local.local_path).exists):
            return local
        return plan

    def begin(self, plan: Plan) -> tuple[Download, bool]:
        """Start fetching `plan`, or join the job already fetching the same files."""
        self._check_open()
        running = self._running.get(plan.key)  # no await in here: check and insert at once
        if running is not None:
            log.info("download of %s joins job %s", plan.model_ref, running.id)
            return running, True
        job = Download(next(self._ids), plan.model_ref, plan, self.settings)
        self._running[plan.key] = job
        self._remember(job)
        job.task = asyncio.create_task(self._run(job, plan))
        log.info("download job %s: %s → %s (%d file(s), %d MB)", job.id, plan.model_ref,
                 plan.dest, len(plan.files), plan.total // MB)
        return job, False

    async def start(self, model_ref: str | HfRef) -> tuple[Download, bool]:
        """`prepare`, then `begin`: a job for `model_ref` and whether it joined one running.
        A model the node already has gives a job that is complete at once."""
        prepared = await self.prepare(model_ref)
        if isinstance(prepared, CatalogEntry):
            return self._already_here(str(model_ref), prepared), False
        return self.begin(prepared)

    def _check_open(self) -> None:
        if self._closing:
            raise RbeeError(ErrorCode.AGENT_SHUTTING_DOWN, "The agent is shutting down")

    async def cancel(self, job_id: str) -> Download:
        """Stop a running job (its partial files are deleted); a finished one is left as is."""
        job = self.get(job_id)
        if job.running and job.task is not None:
            job.cancel_requested = True
            job.task.cancel()
            await job.done.wait()
        return job

    async def close(self) -> None:
        """Stop running jobs, keeping their partial files for the next start."""
        self._closing = True
        tasks = [j.task for j in self._running.values() if j.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.hub.aclose()

    def _already_here(self, model_ref: str, entry: CatalogEntry) -> Download:
        job = Download(next(self._ids), model_ref, None, self.settings)
        self._remember(job)
        job.complete(entry)
        return job

    def _remember(self, job: Download) -> None:
        self.jobs[job.id] = job
        while len(self.jobs) > self.settings.download_jobs_kept:
            oldest = next(iter(self.jobs.values()))
            if oldest.running:
                break
            self.jobs.popitem(last=False)

    # ------------------------------------------------------------------ running

    async def _run(self, job: Download, plan: Plan) -> None:
        try:
            entry = await self._fetch(job, plan)
        except asyncio.CancelledError:
            if not job.cancel_requested:
                job.fail(RbeeError(ErrorCode.AGENT_SHUTTING_DOWN,
                                   f"The agent stopped while downloading {job.model_ref}",
                                   hint="Download it again: it resumes where it stopped."))
                raise
            await asyncio.to_thread(_remove_partials, plan)
            log.info("download job %s cancelled; partial files removed", job.id)
            job.fail(RbeeError(ErrorCode.CANCELLED, f"The download of {job.model_ref} was "
                               "cancelled", details={"job_id": job.id}))
        except RbeeError as err:
            log.error("download job %s failed: %s", job.id, err.message)
            job.fail(err)
        except Exception as exc:
            log.exception("download job %s failed", job.id)
            job.fail(RbeeError(ErrorCode.INTERNAL_ERROR,
                               f"Downloading {job.model_ref} failed: {type(exc).__name__}",
                               hint="See the agent log for the traceback."))
        else:
            log.info("download job %s complete: %s is model %s", job.id, plan.reference,
                     entry.id)
            job.complete(entry)
        finally:
            if self._running.get(plan.key) is job:
                del self._running[plan.key]

    async def _fetch(self, job: Download, plan: Plan) -> CatalogEntry:
        done_bytes = 0
        digests = []
        for planned in plan.files:
            base = done_bytes

            def on_bytes(file_bytes: int, received: int, base: int = base) -> None:
                self.bytes_received += received
                job.on_bytes(base + file_bytes, received)

            def on_attempt(attempt: int, note: str) -> None:
                job.attempt = attempt
                job.note = note
                job.publish()

            job.file = planned.path

            if await asyncio.to_thread(_complete_on_disk, planned.dest, planned.size):
                digest = await asyncio.to_thread(file_sha256, planned.dest)
                if planned.sha256 in (None, digest):
                    digests.append(digest)
                    done_bytes += planned.size
                    continue
                await asyncio.to_thread(planned.dest.unlink)
            digests.append(await fetch_file(self.hub, planned, self.settings, on_bytes,
                                            on_attempt, job.model_ref))
            done_bytes += planned.size
        return await asyncio.to_thread(self._register, plan, digests[0])

    def _register(self, plan: Plan, sha256: str) -> CatalogEntry:
        """Put the downloaded model in the catalog with its GGUF metadata (B35, B38)."""
        model_id = None
        split = SPLIT_RE.fullmatch(plan.files[0].path.rsplit("/", 1)[-1])
        if split and self.catalog.find_by_reference(plan.reference) is None:
            model_id = self.catalog.unique_id(derive_id(split["stem"] + ".gguf"))
        entry = self.catalog.register_file(plan.dest, model_id, "hf", plan.reference,
                                           sha256=sha256)
        if len(plan.files) > 1:  # the size of a split model is that of all its parts
            entry = self.catalog.add(entry.model_copy(update={"size_bytes": plan.total}),
                                     replace=True)
        return entry


def _complete_on_disk(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except FileNotFoundError:
        return False


def _remove_partials(plan: Plan) -> None:
    for planned in plan.files:
        planned.partial.unlink(missing_ok=True)

