"""The wire contract between rbee, the agent and its workers.

Every request body, reply body and SSE event that crosses a process boundary is a pydantic
model here, and so is the one error shape (B39). Both sides import this module, so a change
here is a protocol change: make it deliberately and keep it backwards-readable.

This module must stay import-light (pydantic and the stdlib only): the operator side and the
node side both load it, and neither may drag the other's dependencies in.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

API_VERSION = "1"
REQUEST_ID_HEADER = "X-Request-Id"
"""The header that carries an inference request's id, both ways (client, agent, worker)."""

# --------------------------------------------------------------------------- errors


class ErrorCode(StrEnum):
    """Every error code rbee puts on the wire, with the HTTP status it travels under."""

    # request shape
    INVALID_REQUEST = "INVALID_REQUEST"
    REQUEST_TOO_LARGE = "REQUEST_TOO_LARGE"
    PROMPT_TOO_LONG = "PROMPT_TOO_LONG"
    NOT_FOUND = "NOT_FOUND"
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    # auth (B22)
    MISSING_API_KEY = "MISSING_API_KEY"
    INVALID_API_KEY = "INVALID_API_KEY"
    # worker state (B41-B46)
    MODEL_FILE_INVALID = "MODEL_FILE_INVALID"
    MODEL_LOADING = "MODEL_LOADING"
    MODEL_LOAD_FAILED = "MODEL_LOAD_FAILED"
    ALL_SLOTS_BUSY = "ALL_SLOTS_BUSY"
    QUEUE_FULL = "QUEUE_FULL"
    WORKER_DRAINING = "WORKER_DRAINING"
    GENERATION_FAILED = "GENERATION_FAILED"
    # client side
    CONNECTION_FAILED = "CONNECTION_FAILED"
    MALFORMED_REPLY = "MALFORMED_REPLY"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    # models and catalog (B35-B38)
    INVALID_MODEL_REF = "INVALID_MODEL_REF"
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    MODEL_ALREADY_EXISTS = "MODEL_ALREADY_EXISTS"
    MODEL_IN_USE = "MODEL_IN_USE"
    MODEL_PROTECTED = "MODEL_PROTECTED"
    # model downloads (B37)
    MODEL_ACCESS_DENIED = "MODEL_ACCESS_DENIED"
    INSUFFICIENT_DISK = "INSUFFICIENT_DISK"
    CHECKSUM_MISMATCH = "CHECKSUM_MISMATCH"
    DOWNLOAD_FAILED = "DOWNLOAD_FAILED"
    DOWNLOAD_NOT_FOUND = "DOWNLOAD_NOT_FOUND"
    # agent and supervisor (B20-B32)
    INVALID_CONFIG = "INVALID_CONFIG"
    INVALID_BACKEND = "INVALID_BACKEND"
    BACKEND_UNAVAILABLE = "BACKEND_UNAVAILABLE"
    DEVICE_NOT_FOUND = "DEVICE_NOT_FOUND"
    INSUFFICIENT_RAM = "INSUFFICIENT_RAM"
    INSUFFICIENT_VRAM = "INSUFFICIENT_VRAM"
    NO_FREE_PORT = "NO_FREE_PORT"
    WORKER_NOT_FOUND = "WORKER_NOT_FOUND"
    WORKER_START_FAILED = "WORKER_START_FAILED"
    WORKER_CRASHED = "WORKER_CRASHED"
    LOADING_TIMEOUT = "LOADING_TIMEOUT"
    AGENT_SHUTTING_DOWN = "AGENT_SHUTTING_DOWN"
    CATALOG_BUSY = "CATALOG_BUSY"
    CATALOG_CORRUPT = "CATALOG_CORRUPT"
    DATA_DIR_LOCKED = "DATA_DIR_LOCKED"
    PORT_IN_USE = "PORT_IN_USE"
    # operator side (B01-B13, B50-B57)
    NODE_NOT_FOUND = "NODE_NOT_FOUND"
    NODE_EXISTS = "NODE_EXISTS"
    SSH_KEY_MISSING = "SSH_KEY_MISSING"
    SSH_UNREACHABLE = "SSH_UNREACHABLE"
    SSH_AUTH_FAILED = "SSH_AUTH_FAILED"
    SSH_HOST_KEY_UNKNOWN = "SSH_HOST_KEY_UNKNOWN"
    SSH_HOST_KEY_CHANGED = "SSH_HOST_KEY_CHANGED"
    SSH_COMMAND_FAILED = "SSH_COMMAND_FAILED"
    AGENT_NOT_INSTALLED = "AGENT_NOT_INSTALLED"
    AGENT_UNREACHABLE = "AGENT_UNREACHABLE"
    VERSION_MISMATCH = "VERSION_MISMATCH"
    INSTALL_FAILED = "INSTALL_FAILED"
    STREAM_STALLED = "STREAM_STALLED"
    STREAM_INTERRUPTED = "STREAM_INTERRUPTED"
    CANCELLED = "CANCELLED"


HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.REQUEST_TOO_LARGE: 413,
    ErrorCode.PROMPT_TOO_LONG: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.MISSING_API_KEY: 401,
    ErrorCode.INVALID_API_KEY: 401,
    ErrorCode.MODEL_FILE_INVALID: 400,
    ErrorCode.MODEL_LOADING: 503,
    ErrorCode.MODEL_LOAD_FAILED: 503,
    ErrorCode.ALL_SLOTS_BUSY: 503,
    ErrorCode.QUEUE_FULL: 503,
    ErrorCode.WORKER_DRAINING: 503,
    ErrorCode.GENERATION_FAILED: 500,
    ErrorCode.CONNECTION_FAILED: 502,
    ErrorCode.MALFORMED_REPLY: 502,
    ErrorCode.INTERNAL_ERROR: 500,
    ErrorCode.INVALID_MODEL_REF: 400,
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.MODEL_ALREADY_EXISTS: 409,
    ErrorCode.MODEL_IN_USE: 409,
    ErrorCode.MODEL_PROTECTED: 409,
    ErrorCode.MODEL_ACCESS_DENIED: 403,
    ErrorCode.INSUFFICIENT_DISK: 507,
    ErrorCode.CHECKSUM_MISMATCH: 502,
    ErrorCode.DOWNLOAD_FAILED: 502,
    ErrorCode.DOWNLOAD_NOT_FOUND: 404,
    ErrorCode.INVALID_CONFIG: 400,
    ErrorCode.INVALID_BACKEND: 400,
    ErrorCode.BACKEND_UNAVAILABLE: 409,
    ErrorCode.DEVICE_NOT_FOUND: 404,
    ErrorCode.INSUFFICIENT_RAM: 507,
    ErrorCode.INSUFFICIENT_VRAM: 507,
    ErrorCode.NO_FREE_PORT: 503,
    ErrorCode.WORKER_NOT_FOUND: 404,
    ErrorCode.WORKER_START_FAILED: 502,
    ErrorCode.WORKER_CRASHED: 502,
    ErrorCode.LOADING_TIMEOUT: 504,
    ErrorCode.AGENT_SHUTTING_DOWN: 503,
    ErrorCode.CATALOG_BUSY: 503,
    ErrorCode.CATALOG_CORRUPT: 503,
    ErrorCode.DATA_DIR_LOCKED: 409,
    ErrorCode.PORT_IN_USE: 409,
    ErrorCode.NODE_NOT_FOUND: 404,
    ErrorCode.NODE_EXISTS: 409,
    ErrorCode.SSH_KEY_MISSING: 400,
    ErrorCode.SSH_UNREACHABLE: 502,
    ErrorCode.SSH_AUTH_FAILED: 401,
    ErrorCode.SSH_HOST_KEY_UNKNOWN: 409,
    ErrorCode.SSH_HOST_KEY_CHANGED: 409,
    ErrorCode.SSH_COMMAND_FAILED: 502,
    ErrorCode.AGENT_NOT_INSTALLED: 404,
    ErrorCode.AGENT_UNREACHABLE: 502,
    ErrorCode.VERSION_MISMATCH: 409,
    ErrorCode.INSTALL_FAILED: 502,
    ErrorCode.STREAM_STALLED: 504,
    ErrorCode.STREAM_INTERRUPTED: 502,
    ErrorCode.CANCELLED: 499,
}


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class ErrorBody(BaseModel):
    """The one error shape (B39): `{"error": {"code", "message", "details"}}`."""

    error: ErrorDetail


class RbeeError(Exception):
    """The one error type (principle 2).

    `message` says what went wrong and where; `hint` says what to do next. On the wire the
    hint rides in `details["hint"]` so the body keeps the fixed B39 shape.
    """

    def __init__(
        self,
        code: ErrorCode | str,
        message: str,
        hint: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = str(code)
        self.message = message
        self.details = dict(details or {})
        self.hint = hint if hint is not None else self.details.get("hint")

    @property
    def http_status(self) -> int:
        try:
            return HTTP_STATUS[ErrorCode(self.code)]
        except ValueError:
            return 500

    def to_body(self) -> ErrorBody:
        details = dict(self.details)
        if self.hint:
            details["hint"] = self.hint
        return ErrorBody(error=ErrorDetail(code=self.code, message=self.message, details=details))

    @classmethod
    def from_body(cls, body: ErrorBody) -> RbeeError:
        details = dict(body.error.details)
        hint = details.pop("hint", None)
        return cls(body.error.code, body.error.message, hint=hint, details=details)

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\nHint: {self.hint}"


# --------------------------------------------------------------------------- worker

WorkerState = Literal["loading", "idle", "busy", "draining", "stopping", "failed"]
Backend = Literal["cpu", "cuda", "metal"]
BACKENDS: tuple[str, ...] = ("cpu", "cuda", "metal")
FinishReason = Literal["stop", "length", "cancelled", "error"]
# A request id travels in a URL path and an HTTP header: printable ASCII without separators.
REQUEST_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"


class HealthReply(BaseModel):
    status: Literal["ok"] = "ok"
    version: str
    api_version: str = API_VERSION
    worker_id: str | None = None
    state: WorkerState | None = None
    slots_total: int | None = None
    slots_busy: int | None = None
    tokens_served: int | None = None
    # A worker's request queue (B100): requests waiting for a slot, and how many may wait.
    queued: int | None = None
    queue_depth: int | None = None
    # Layers llama.cpp was asked to put on the GPU (0 on a CPU worker), of layers_total.
    gpu_layers: int | None = None
    layers_total: int | None = None


class ReadyReply(BaseModel):
    """B42: `ready` flips once the model is loaded; `progress_url` while loading."""

    ready: bool
    state: WorkerState
    model_loaded: bool
    progress_url: str | None = None
    error: ErrorDetail | None = None
    # Once loaded: requests waiting for a slot, and how many may wait (B100).
    queued: int | None = None
    queue_depth: int | None = None


class LoadingProgress(BaseModel):
    """One event of a worker's `GET /v1/loading/progress` (B41), and of the agent's
    `GET /v1/workers/{id}/progress`, which adds `starting` (process up, model not yet
    opening) before the worker's own events.

    A worker spawned for an `hf:` model the node does not have yet first reports
    `downloading` (B37), with the `bytes_*` and `speed_mbps` fields of `DownloadProgress`
    and no layers yet (0 of 0); the other stages never carry those fields.
    """

    stage: Literal["downloading", "starting", "loading", "ready", "failed"]
    layers_loaded: int
    layers_total: int
    error: ErrorDetail | None = None
    bytes_downloaded: int | None = None
    bytes_total: int | None = None
    speed_mbps: float | None = None


# Bounds on a chat (B106): checked by the schema, before any template is rendered.
MAX_CHAT_MESSAGES = 1024
MAX_MESSAGE_CHARS = 1_000_000
MAX_GRAMMAR_CHARS = 64 * 1024


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_MESSAGE_CHARS)


class InferenceRequest(BaseModel):
    """B43: a prompt or chat messages, with sampling settings. Bounds checked here (B57).

    Sampling runs in llama.cpp (B101), in this order: repetition penalties, grammar, top-k,
    top-p, min-p, temperature, then a seeded draw (greedy at temperature 0). `top_k` 0,
    `top_p` 1, `min_p` 0, `repeat_penalty` 1 and the two other penalties 0 switch a stage
    off. `ignore_eos` keeps generating past end-of-text (benchmarks: fixed-length runs).
    """

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(
        default=None, min_length=1, max_length=MAX_CHAT_MESSAGES
    )
    max_tokens: int = Field(default=256, gt=0, le=32768)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    top_k: int = Field(default=40, ge=0, le=1000)
    min_p: float = Field(default=0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(default=1.0, gt=0.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    grammar: str | None = Field(default=None, min_length=1, max_length=MAX_GRAMMAR_CHARS)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    ignore_eos: bool = False
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    stop: list[str] = Field(default_factory=list, max_length=16)
    stream: bool = True
    request_id: str | None = Field(default=None, min_length=1, max_length=128,
                                   pattern=REQUEST_ID_PATTERN)

    @model_validator(mode="before")
    @classmethod
    def _stop_may_be_a_string(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("stop"), str):
            data = {**data, "stop": [data["stop"]]}
        return data

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> InferenceRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if any(s == "" for s in self.stop):
            raise ValueError("stop strings must not be empty")
        return self


class TokenLogprob(BaseModel):
    """One candidate token with its log-probability (natural log, softmax of the logits)."""

    token: str
    logprob: float


class TokenEvent(BaseModel):
    """One step of a stream. With `top_logprobs` asked for, every sampled token gets its own
    event (its text may then be empty while a stop string or a UTF-8 sequence is held back)
    carrying the token's `logprob` and the `top_logprobs` most likely candidates."""

    token: str
    index: int
    logprob: float | None = None
    top_logprobs: list[TokenLogprob] | None = None


class QueuedEvent(BaseModel):
    """Sent while a request waits in the worker's queue, before its first token (B100):
    `queued` is how many requests are ahead of it. Sent again when that number changes."""

    queued: int


class DoneEvent(BaseModel):
    done: Literal[True] = True
    total_tokens: int
    duration_ms: float
    finish_reason: FinishReason
    request_id: str
    prompt_tokens: int = 0
    ttft_ms: float | None = None
    # Prompt tokens whose KV cache a previous request left behind (B102): not recomputed.
    cached_tokens: int | None = None


class StreamErrorEvent(BaseModel):
    """An error after the stream has started (status 200 already sent)."""

    error: ErrorDetail


class InferenceResult(BaseModel):
    """The reply to `stream: false`."""

    request_id: str
    text: str
    total_tokens: int
    duration_ms: float
    finish_reason: FinishReason
    prompt_tokens: int = 0


class WorkerReadyCallback(BaseModel):
    """B27: the worker tells its agent it is ready, authenticated with its own key."""

    worker_id: str
    url: str
    model: str
    backend: Backend
    device: int
    pid: int
    slots: int
    layers_total: int
    load_ms: float
    gpu_layers: int | None = None
    tensor_split: list[float] | None = None
    queue_depth: int | None = None


class ShutdownReply(BaseModel):
    state: WorkerState
    active_requests: int


# --------------------------------------------------------------------------- SSE framing

SSE_DONE = "[DONE]"


def sse_frame(payload: BaseModel | str) -> bytes:
    """One SSE frame, `data: <json>\\n\\n`; JSON is compact and on one line by construction."""
    data = payload if isinstance(payload, str) else payload.model_dump_json(exclude_none=True)
    return f"data: {data}\n\n".encode()


async def iter_sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The `data` of each event in a stream of SSE lines (as `httpx.Response.aiter_lines()`
    gives them): `data:` lines of one event joined with newlines, comments and other fields
    skipped, an event ending at a blank line. The one SSE reader of both sides."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


def parse_sse_data(data: str) -> dict[str, Any] | None:
    """Decode one frame's data; `None` for the `[DONE]` terminator.

    Raises RbeeError(MALFORMED_REPLY) on anything that is not a JSON object (B13).
    """
    if data == SSE_DONE:
        return None
    try:
        value = json.loads(data)
    except json.JSONDecodeError as exc:
        raise RbeeError(
            ErrorCode.MALFORMED_REPLY,
            f"The stream sent a frame that is not JSON: {data[:80]!r}",
            details={"position": exc.pos},
        ) from None
    if not isinstance(value, dict):
        raise RbeeError(
            ErrorCode.MALFORMED_REPLY,
            f"The stream sent a frame that is not an object: {data[:80]!r}",
        )
    return value


# --------------------------------------------------------------------------- node (B23)


class GpuInfo(BaseModel):
    """One GPU as NVML sees it. A field NVML refuses on this card is `None`, not an error.

    Sizes are MiB (written MB throughout rbee, as nvidia-smi does).
    """

    index: int
    name: str
    uuid: str | None = None
    vram_total_mb: int | None = None
    vram_used_mb: int | None = None
    vram_free_mb: int | None = None
    utilization_percent: int | None = None
    temperature_c: int | None = None
    power_w: float | None = None


# --------------------------------------------------------------------------- split (B200-B219)

RpcServerState = Literal["starting", "ready", "stopping", "stopped", "failed"]


class RpcServerRequest(BaseModel):
    """`POST /v1/rpc-servers`: serve one device of this node to a split worker (B201)."""

    model_config = ConfigDict(extra="forbid")

    device: str = Field(default="cpu", pattern=r"^(cpu|cuda[0-9]{1,2})$")
    threads: int | None = Field(default=None, ge=1, le=256)
    # The most memory (MiB) this node offers the split; None: what the device has free.
    mem_mb: int | None = Field(default=None, ge=1)


class RpcServerInfo(BaseModel):
    """One llama.cpp RPC server process. It listens on `127.0.0.1:port` of its node only;
    `free_mb` is the memory its device offers (RAM for cpu, VRAM for a GPU), in MiB."""

    id: str
    device: str
    port: int
    pid: int | None
    state: RpcServerState
    started_at: float
    free_mb: int | None = None
    clients: int = 0  # connections a split worker (through its tunnel) holds now
    error: ErrorDetail | None = None


class RpcPeer(BaseModel):
    """One RPC server a split worker uses: the node it runs on (for messages), the endpoint
    the head node reaches it at (a tunnel's loopback end), and the memory it offers."""

    node: str = Field(min_length=1, max_length=64)
    endpoint: str = Field(pattern=r"^127\.0\.0\.1:[0-9]{1,5}$")
    free_mb: int = Field(ge=0)


class SplitPart(BaseModel):
    """Where a split worker's layers are: `node` (None: the head node itself), how many."""

    node: str | None
    layers: int
    endpoint: str | None = None


class NodeInfo(BaseModel):
    """`GET /v1/node`: what this machine has and how busy it is (B23). Sizes in MiB."""

    hostname: str
    os: str
    arch: str
    cpu_count: int
    cpu_percent: float
    load_average: tuple[float, float, float] | None = None
    ram_total_mb: int
    ram_available_mb: int
    models_dir: str
    disk_free_mb: int
    backends: list[Backend]
    gpus: list[GpuInfo] = Field(default_factory=list)
    nvidia_driver: str | None = None
    # Who answers (so the operator can tell this agent from another on the same port), and
    # whether this node's llama.cpp can offload to a GPU at all.
    agent_pid: int | None = None
    agent_instance_id: str | None = None
    agent_started_at: float | None = None
    gpu_offload: bool | None = None
    # llama.cpp RPC servers this agent runs for split workers on other nodes (B201).
    rpc_servers: list[RpcServerInfo] = Field(default_factory=list)


# --------------------------------------------------------------------------- models (B35)

ModelProvider = Literal["bundled", "file", "hf"]


class CatalogEntry(BaseModel):
    """One model the node knows (B35); `GET /v1/models` returns a list of these.

    `id` is the short name a user types; `reference` is where the model came from
    (`hf:org/repo/file.gguf`, `file:///abs/path.gguf`, `bundled:<id>`); `local_path` is the
    GGUF file on this node. Metadata comes from the GGUF header (B38).
    """

    id: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]*$")
    provider: ModelProvider
    reference: str
    local_path: str
    size_bytes: int = Field(ge=0)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    quantization: str
    architecture: str
    layers: int = Field(ge=0)
    context_length: int = Field(ge=0)
    added_at: float


# --------------------------------------------------------------------------- agent (B24-B34)


class SpawnRequest(BaseModel):
    """`POST /v1/workers`. `backend` is checked by the supervisor (INVALID_BACKEND names the
    valid ones), not by the schema, so the error says more than "invalid literal"."""

    model_config = ConfigDict(extra="forbid")

    model_ref: str = Field(min_length=1, max_length=2048)
    backend: str = "cpu"
    # None: cpu → 0; cuda → the GPU with the most free VRAM that fits (B126).
    device: int | None = Field(default=None, ge=0, le=63)
    ctx_size: int | None = Field(default=None, ge=16, le=1_048_576)
    slots: int | None = Field(default=None, ge=1, le=64)
    # Layers on the GPU: N, -1 for all, "auto" for as many as fit (the rest on the CPU).
    gpu_layers: int | Literal["auto"] | None = None
    # Several GPUs of this node for one model (llama.cpp's tensor split), instead of device.
    devices: list[int] | None = Field(default=None, min_length=1, max_length=16)
    # Start another worker even when an idle or starting one could be handed back (B122).
    new: bool = False
    # A split worker (B204): these RPC servers take layers beside this node's own.
    rpc: list[RpcPeer] | None = Field(default=None, min_length=1, max_length=8)

    @model_validator(mode="after")
    def _check_gpu_fields(self) -> SpawnRequest:
        if isinstance(self.gpu_layers, int) and self.gpu_layers < -1:
            raise ValueError("gpu_layers is a layer count, -1 (all) or 'auto'")
        if self.devices is not None:
            if len(set(self.devices)) != len(self.devices) or min(self.devices) < 0:
                raise ValueError("devices must be distinct GPU indexes")
            if self.device is not None and self.device not in self.devices:
                raise ValueError("give devices or device, not both")
        return self


class WorkerInfo(BaseModel):
    """One worker as its agent sees it (B24)."""

    id: str
    model_id: str
    model_ref: str
    backend: str
    device: int
    url: str
    state: WorkerState
    slots_total: int
    slots_available: int
    pid: int | None
    started_at: float
    last_activity: float
    rss_mb: int | None = None
    vram_mb: int | None = None
    tokens_served: int = 0
    layers_loaded: int = 0
    layers_total: int = 0
    active_requests: int = 0
    queued: int = 0
    gpu_layers: int | None = None
    devices: list[int] = Field(default_factory=list)
    ctx_size: int | None = None
    queue_depth: int | None = None
    # Why a worker is `failed` (kept for a while after it failed to start, B127).
    error: ErrorDetail | None = None
    # A split worker's layers per node (B204); empty for a worker on one node.
    split: list[SplitPart] = Field(default_factory=list)


class SpawnReply(BaseModel):
    worker: WorkerInfo
    reused: bool


class WorkersReply(BaseModel):
    workers: list[WorkerInfo]


class ModelsReply(BaseModel):
    models: list[CatalogEntry]


class LogsReply(BaseModel):
    source: str
    lines: list[str]


class LogLine(BaseModel):
    """One event of `GET /v1/logs?follow=true`."""

    source: str
    line: str


# --------------------------------------------------------------------------- downloads (B37)

DownloadStage = Literal["downloading", "complete", "failed"]


class DownloadRequest(BaseModel):
    """`POST /v1/models/download`: fetch an `hf:` model into the node's models directory."""

    model_config = ConfigDict(extra="forbid")

    model_ref: str = Field(min_length=1, max_length=2048)


class DownloadProgress(BaseModel):
    """One event of `GET /v1/models/download/{job_id}/progress` (B37).

    `downloading` events repeat (bytes so far, of the total over every file of the model;
    `speed_mbps` is MB/s — MiB per second, as every size in rbee — over the last seconds);
    then one `complete` (with `local_path` and the catalog `model_id`) or one `failed`
    (with `error`), then the stream's `[DONE]`. `attempt` counts from 1 and goes up when a
    broken or stalled transfer is resumed.
    """

    stage: DownloadStage
    job_id: str
    model_ref: str
    bytes_downloaded: int = 0
    bytes_total: int = 0
    speed_mbps: float = 0.0
    file: str | None = None
    attempt: int = 1
    # A retry, resume or checksum mismatch, as one line for people (B128).
    note: str | None = None
    local_path: str | None = None
    model_id: str | None = None
    error: ErrorDetail | None = None


class DownloadJob(BaseModel):
    """The reply to `POST /v1/models/download` (202 while running, 200 when the node already
    has the model) and to `GET`/`DELETE /v1/models/download/{job_id}`.

    `joined` is true when the request found a download of the same model under way and
    joined it instead of starting another. `files` are the repo paths fetched, in order (a
    model split into parts has several; none when the node already had the model);
    `reference` is the catalog reference the model gets.
    """

    job_id: str
    model_ref: str
    reference: str
    stage: DownloadStage
    files: list[str]
    bytes_total: int
    bytes_downloaded: int
    progress_url: str
    joined: bool = False
    local_path: str | None = None
    model_id: str | None = None
    error: ErrorDetail | None = None
