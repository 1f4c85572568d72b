"""The inference flow as one async stream of typed events (B50-B57, principle 1).

existing worker? → agent health and version → the model exists → spawn (or the queue of a
busy worker) → loading progress → queue position → tokens → summary. The CLI prints these
events and the TUI renders them; neither holds any flow logic. Inputs are validated before
any network (B57). Cancelling the consuming task (Ctrl+C, Esc) cancels the request on the
worker (B55). A reply is a success only when it ended as asked (`stop` or `length`) and
said something (B144); anything else is an error that keeps what arrived (B53).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from rbee_agent.protocol import (
    ChatMessage,
    DoneEvent,
    ErrorBody,
    ErrorCode,
    InferenceRequest,
    QueuedEvent,
    RbeeError,
    StreamErrorEvent,
    TokenEvent,
    WorkerInfo,
)
from rbee_tui.client import AgentClient, localize_hint
from rbee_tui.config import Config, OperatorSettings, state_dir
from rbee_tui.events import (
    Attempt,
    Event,
    Finished,
    Note,
    PhaseDone,
    PhaseStarted,
    Queued,
    Token,
)
from rbee_tui.ops import nodes as node_ops
from rbee_tui.ops.models import download as download_flow
from rbee_tui.ops.models import require_model
from rbee_tui.ops.workers import SpawnSpec, spawn_events, validate_spawn

__all__ = ["InferenceSpec", "download_flow", "run_inference", "validate"]

ClientOpener = Callable[[str], Awaitable[AgentClient]]
ENDED_AS_ASKED = ("stop", "length")
BUSY_CODES = (ErrorCode.QUEUE_FULL, ErrorCode.ALL_SLOTS_BUSY)
SPAWN_REFUSALS = (ErrorCode.INSUFFICIENT_RAM, ErrorCode.INSUFFICIENT_VRAM,
                  ErrorCode.NO_FREE_PORT)


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
    # `rbee infer --prompt` sends a chat message; a model without a chat template gets
    # this plain prompt instead (B144)
    plain_fallback: str | None = None


def validate(spec: InferenceSpec, config: Config) -> None:
    """B57: every input checked before anything touches the network."""
    validate_spawn(SpawnSpec(spec.node, spec.model_ref, spec.backend, spec.device), config)
    if not 0.0 <= spec.temperature <= 2.0:
        raise RbeeError(ErrorCode.INVALID_REQUEST,
                        f"Temperature {spec.temperature:g} is out of range",
                        hint="Use a temperature from 0 to 2 (0 = greedy).")
    if spec.max_tokens <= 0:
        raise RbeeError(ErrorCode.INVALID_REQUEST,
                        f"--max-tokens must be greater than 0, not {spec.max_tokens}",
                        hint="For example: --max-tokens 100.")
    if (spec.prompt is None) == (spec.messages is None):
        raise RbeeError(ErrorCode.INVALID_REQUEST, "Give a prompt or a chat history, not both",
                        hint="Use --prompt (a chat message; --raw for a plain completion).")
    text = spec.prompt if spec.prompt is not None else (
        spec.messages[-1].content if spec.messages else "")
    if not text.strip():
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
        worker: WorkerInfo | None = None
        async for event in _choose_worker(client, spec, settings):
            if isinstance(event, WorkerInfo):
                worker = event
            else:
                yield event
        if worker is None:
            raise RbeeError(ErrorCode.WORKER_START_FAILED, "The spawned worker never got ready")
        async for event in _stream(client, worker, spec, settings):
            yield event
        with contextlib.suppress(RbeeError, OSError):
            await asyncio.to_thread(node_ops.touch, config, spec.node, health.version)
    finally:
        await client.aclose()


async def _choose_worker(client: AgentClient, spec: InferenceSpec,
                         settings: OperatorSettings) -> AsyncIterator[Event | WorkerInfo]:
    """B51, B148: an idle worker; else a busy one's queue, unless its queue is long and the
    node has room for another copy; else a new worker, once the model is known to exist."""
    yield PhaseStarted("worker", f"Looking for a worker with {spec.model_ref}")
    matching = [w for w in await client.workers() if _matches(w, spec)]
    idle = next((w for w in matching if w.state == "idle"), None)
    if idle is not None:
        yield PhaseDone("worker", f"warm: reusing worker {idle.id}")
        yield idle
        return
    busy = min((w for w in matching if w.state == "busy"), key=lambda w: w.queued,
               default=None)
    threshold = settings.spawn_when_queued
    if busy is not None and (threshold == 0 or busy.queued < threshold):
        yield PhaseDone("worker", f"worker {busy.id} is busy: joining its queue "
                                  f"({busy.queued} waiting)")
        yield busy
        return
    await require_model(client, spec.model_ref)
    spawn = SpawnSpec(spec.node, spec.model_ref, spec.backend, spec.device,
                      new=busy is not None)
    yield PhaseDone("worker", "none idle: spawning one" if busy is None else
                    f"worker {busy.id} has {busy.queued} waiting: spawning another")
    try:
        async for event in spawn_events(client, spawn, settings):
            yield event
    except RbeeError as err:
        if busy is None or err.code not in SPAWN_REFUSALS:
            raise
        yield Note("spawn", f"no room for another worker ({err.message}): joining the "
                            f"queue of {busy.id}")
        yield busy


def _request(spec: InferenceSpec, request_id: str) -> InferenceRequest:
    return InferenceRequest(
        prompt=spec.prompt, messages=spec.messages, max_tokens=spec.max_tokens,
        temperature=spec.temperature, top_p=spec.top_p, seed=spec.seed, stop=spec.stop,
        stream=True, request_id=request_id,
    )


StreamEvent = TokenEvent | DoneEvent | QueuedEvent | StreamErrorEvent


def _parse(data: dict[str, object]) -> StreamEvent:
    """One SSE frame of an inference stream as its protocol model (parsed once, here)."""
    model: type[StreamEvent] = (TokenEvent if "token" in data else DoneEvent if "done" in data
                                else QueuedEvent if "queued" in data else StreamErrorEvent)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RbeeError(ErrorCode.MALFORMED_REPLY,
                        f"The stream sent a frame rbee cannot read: {str(data)[:80]}",
                        details={"problem": exc.errors()[0]["msg"]}) from None


def _no_template(err: RbeeError) -> bool:
    return err.code == ErrorCode.INVALID_REQUEST and "chat template" in err.message


@dataclass
class _Reply:
    """One inference across its attempts: what has arrived and when."""

    worker: WorkerInfo
    spec: InferenceSpec
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    parts: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    attempt: int = 1

    def event(self, frame: StreamEvent) -> Event:
        """A worker's frame as the flow's event; an error frame raises."""
        if isinstance(frame, TokenEvent):
            if self.first_token is None:
                self.first_token = time.perf_counter()
            self.parts.append(frame.token)
            return Token(frame.token, frame.index)
        if isinstance(frame, QueuedEvent):
            return Queued(frame.queued)
        if isinstance(frame, DoneEvent):
            return _finished(frame, self.parts, self.started, self.first_token, self.worker,
                             self.spec, self.request_id)
        raise RbeeError.from_body(ErrorBody(error=frame.error))


async def _stream(
    client: AgentClient, worker: WorkerInfo, spec: InferenceSpec, settings: OperatorSettings
) -> AsyncIterator[Event]:
    yield PhaseStarted("inference", f"Generating on worker {worker.id}")
    reply = _Reply(worker, spec)
    while True:
        stream = client.inference(worker.id, _request(spec, reply.request_id), reply.request_id)
        try:
            async for data in _with_stall_timeout(stream, settings.token_stall_s):
                event = reply.event(_parse(data))
                yield event
                if isinstance(event, Finished):
                    return
            return
        except RbeeError as err:
            again, wait_s = await _recover(err, reply, client, settings)
            yield again
            if wait_s:
                await asyncio.sleep(wait_s)
        except asyncio.CancelledError:
            await asyncio.shield(_cancel_quietly(client, worker.id, reply.request_id))
            raise
        finally:
            await stream.aclose()  # type: ignore[attr-defined]


async def _recover(err: RbeeError, reply: _Reply, client: AgentClient,
                   settings: OperatorSettings) -> tuple[Event, float]:
    """What to do after a failed attempt: try again (the event to show, and how long to wait
    first) or raise the error as the user should see it."""
    spec, worker = reply.spec, reply.worker
    if err.hint:
        err.hint = localize_hint(err.hint, spec.node)
    if not reply.parts and spec.plain_fallback is not None and _no_template(err):
        spec.prompt, spec.messages, spec.plain_fallback = spec.plain_fallback, None, None
        return Note("inference", "the model has no chat template: sending the prompt as a "
                                 "plain completion"), 0.0
    if err.code in BUSY_CODES and not reply.parts:
        retry = settings.queue_full_retry
        wait = retry.wait_after(reply.attempt)
        if wait is not None:
            wait = float(err.details.get("retry_after_s") or wait)
            attempt = Attempt("inference", reply.attempt, retry.attempts, err, retry_in_s=wait)
            reply.attempt += 1
            return attempt, wait
        err.hint = (f"Worker {worker.id} stayed busy. Try again later, spawn another worker "
                    "(rbee workers spawn --new), or start workers with more slots.")
        raise err from None
    if err.code == ErrorCode.STREAM_STALLED:
        await _cancel_quietly(client, worker.id, reply.request_id)
    if reply.parts and err.code in (ErrorCode.WORKER_CRASHED, ErrorCode.STREAM_INTERRUPTED,
                                    ErrorCode.STREAM_STALLED):
        raise _interrupted(err, reply.parts, spec, reply.request_id, worker) from None
    raise err


stream_on = _stream  # the generation phase alone, on a worker the caller already has


async def _with_stall_timeout(
    stream: AsyncIterator[dict[str, object]], stall_s: float
) -> AsyncIterator[dict[str, object]]:
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


def _finished(done: DoneEvent, parts: list[str], started: float, first_token: float | None,
              worker: WorkerInfo, spec: InferenceSpec, request_id: str) -> Finished:
    """B144: the summary of a reply that ended as asked and said something; any other end
    is an error that saves what arrived."""
    text = "".join(parts)
    if done.finish_reason not in ENDED_AS_ASKED:
        cut = RbeeError(
            ErrorCode.STREAM_INTERRUPTED,
            f"The reply was cut off on worker {worker.id} (finish reason "
            f"'{done.finish_reason}': the worker was stopped or failed)",
            hint=f"See why: rbee logs --node {spec.node} --worker {worker.id}; run the "
            "request again to get a whole reply.",
            details={"finish_reason": done.finish_reason},
        )
        raise _interrupted(cut, parts, spec, request_id, worker)
    if not text.strip():
        plain = spec.prompt is not None
        raise RbeeError(
            ErrorCode.GENERATION_FAILED,
            f"The model answered nothing: it ended its reply after {done.total_tokens} "
            f"token(s) (finish reason '{done.finish_reason}')",
            hint="Instruct models often end a plain completion at once: drop --raw so the "
            "prompt goes as a chat message." if plain else
            "Rephrase the prompt, or sample differently (--temperature, --seed).",
            details={"finish_reason": done.finish_reason, "tokens": done.total_tokens,
                     "reason": "empty"},
        )
    elapsed = time.perf_counter() - started
    tokens = done.total_tokens
    gen_time = elapsed - ((first_token - started) if first_token else 0.0)
    tok_s = (tokens - 1) / gen_time if tokens > 1 and gen_time > 0 else 0.0
    return Finished(
        f"{tokens} tokens in {elapsed:.2f} s ({tok_s:.1f} tokens/s)",
        {"text": text, "tokens": tokens, "duration_ms": round(elapsed * 1000, 1),
         "tokens_per_s": round(tok_s, 2), "finish_reason": done.finish_reason,
         "ttft_ms": round((first_token - started) * 1000, 1) if first_token else None,
         "worker_id": worker.id, "request_id": request_id},
    )


def _interrupted(err: RbeeError, parts: list[str], spec: InferenceSpec, request_id: str,
                 worker: WorkerInfo) -> RbeeError:
    """B53: keep what arrived, say where it is and how much of it there is."""
    folder = state_dir() / "partial"
    folder.mkdir(parents=True, exist_ok=True)
    path: Path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{request_id[:8]}.txt"
    path.write_text("".join(parts))
    return RbeeError(
        err.code,
        f"{err.message} — got {len(parts)} of {spec.max_tokens} tokens; partial text saved "
        f"to {path}",
        hint=err.hint or f"See why: rbee logs --node {spec.node} --worker {worker.id}; run "
        "the request again (the worker is respawned if needed).",
        details={**err.details, "partial_path": str(path), "tokens": len(parts),
                 "max_tokens": spec.max_tokens},
    )
