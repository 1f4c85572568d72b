"""The inference flow as one async stream of typed events (B50-B57, DESIGN principle 1).

existing worker? → agent health and version → model provisioning → spawn → loading progress
→ tokens → summary. The CLI prints these events and the TUI renders them; neither holds any
flow logic. Inputs are validated before any network (B57). Cancelling the consuming task
(Ctrl+C, Esc) cancels the request on the worker (B55).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rbee_agent.model_refs import parse_model_ref
from rbee_agent.protocol import (
    BACKENDS,
    ChatMessage,
    ErrorBody,
    ErrorCode,
    RbeeError,
    SpawnRequest,
    WorkerInfo,
)
from rbee_tui.client import AgentClient
from rbee_tui.config import Config, OperatorSettings, state_dir
from rbee_tui.events import (
    Attempt,
    Event,
    Finished,
    PhaseDone,
    PhaseStarted,
    Progress,
    Queued,
    Token,
)

ClientOpener = Callable[[str], Awaitable[AgentClient]]


@dataclass
class InferenceSpec:
    node: str
    model_ref: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    max_tokens: int = 100
    temperature: float = 0.7
    top_p: float = 0.95
    backend: str | None = "cpu"  # None: any warm worker; spawn on cuda when the node has it
    device: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # spawn settings (None: the agent's defaults)
    ctx_size: int | None = None
    slots: int | None = None
    gpu_layers: int | Literal["auto"] | None = None


def validate(spec: InferenceSpec, config: Config) -> None:
    """B57: every input checked before anything touches the network."""
    config.node(spec.node)
    parse_model_ref(spec.model_ref)
    if spec.backend is not None and spec.backend not in BACKENDS:
        raise RbeeError(ErrorCode.INVALID_BACKEND, f"Unknown backend {spec.backend!r}",
                        hint=f"Use one of: {', '.join(BACKENDS)}.")
    if not 0.0 <= spec.temperature <= 2.0:
        raise RbeeError(ErrorCode.INVALID_REQUEST,
                        f"Temperature {spec.temperature:g} is out of range",
                        hint="Use a temperature from 0 to 2 (0 = greedy).")
    if spec.max_tokens <= 0:
        raise RbeeError(ErrorCode.INVALID_REQUEST,
                        f"--max-tokens must be greater than 0, not {spec.max_tokens}",
                        hint="For example: --max-tokens 100.")
    if spec.device < 0:
        raise RbeeError(ErrorCode.DEVICE_NOT_FOUND, f"Device {spec.device} does not exist",
                        hint="Devices are numbered from 0; see rbee nodes check NODE.")
    if (spec.prompt is None) == (spec.messages is None):
        raise RbeeError(ErrorCode.INVALID_REQUEST, "Give a prompt or a chat history, not both",
                        hint="Use --prompt, with --chat to send it as a chat message.")
    if spec.prompt is not None and not spec.prompt.strip():
        raise RbeeError(ErrorCode.INVALID_REQUEST, "The prompt is empty",
                        hint="Pass some text with --prompt.")


def _matches(worker: WorkerInfo, spec: InferenceSpec) -> bool:
    if spec.model_ref not in (worker.model_id, worker.model_ref):
        return False
    return spec.backend is None or (worker.backend, worker.device) == (spec.backend,
                                                                       spec.device)


async def run_inference(
    spec: InferenceSpec, config: Config, open_client: ClientOpener
) -> AsyncIterator[Event]:
    validate(spec, config)
    settings = config.settings
    yield PhaseStarted("agent", f"Checking the agent on {spec.node}")
    client = await open_client(spec.node)
    try:
        health = await client.check_version()
        yield PhaseDone("agent", f"agent {health.version} is up")

        yield PhaseStarted("worker", f"Looking for an idle worker with {spec.model_ref}")
        workers = await client.workers()
        warm = next((w for w in workers if w.state == "idle" and _matches(w, spec)), None)
        worker: WorkerInfo | None = warm
        if warm is not None:
            yield PhaseDone("worker", f"warm: reusing worker {warm.id}")
        else:
            yield PhaseDone("worker", "none idle: spawning one")
            async for event in _spawn(client, spec, settings):
                if isinstance(event, WorkerInfo):
                    worker = event
                else:
                    yield event
        if worker is None:
            raise RbeeError(ErrorCode.WORKER_START_FAILED, "The spawned worker never got ready")
        async for event in _stream(client, worker, spec, settings):
            yield event
    finally:
        await client.aclose()


async def _spawn(
    client: AgentClient, spec: InferenceSpec, settings: OperatorSettings
) -> AsyncIterator[Event | WorkerInfo]:
    backend = spec.backend
    if backend is None:
        backend = "cuda" if "cuda" in (await client.node_info()).backends else "cpu"
    yield PhaseStarted("spawn", f"Starting a {backend} worker for {spec.model_ref}")
    reply = await client.spawn(SpawnRequest(model_ref=spec.model_ref, backend=backend,
                                            device=spec.device, ctx_size=spec.ctx_size,
                                            slots=spec.slots, gpu_layers=spec.gpu_layers))
    worker = reply.worker
    yield PhaseDone("spawn", f"worker {worker.id} (pid {worker.pid})")
    if worker.state != "loading":
        yield worker
        return
    yield PhaseStarted("loading", f"Loading {worker.model_id}")
    layers, total = 0, worker.layers_total
    downloading = False
    try:
        async with asyncio.timeout(settings.loading_timeout_s):
            async for event in client.progress(worker.id):
                if event.stage == "failed" and event.error is not None:
                    raise RbeeError.from_body(ErrorBody(error=event.error))
                if event.stage == "downloading":  # an hf: model the node did not have yet
                    downloading = True
                    yield _download_progress(event.bytes_downloaded or 0,
                                             event.bytes_total or 0, event.speed_mbps)
                    continue
                if downloading:
                    downloading = False
                    yield PhaseDone("download", "downloaded and verified")
                layers, total = event.layers_loaded, event.layers_total
                if event.stage == "ready":
                    break
                yield Progress("loading", layers, total, "layers")
    except TimeoutError:
        raise RbeeError(
            ErrorCode.LOADING_TIMEOUT,
            f"Worker {worker.id} did not finish loading {worker.model_id} within "
            f"{settings.loading_timeout_s:g} s: stuck at layer {layers} of {total}",
            hint="The node may be short of memory; see rbee logs --node "
            f"{spec.node} --worker {worker.id}",
            details={"layers_loaded": layers, "layers_total": total, "worker_id": worker.id},
        ) from None
    yield Progress("loading", total, total, "layers")
    yield PhaseDone("loading", "ready")
    yield await client.worker(worker.id)


async def spawn_flow(
    client: AgentClient, spec: InferenceSpec, settings: OperatorSettings
) -> AsyncIterator[Event]:
    """`rbee workers spawn`: the spawn and loading phases alone, ending with the worker."""
    async for event in _spawn(client, spec, settings):
        if isinstance(event, WorkerInfo):
            yield Finished(f"worker {event.id} is {event.state} at {event.url}",
                           event.model_dump())
        else:
            yield event


MB = 1024 * 1024


def _download_progress(done: int, total: int, speed_mbps: float | None) -> Progress:
    speed = f"{speed_mbps:.1f} MB/s" if speed_mbps else ""
    return Progress("download", round(done / MB, 1), round(total / MB, 1), "MB", speed)


async def download_flow(client: AgentClient, model_ref: str) -> AsyncIterator[Event]:
    """`rbee models download` and the models screen: B37's progress to the operator."""
    parse_model_ref(model_ref)
    yield PhaseStarted("download", f"Fetching {model_ref} on {client.node}")
    job = await client.download(model_ref)
    if job.stage == "complete":
        yield Finished(f"{job.model_id} is already on {client.node}", job.model_dump())
        return
    if job.joined:
        yield PhaseDone("download", "joined the download already under way")
    try:
        async for event in client.download_progress(job.job_id):
            if event.stage == "downloading":
                yield _download_progress(event.bytes_downloaded, event.bytes_total,
                                         event.speed_mbps)
            elif event.stage == "failed" and event.error is not None:
                raise RbeeError.from_body(ErrorBody(error=event.error))
            elif event.stage == "complete":
                yield Finished(f"{event.model_id} downloaded to {event.local_path}",
                               event.model_dump())
                return
    except asyncio.CancelledError:
        with contextlib.suppress(RbeeError, TimeoutError):
            async with asyncio.timeout(5):
                await asyncio.shield(client.cancel_download(job.job_id))
        raise


def _body(spec: InferenceSpec) -> dict[str, Any]:
    body: dict[str, Any] = {"max_tokens": spec.max_tokens, "temperature": spec.temperature,
                            "top_p": spec.top_p, "stream": True}
    if spec.messages is not None:
        body["messages"] = [m.model_dump() for m in spec.messages]
    else:
        body["prompt"] = spec.prompt
    if spec.seed is not None:
        body["seed"] = spec.seed
    if spec.stop:
        body["stop"] = spec.stop
    return body


async def _stream(
    client: AgentClient, worker: WorkerInfo, spec: InferenceSpec, settings: OperatorSettings
) -> AsyncIterator[Event]:
    yield PhaseStarted("inference", f"Generating on worker {worker.id}")
    request_id = uuid.uuid4().hex
    parts: list[str] = []
    started = time.perf_counter()
    first_token: float | None = None
    retries = settings.busy_retry_s
    attempt = 0
    while True:
        stream = client.inference(worker.id, _body(spec), request_id)
        try:
            async for data in _with_stall_timeout(stream, settings.token_stall_s):
                if "token" in data:
                    if first_token is None:
                        first_token = time.perf_counter()
                    parts.append(str(data["token"]))
                    yield Token(str(data["token"]), int(data.get("index", len(parts) - 1)))
                elif "queued" in data and not parts:
                    yield Queued(int(data["queued"]))
                elif data.get("done"):
                    yield _summary(data, parts, started, first_token, worker, request_id)
                    return
                elif "error" in data:
                    raise RbeeError.from_body(ErrorBody.model_validate(data))
            return
        except RbeeError as err:
            if err.code == ErrorCode.ALL_SLOTS_BUSY and not parts and attempt < len(retries):
                wait = retries[attempt]
                attempt += 1
                yield Attempt("inference", attempt, len(retries) + 1, err, retry_in_s=wait)
                await asyncio.sleep(wait)
                continue
            if err.code == ErrorCode.ALL_SLOTS_BUSY:
                err.hint = (f"Worker {worker.id} stayed busy. Try again later, spawn another "
                            "worker (rbee workers spawn), or start workers with more slots.")
                raise err from None
            if err.code == ErrorCode.STREAM_STALLED:
                await _cancel_quietly(client, worker.id, request_id)
            if parts and err.code in (ErrorCode.WORKER_CRASHED, ErrorCode.STREAM_INTERRUPTED,
                                      ErrorCode.STREAM_STALLED):
                raise _interrupted(err, parts, spec, request_id) from None
            raise
        except asyncio.CancelledError:
            await asyncio.shield(_cancel_quietly(client, worker.id, request_id))
            raise
        finally:
            await stream.aclose()  # type: ignore[attr-defined]


async def _with_stall_timeout(
    stream: AsyncIterator[dict[str, Any]], stall_s: float
) -> AsyncIterator[dict[str, Any]]:
    """B54: no event for `stall_s` seconds ends the stream with STREAM_STALLED."""
    iterator = stream.__aiter__()
    while True:
        try:
            async with asyncio.timeout(stall_s):
                item = await iterator.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise RbeeError(
                ErrorCode.STREAM_STALLED,
                f"No token for {stall_s:g} s: the request was cancelled",
                hint="The worker may be overloaded or stuck; check rbee workers health.",
            ) from None
        yield item


async def _cancel_quietly(client: AgentClient, worker_id: str, request_id: str) -> None:
    try:
        async with asyncio.timeout(5):
            await client.cancel(worker_id, request_id)
    except (RbeeError, TimeoutError):
        pass


def _summary(data: dict[str, Any], parts: list[str], started: float,
             first_token: float | None, worker: WorkerInfo, request_id: str) -> Finished:
    elapsed = time.perf_counter() - started
    tokens = int(data.get("total_tokens", len(parts)))
    gen_time = elapsed - ((first_token - started) if first_token else 0.0)
    tok_s = (tokens - 1) / gen_time if tokens > 1 and gen_time > 0 else 0.0
    return Finished(
        f"{tokens} tokens in {elapsed:.2f} s ({tok_s:.1f} tokens/s)",
        {"text": "".join(parts), "tokens": tokens, "duration_ms": round(elapsed * 1000, 1),
         "tokens_per_s": round(tok_s, 2), "finish_reason": data.get("finish_reason"),
         "ttft_ms": round((first_token - started) * 1000, 1) if first_token else None,
         "worker_id": worker.id, "request_id": request_id},
    )


def _interrupted(err: RbeeError, parts: list[str], spec: InferenceSpec,
                 request_id: str) -> RbeeError:
    """B53: keep what arrived, say where it is and how much of it there is."""
    folder = state_dir() / "partial"
    folder.mkdir(parents=True, exist_ok=True)
    path: Path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{request_id[:8]}.txt"
    path.write_text("".join(parts))
    return RbeeError(
        err.code,
        f"{err.message} — got {len(parts)} of {spec.max_tokens} tokens; partial text saved "
        f"to {path}",
        hint=err.hint or "Run the request again; the worker will be respawned if needed.",
        details={**err.details, "partial_path": str(path), "tokens": len(parts),
                 "max_tokens": spec.max_tokens},
    )
