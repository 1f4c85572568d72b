"""Model references → local files: plan an `hf:` download and fetch it safely (B36, B37).

Planning (`make_plan`) lists the repo through the hub API and picks what to fetch: the file
an `hf:org/repo/file.gguf` names, or for `hf:org/repo` the GGUF model in it — `Q4_K_M` when
there is one that fits the node, else the smallest that fits. A model split into parts
(`name-00001-of-00003.gguf`) is always fetched whole. Each file is HEADed for its size and
LFS sha256, then the free disk is checked against what is still missing (INSUFFICIENT_DISK
with required, available and how much to free, keeping `download_reserve_mb` free).

Fetching (`fetch_file`) streams one file into `<dest>.partial` and renames it into place
only once its size and sha256 are right: a broken connection or a stall (no bytes for
`download_stall_timeout_s`) is retried with `Range` from the partial file's size, with
exponential backoff, `download_attempts` times in all; a corrupt result is deleted and
fetched again (CHECKSUM_MISMATCH after the last attempt); a full disk (ENOSPC) removes the
partial file and ends with INSUFFICIENT_DISK.

Files land in `<models dir>/hf/<org>/<repo>/<revision>/<path in repo>`, so deleting the
model from the catalog deletes them. This module never blocks the event loop: the network
is httpx async, and every file operation (open, write + hash, fsync, rename) runs in a thread,
with at most one write in flight while the next batch is read.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import psutil

from rbee_agent import resources
from rbee_agent.hub import HubClient, HubFile, Retryable
from rbee_agent.model_refs import HfRef
from rbee_agent.protocol import ErrorCode, RbeeError
from rbee_agent.settings import AgentSettings

log = logging.getLogger("rbee.agent")

MB = 1024 * 1024
HF_SUBDIR = "hf"
PARTIAL_SUFFIX = ".partial"
PREFERRED_QUANT = "q4_k_m"
WRITE_BATCH_BYTES = 4 * MB  # received bytes handed to the writer thread at once
# The writer thread flushes to disk every so many bytes, so that the flush before the file
# is renamed into place only has the tail to write (not seconds of a big model at the end).
SYNC_EVERY_BYTES = 32 * MB
WRITE_QUEUE_BATCHES = 4  # batches waiting for the writer: bounds memory to ~20 MB a file
SPLIT_RE = re.compile(r"(?P<stem>.+)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf", re.IGNORECASE)
# Files in GGUF repos that are not a model to chat with.
_NOT_A_MODEL = ("mmproj", "imatrix")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


# ------------------------------------------------------------------------ choosing files


@dataclass(frozen=True)
class Candidate:
    """One model in a repo: a single GGUF file, or every part of a split one, in order."""

    files: tuple[HubFile, ...]

    @property
    def name(self) -> str:
        return self.files[0].path

    @property
    def size(self) -> int:
        return sum(f.size or 0 for f in self.files)

    @property
    def preferred(self) -> bool:
        return PREFERRED_QUANT in self.name.lower()


def gguf_candidates(files: Sequence[HubFile]) -> list[Candidate]:
    """The models in a repo listing: single GGUF files and complete split sets."""
    singles: list[Candidate] = []
    splits: dict[tuple[str, int], dict[int, HubFile]] = {}
    for f in files:
        base = f.path.rsplit("/", 1)[-1].lower()
        if not base.endswith(".gguf") or any(word in base for word in _NOT_A_MODEL):
            continue
        if not safe_repo_path(f.path):
            log.warning("the hub listed an unsafe file path %r; ignored", f.path)
            continue
        match = SPLIT_RE.fullmatch(f.path)
        if match is None:
            singles.append(Candidate((f,)))
            continue
        key = (match["stem"], int(match["count"]))
        splits.setdefault(key, {})[int(match["part"])] = f
    for (_, count), parts in splits.items():
        if sorted(parts) == list(range(1, count + 1)):
            singles.append(Candidate(tuple(parts[i] for i in range(1, count + 1))))
    return sorted(singles, key=lambda c: (c.size, c.name))


def safe_repo_path(path: str) -> bool:
    """A relative path with no empty, `.` or `..` part: it cannot leave the model's folder
    (the listing comes from the hub, or from whatever HF_ENDPOINT points at)."""
    parts = path.split("/")
    return (not path.startswith("/") and "\\" not in path and "\x00" not in path
            and all(p not in ("", ".", "..") for p in parts))


def choose_candidate(
    ref: HfRef, candidates: Sequence[Candidate], capacity_bytes: int, ram_factor: float
) -> Candidate:
    """`Q4_K_M` if one fits the node, else the smallest model that fits (B36)."""
    if not candidates:
        raise RbeeError(
            ErrorCode.MODEL_NOT_FOUND,
            f"{ref} has no GGUF model files",
            hint="rbee serves GGUF models: pick a repo with .gguf files (often named ...-GGUF).",
            details={"model_ref": str(ref)},
        )
    fitting = [c for c in candidates if c.size * ram_factor <= capacity_bytes]
    preferred = [c for c in fitting if c.preferred]
    if preferred or fitting:
        return min(preferred or fitting, key=lambda c: (c.size, c.name))
    smallest = candidates[0]
    raise RbeeError(
        ErrorCode.INSUFFICIENT_RAM,
        f"No model in {ref} fits this node: the smallest, {smallest.name} "
        f"({smallest.size // MB} MB), needs about {int(smallest.size * ram_factor) // MB} MB "
        f"of memory; the node has {capacity_bytes // MB} MB",
        hint="Pick a smaller model, or name a file to download it anyway: "
        f"hf:{ref.repo_id}/{smallest.name}",
        details={"model_ref": str(ref), "capacity_mb": capacity_bytes // MB,
                 "smallest": smallest.name, "smallest_mb": smallest.size // MB},
    )


def named_candidate(ref: HfRef, files: Sequence[HubFile]) -> Candidate:
    """The file `ref` names — with its sibling parts when it is part of a split model."""
    assert ref.filename is not None
    by_path = {f.path: f for f in files}
    named = by_path.get(ref.filename)
    if named is None:
        known = [c.name for c in gguf_candidates(files)]
        raise RbeeError(
            ErrorCode.MODEL_NOT_FOUND,
            f"{ref.repo_id} has no file {ref.filename!r}",
            hint=("GGUF models in the repo: " + ", ".join(known) + "."
                  if known else "The repo has no GGUF files."),
            details={"model_ref": str(ref), "files": known},
        )
    for candidate in gguf_candidates(files):
        if named in candidate.files:
            return candidate
    return Candidate((named,))


def node_capacity_bytes() -> int:
    """What the biggest model this node could ever run may need: total RAM, or the largest
    GPU's memory when that is bigger. Blocking (NVML): call in a thread."""
    vram = [g.vram_total_mb or 0 for g in resources.gpus()]
    return max([int(psutil.virtual_memory().total), *(mb * MB for mb in vram)])


def split_parts(first: Path) -> list[Path]:
    """All parts of a split model given its first part's path; `[first]` when not split."""
    match = SPLIT_RE.fullmatch(first.name)
    if match is None or int(match["part"]) != 1:
        return [first]
    count = int(match["count"])
    return [first.with_name(f"{match['stem']}-{i:05d}-of-{count:05d}.gguf")
            for i in range(1, count + 1)]


# ------------------------------------------------------------------------ planning


@dataclass(frozen=True)
class PlannedFile:
    path: str  # in the repo
    url: str  # the hub's resolve URL at the listed commit
    size: int
    sha256: str | None
    dest: Path

    @property
    def partial(self) -> Path:
        return self.dest.with_name(self.dest.name + PARTIAL_SUFFIX)


@dataclass(frozen=True)
class Plan:
    """What one model download fetches, and the catalog reference it will get."""

    model_ref: str  # as asked for
    reference: str  # hf:org/repo/<first file>[@revision]
    files: tuple[PlannedFile, ...]

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def dest(self) -> Path:
        return self.files[0].dest

    @property
    def key(self) -> str:
        """Two requests with the same key fetch the same files: they share one download."""
        return str(self.dest)


def model_dir(models_dir: Path, ref: HfRef) -> Path:
    return (models_dir / HF_SUBDIR / ref.org / ref.repo
            / quote(ref.revision or "main", safe=""))


async def make_plan(
    hub: HubClient, ref: HfRef, settings: AgentSettings, capacity_bytes: int | None = None
) -> Plan:
    """List the repo, pick the files, HEAD each, check the disk. Raises RbeeError."""
    info = await hub.repo_info(ref)
    if ref.filename is not None:
        candidate = named_candidate(ref, info.files)
    else:
        candidates = gguf_candidates(info.files)
        if any(c.size == 0 for c in candidates):  # a mirror without sizes in its listing
            candidates = await _with_sizes(hub, ref, info.commit, candidates)
        if capacity_bytes is None:
            capacity_bytes = await asyncio.to_thread(node_capacity_bytes)
        candidate = choose_candidate(ref, candidates, capacity_bytes, settings.ram_factor)
    revision = info.commit or ref.revision or "main"
    folder = model_dir(settings.models_path, ref)
    files = []
    for f in candidate.files:
        dest = folder / f.path
        if not safe_repo_path(f.path) or not dest.resolve().is_relative_to(folder.resolve()):
            raise RbeeError(
                ErrorCode.DOWNLOAD_FAILED,
                f"The hub at {hub.endpoint} lists {f.path!r} in {ref.repo_id}, a path that "
                "would leave the models directory",
                details={"model_ref": str(ref), "file": f.path},
            )
        meta = await hub.file_meta(ref.repo_id, revision, f.path, f"hf:{ref.repo_id}/{f.path}")
        size = f.size if f.size is not None else meta.size
        if size is None:
            raise RbeeError(
                ErrorCode.DOWNLOAD_FAILED,
                f"The hub at {hub.endpoint} gives no size for {f.path} in {ref.repo_id}",
                details={"model_ref": str(ref), "file": f.path},
            )
        files.append(PlannedFile(
            path=f.path, url=hub.file_url(ref.repo_id, revision, f.path), size=size,
            sha256=f.sha256 or meta.sha256, dest=dest,
        ))
    first = files[0].path
    reference = str(HfRef(ref.org, ref.repo, first, ref.revision))
    plan = Plan(model_ref=str(ref), reference=reference, files=tuple(files))
    await asyncio.to_thread(check_disk, plan, settings.download_reserve_mb * MB)
    return plan


async def _with_sizes(
    hub: HubClient, ref: HfRef, commit: str | None, candidates: list[Candidate]
) -> list[Candidate]:
    revision = commit or ref.revision or "main"
    sized = []
    for c in candidates:
        files = []
        for f in c.files:
            if f.size is None:
                meta = await hub.file_meta(ref.repo_id, revision, f.path, str(ref))
                f = HubFile(f.path, meta.size, f.sha256 or meta.sha256)
            files.append(f)
        sized.append(Candidate(tuple(files)))
    return sorted(sized, key=lambda c: (c.size, c.name))


def disk_free_bytes(path: Path) -> int:
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _on_disk(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def missing_bytes(plan: Plan) -> int:
    """Bytes still to fetch: complete files and partial files count as already here."""
    missing = 0
    for f in plan.files:
        if _on_disk(f.dest) == f.size:
            continue
        have = _on_disk(f.partial)
        missing += f.size - have if have <= f.size else f.size
    return missing


def check_disk(plan: Plan, reserve_bytes: int) -> None:
    """INSUFFICIENT_DISK unless what is missing fits with `reserve_bytes` to spare (B37)."""
    required = missing_bytes(plan)
    available = disk_free_bytes(plan.dest)
    if required and required + reserve_bytes > available:
        raise insufficient_disk(plan.model_ref, plan.dest.parent, required, available,
                                reserve_bytes)


def insufficient_disk(
    what: str, where: Path, required: int, available: int, reserve: int, mid_way: bool = False
) -> RbeeError:
    to_free = max(0, required + reserve - available)
    required_mb, available_mb, free_mb = -(-required // MB), available // MB, -(-to_free // MB)
    said = "The disk filled up while downloading" if mid_way else "Not enough disk to download"
    return RbeeError(
        ErrorCode.INSUFFICIENT_DISK,
        f"{said} {what}: it needs {required_mb} MB in {where}"
        + (f" (keeping {reserve // MB} MB free)" if reserve else "")
        + f"; {available_mb} MB is available",
        hint=f"Free at least {free_mb} MB on that disk (rbee models rm … removes models), "
        "or move the models dir with --models-dir.",
        details={"required_mb": required_mb, "available_mb": available_mb,
                 "free_mb": free_mb, "reserve_mb": reserve // MB, "path": str(where)},
    )


# ------------------------------------------------------------------------ fetching


class PartialFile:
    """`<dest>.partial` and a running sha256 of the bytes in it.

    Used only from worker threads. A batch of received chunks is written (`write`) and
    hashed (`digest`) in two threads at once: sha256 costs about as much CPU as the network
    and the disk together, so it must not wait for them. One lock orders writes and closing,
    so a write still running in its thread when a download is cancelled finishes before the
    file closes; another guards the hash.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self._fd: int | None = None
        self._hash = hashlib.sha256()
        self._hashed = -1  # bytes of the file the hash covers; -1: unknown, rehash on open
        self._unsynced = 0
        self._lock = threading.Lock()
        self._hash_lock = threading.Lock()

    def open(self) -> int:
        """Open for appending; the hash then covers the bytes already there. Their count."""
        with self._lock, self._hash_lock:
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self.size = os.fstat(self._fd).st_size
            if self._hashed != self.size:
                self._rehash()
            return self.size

    def _rehash(self) -> None:
        self._hash = hashlib.sha256()
        with self.path.open("rb") as fh:
            while chunk := fh.read(WRITE_BATCH_BYTES):
                self._hash.update(chunk)
        self._hashed = self.size

    def write(self, parts: Sequence[bytes]) -> None:
        """Append the chunks (one `writev` per batch, no joining copy)."""
        with self._lock:
            if self._fd is None:
                raise OSError(errno.EBADF, "the partial file was closed")
            views = [memoryview(p) for p in parts if p]
            try:
                while views:
                    written = os.writev(self._fd, views)
                    self.size += written
                    self._unsynced += written
                    views = _skip(views, written)
            except OSError:
                self._hashed = -1  # the hash may now cover bytes the file lacks
                raise
            if self._unsynced >= SYNC_EVERY_BYTES:
                os.fdatasync(self._fd)
                self._unsynced = 0

    def digest(self, parts: Sequence[bytes]) -> None:
        """Add the chunks to the running sha256 (hashlib releases the GIL while it works)."""
        with self._hash_lock:
            for part in parts:
                self._hash.update(part)
            self._hashed += sum(len(p) for p in parts)

    def hexdigest(self) -> str:
        with self._hash_lock:
            return self._hash.hexdigest()

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def remove(self) -> None:
        """Close, delete, and forget the hash: the next open starts from byte 0."""
        with self._lock, self._hash_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self.path.unlink(missing_ok=True)
            self._hash = hashlib.sha256()
            self._hashed = -1
            self.size = 0

    def move_to(self, dest: Path) -> None:
        """fsync, close and rename into place."""
        with self._lock:
            assert self._fd is not None
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            os.replace(self.path, dest)


def _skip(views: list[memoryview], n: int) -> list[memoryview]:
    """The buffers left after a (possibly partial) write of `n` bytes."""
    while views and n >= len(views[0]):
        n -= len(views.pop(0))
    if views and n:
        views[0] = views[0][n:]
    return views


class _Writer:
    """Batches received chunks and hands each batch to two threads (write, hash) through a
    short queue, so the next bytes are read from the network meanwhile.

    A write error (a full disk) is raised by the next `add` or by `flush`.
    """

    def __init__(self, partial: PartialFile) -> None:
        self.partial = partial
        self._parts: list[bytes] = []
        self._buffered = 0
        self._queue: asyncio.Queue[list[bytes] | None] = asyncio.Queue(WRITE_QUEUE_BATCHES)
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None

    async def add(self, chunk: bytes) -> None:
        self._parts.append(chunk)
        self._buffered += len(chunk)
        if self._buffered >= WRITE_BATCH_BYTES:
            await self._put(self._take())

    async def flush(self) -> None:
        """Write everything received so far; the partial file then holds exactly that."""
        if self._parts:
            await self._put(self._take())
        if self._task is not None:
            await self._queue.put(None)
            await asyncio.shield(self._task)
        if self._error is not None:
            raise self._error

    async def _put(self, parts: list[bytes]) -> None:
        if self._error is not None:
            raise self._error
        if self._task is None:
            self._task = asyncio.create_task(self._consume())
        await self._queue.put(parts)

    async def _consume(self) -> None:
        while (parts := await self._queue.get()) is not None:
            if self._error is None:  # after an error, drain so no put waits forever
                results = await asyncio.gather(
                    asyncio.to_thread(self.partial.write, parts),
                    asyncio.to_thread(self.partial.digest, parts),
                    return_exceptions=True,
                )
                self._error = next((r for r in results if isinstance(r, BaseException)), None)

    def _take(self) -> list[bytes]:
        parts = self._parts
        self._parts = []
        self._buffered = 0
        return parts


# Called with (bytes of this file on disk or received, bytes received since the last call).
OnBytes = Callable[[int, int], None]
# Called with (attempt number, a one-line note for people) before each retry (B128).
OnAttempt = Callable[[int, str], None]


def _attempt_note(attempt: int, attempts: int, problem: str, corrupt: bool, have: int,
                  delay: float) -> str:
    """"attempt 2/6: connection reset, resuming at 41.2 MB in 0.4 s"."""
    if corrupt:
        what = "fetching it again"
    elif have > 0:
        what = f"resuming at {have / MB:.1f} MB"
    else:
        what = "starting again"
    return f"attempt {attempt}/{attempts}: {problem}, {what} in {delay:.1f} s"


async def fetch_file(
    hub: HubClient,
    planned: PlannedFile,
    settings: AgentSettings,
    on_bytes: OnBytes,
    on_attempt: OnAttempt,
    what: str,
) -> str:
    """Fetch one planned file into place; its sha256. Raises RbeeError (B37).

    The partial file is kept after a final DOWNLOAD_FAILED and on cancellation (the next
    download resumes from it); it is removed after CHECKSUM_MISMATCH and a full disk.
    """
    partial = PartialFile(planned.partial)
    problem, corrupt = "", False
    try:
        for attempt in range(1, settings.download_attempts + 1):
            if attempt > 1:
                delay = settings.download_backoff_s * 2 ** (attempt - 2)
                log.warning("download of %s: %s; attempt %d of %d in %.2f s", planned.path,
                            problem, attempt, settings.download_attempts, delay)
                on_attempt(attempt, _attempt_note(attempt, settings.download_attempts,
                                                  problem, corrupt, partial.size, delay))
                await asyncio.sleep(delay)
            try:
                await _attempt(hub, planned, partial, on_bytes, what)
            except (Retryable, httpx.TransportError) as exc:
                problem, corrupt = _describe(exc), False
                continue
            except OSError as exc:
                raise await _write_failed(exc, partial, planned, settings, what) from None
            problem = await _verify(partial, planned)
            if not problem:
                await asyncio.to_thread(partial.move_to, planned.dest)
                return partial.hexdigest()
            corrupt = True
        raise _gave_up(partial, planned, settings.download_attempts, problem, corrupt, what,
                       hub.endpoint)
    finally:
        await asyncio.to_thread(partial.close)


async def _attempt(
    hub: HubClient, planned: PlannedFile, partial: PartialFile, on_bytes: OnBytes, what: str
) -> None:
    """One try: resume from what the partial file holds, up to the planned size."""
    have = await asyncio.to_thread(partial.open)
    if have > planned.size:
        await asyncio.to_thread(partial.remove)
        have = await asyncio.to_thread(partial.open)
    on_bytes(have, 0)
    if have < planned.size:
        await _transfer(hub, planned, partial, have, on_bytes, what)


async def _transfer(
    hub: HubClient, planned: PlannedFile, partial: PartialFile, offset: int, on_bytes: OnBytes,
    what: str,
) -> None:
    async with hub.open_stream(planned.url, offset, what) as reply:
        if offset and reply.status_code != 206:
            log.warning("the server ignored the Range for %s; starting it again", planned.path)
            await asyncio.to_thread(partial.remove)
            await asyncio.to_thread(partial.open)
            offset = 0
        elif offset and not reply.headers.get("content-range", "").startswith(
                f"bytes {offset}-"):
            raise Retryable(f"the server resumed at the wrong place "
                            f"({reply.headers.get('content-range')!r}, wanted {offset})")
        writer = _Writer(partial)
        received = offset
        try:
            async for chunk in reply.aiter_raw():
                received += len(chunk)
                on_bytes(received, len(chunk))
                await writer.add(chunk)
        finally:
            await writer.flush()
    if partial.size < planned.size:
        raise Retryable(f"the transfer ended at {partial.size} of {planned.size} bytes")


async def _verify(partial: PartialFile, planned: PlannedFile) -> str:
    """'' when the partial file is complete and its sha256 is right; else what is wrong
    (and the file is removed, so the next attempt fetches it whole)."""
    if partial.size != planned.size:
        problem = f"the file has {partial.size} bytes, not {planned.size}"
    elif planned.sha256 is not None and partial.hexdigest() != planned.sha256:
        problem = (f"sha256 {partial.hexdigest()} does not match the hub's "
                   f"{planned.sha256}")
    else:
        return ""
    log.warning("download of %s is corrupt (%s); deleting it", planned.path, problem)
    await asyncio.to_thread(partial.remove)
    return problem


async def _write_failed(
    exc: OSError, partial: PartialFile, planned: PlannedFile, settings: AgentSettings, what: str
) -> RbeeError:
    if exc.errno not in _DISK_FULL:
        return RbeeError(
            ErrorCode.DOWNLOAD_FAILED,
            f"Cannot write {planned.partial} while downloading {what}: "
            f"{exc.strerror or exc}",
            hint="Check the models dir's permissions and file system.",
            details={"model_ref": what, "file": planned.path, "path": str(planned.partial)},
        )
    await asyncio.to_thread(partial.remove)
    available = await asyncio.to_thread(disk_free_bytes, planned.dest)
    log.error("disk full while downloading %s; partial file removed", planned.path)
    return insufficient_disk(what, planned.dest.parent, planned.size, available,
                             settings.download_reserve_mb * MB, mid_way=True)


def _gave_up(
    partial: PartialFile, planned: PlannedFile, attempts: int, problem: str, corrupt: bool,
    what: str, endpoint: str,
) -> RbeeError:
    details = {"model_ref": what, "file": planned.path, "attempts": attempts,
               "last_error": problem}
    if corrupt:
        return RbeeError(
            ErrorCode.CHECKSUM_MISMATCH,
            f"{planned.path} of {what} came out corrupt {attempts} times: {problem}",
            hint="The hub, or a proxy between it and the node, is serving bad bytes; try "
            "again later or from a mirror (HF_ENDPOINT). The damaged file was deleted.",
            details={**details, "expected_sha256": planned.sha256},
        )
    kept = partial.size
    hint = f"Check the node's connection to {endpoint}"
    return RbeeError(
        ErrorCode.DOWNLOAD_FAILED,
        f"Downloading {planned.path} of {what} failed {attempts} times: {problem}",
        hint=(f"{hint}; downloading again resumes from the {kept // MB} MB already fetched."
              if kept else f"{hint}."),
        details={**details, "partial_bytes": kept},
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"no bytes for too long ({type(exc).__name__})"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
