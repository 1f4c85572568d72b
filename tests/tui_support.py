"""A scripted node source for TUI tests: deterministic nodes, workers, models and streams.

This is the TUI's data boundary (`NodeSource`); the app, its screens and the real
orchestrator run unchanged on top of it. Streams come from an httpx MockTransport that
speaks the agent's wire protocol, so the real AgentClient parses them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from rbee_agent import __version__
from rbee_agent.protocol import (
    CatalogEntry,
    GpuInfo,
    ModelsReply,
    NodeInfo,
    RbeeError,
    WorkerInfo,
)
from rbee_tui.app import RbeeApp
from rbee_tui.client import AgentClient
from rbee_tui.config import Config, Node, OperatorSettings
from rbee_tui.node_source import NodeSnapshot

NOW = 1_700_000_000.0  # the scripted world's clock: snapshots never depend on the wall clock

REPLY = ("The capital of France is **Paris**. It sits on the Seine and is known for the "
         "Eiffel Tower, the Louvre and its cafés.\n\n```python\nprint('bonjour')\n```\n")
TOKENS = [REPLY[i:i + 6] for i in range(0, len(REPLY), 6)]
STREAM_PAUSE_AFTER = 12  # tokens sent before the scripted stream holds (mid-stream)


def node_info(name: str, gpus: int) -> NodeInfo:
    return NodeInfo(
        hostname=name, os="Linux-6.1", arch="x86_64", cpu_count=16, cpu_percent=37.0,
        load_average=(1.0, 0.8, 0.5), ram_total_mb=64 * 1024, ram_available_mb=40 * 1024,
        models_dir="/srv/rbee/models", disk_free_mb=512 * 1024,
        backends=["cpu", "cuda"] if gpus else ["cpu"],
        gpus=[GpuInfo(index=i, name="NVIDIA RTX 4090", vram_total_mb=24564,
                      vram_used_mb=8000 + 6000 * i, vram_free_mb=24564 - 8000 - 6000 * i,
                      utilization_percent=40 + 20 * i, temperature_c=61 + i, power_w=220.0)
              for i in range(gpus)],
    )


def worker(worker_id: str, model: str, state: str, tokens: int, busy: bool = False,
           device: int = 0, gpu_layers: int | None = 30, queued: int = 0,
           idle_s: float = 0.0) -> WorkerInfo:
    return WorkerInfo(
        id=worker_id, model_id=model, model_ref=f"bundled:{model}", backend="cuda",
        device=device, url="http://127.0.0.1:8001", state=state,  # type: ignore[arg-type]
        slots_total=1, slots_available=0 if busy else 1, pid=4242, started_at=NOW - 600,
        last_activity=NOW - idle_s, rss_mb=812, vram_mb=1450 if device == 0 else 5200,
        tokens_served=tokens, layers_loaded=30, layers_total=30,
        active_requests=1 if busy else 0, queued=queued, gpu_layers=gpu_layers,
        devices=[device],
    )


MODELS = [
    CatalogEntry(id="smollm2-135m", provider="bundled", reference="bundled:smollm2-135m",
                 local_path="/srv/rbee/models/smollm2.gguf", size_bytes=98_362_432,
                 quantization="Q4_1", architecture="llama", layers=30, context_length=8192,
                 added_at=0),
    CatalogEntry(id="qwen2.5-7b-instruct", provider="hf",
                 reference="hf:Qwen/Qwen2.5-7B-Instruct-GGUF/qwen2.5-7b-instruct-q4_k_m.gguf",
                 local_path="/srv/rbee/models/hf/qwen.gguf", size_bytes=4_683_073_536,
                 quantization="Q4_K_M", architecture="qwen2", layers=28,
                 context_length=32768, added_at=0),
]


def scripted_config() -> Config:
    return Config(settings=OperatorSettings(poll_interval_s=3600), nodes={
        "gpu1": Node(name="gpu1", ssh_host="10.0.0.21", ssh_user="ops", status="agent up",
                     agent_version=__version__),
        "lab-a100": Node(name="lab-a100", ssh_host="lab.example", status="reachable"),
    })


def silent_node_config() -> Config:
    """The scripted registry plus `lan`, a direct node at a loopback port nothing listens
    on, whose connects are tried twice without waiting."""
    import socket

    from rbee_tui.retry import policy

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = scripted_config()
    config.settings.http_retry = policy(2, 0.0)
    config.nodes["lan"] = Node(name="lan", transport="direct", agent_port=port, api_key="k")
    return config


class ScriptedSource:
    """Answers polls from a table; a node can be taken down and brought back."""

    def __init__(self, hold_stream: bool = True) -> None:
        self.down: dict[str, str] = {
            "lab-a100": "Cannot reach the agent of node 'lab-a100' at 127.0.0.1:9200"}
        self.hold_stream = hold_stream
        self.requests: list[str] = []
        self.on_connecting: Callable[[str, str], None] | None = None
        self.queued_frames: list[int] = []  # {"queued": n} frames sent before the tokens
        self.gate: asyncio.Event | None = None  # when set: tokens wait for it to open
        self.bodies: dict[str, list[dict[str, Any]]] = {}  # JSON bodies sent, by path
        self.spawn_refusal: str | None = None  # set: a spawn is refused for want of VRAM

    def snapshot_of(self, name: str) -> NodeSnapshot:
        if name in self.down:
            return NodeSnapshot(name=name, status="down", reason=self.down[name],
                                code="AGENT_UNREACHABLE", polled_at=NOW,
                                hint=f"Start it with: rbee nodes start {name}")
        if name == "gpu1":
            return NodeSnapshot(name=name, status="up", agent_version=__version__,
                                info=node_info("gpu1", 2), workers=(
                                    worker("w1-a3f2", "smollm2-135m", "idle", 1234,
                                           idle_s=42),
                                    worker("w2-77c1", "qwen2.5-7b-instruct", "busy", 98765,
                                           busy=True, device=1, gpu_layers=24, queued=2)),
                                polled_at=NOW)
        return NodeSnapshot(name=name, status="up", agent_version=__version__,
                            info=node_info("localhost", 0), polled_at=NOW,
                            workers=(worker("w1-0001", "smollm2-135m", "idle", 12),))

    async def poll(self, name: str) -> NodeSnapshot:
        return self.snapshot_of(name)

    async def client(self, name: str) -> AgentClient:
        return await self.open_client(name)

    async def open_client(self, name: str) -> AgentClient:
        if name in self.down:
            raise RbeeError("AGENT_UNREACHABLE", self.down[name])
        return AgentClient(name, f"http://{name}", "k", OperatorSettings(),
                           transport=httpx.MockTransport(self._handle))

    async def models(self, name: str) -> ModelsReply:
        if name in self.down:
            raise RbeeError("AGENT_UNREACHABLE", self.down[name])
        return ModelsReply(models=MODELS)

    async def _handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.requests.append(f"{request.method} {path}")
        if request.content:
            self.bodies.setdefault(path, []).append(json.loads(request.content))
        node = request.url.host
        if path == "/v1/health":
            return _json({"status": "ok", "version": __version__, "api_version": "1"})
        if path == "/v1/node":
            return _json(node_info(node, 2 if node == "gpu1" else 0).model_dump())
        if path == "/v1/workers" and request.method == "POST" and self.spawn_refusal:
            return _json({"error": {"code": "INSUFFICIENT_VRAM", "message": self.spawn_refusal,
                                    "details": {}}}, 507)
        if path == "/v1/workers" and request.method == "POST":
            spawned = worker("w3-new", json.loads(request.content)["model_ref"], "loading", 0)
            return _json({"worker": spawned.model_dump(), "reused": False}, 201)
        if path == "/v1/workers/w3-new/progress":
            return _sse([{"stage": "loading", "layers_loaded": n, "layers_total": 30}
                         for n in (10, 20, 30)] + [
                {"stage": "ready", "layers_loaded": 30, "layers_total": 30}])
        if path == "/v1/workers/w3-new":
            return _json(worker("w3-new", "smollm2-135m", "idle", 0).model_dump())
        if path == "/v1/workers":
            snap = self.snapshot_of(node)
            return _json({"workers": [w.model_dump() for w in snap.workers]})
        if path == "/v1/models":
            return _json(ModelsReply(models=MODELS).model_dump())
        if path.endswith("/inference") and request.method == "POST":
            queued: list[dict[str, Any]] = [{"queued": n} for n in self.queued_frames]
            frames: list[dict[str, Any]] = [{"token": t, "index": i}
                                            for i, t in enumerate(TOKENS)]
            if self.hold_stream:
                return _sse(frames[:STREAM_PAUSE_AFTER], hold=True, first=queued,
                            gate=self.gate)
            done = {"done": True, "total_tokens": len(TOKENS), "duration_ms": 120.0,
                    "finish_reason": "stop", "request_id": "r1"}
            return _sse([*frames, done], first=queued, gate=self.gate)
        if "/inference/" in path and request.method == "DELETE":
            return httpx.Response(204)
        if path == "/v1/models/download" and request.method == "POST":
            ref = json.loads(request.content)["model_ref"]
            if ref.startswith("file://"):  # registered in place: the agent answers at once
                return _json({"job_id": "j2", "model_ref": ref, "reference": ref,
                              "stage": "complete", "files": [], "bytes_total": 0,
                              "bytes_downloaded": 0, "model_id": "mine",
                              "local_path": ref.removeprefix("file://"),
                              "progress_url": "/v1/models/download/j2/progress"}, 200)
            if "missing" in ref:
                return _json({"error": {"code": "MODEL_NOT_FOUND", "message": (
                    f"{ref} was not found on the hub: the repository does not exist or has "
                    "no file of that name, checked at https://huggingface.co/api/models"),
                    "details": {"hint": "Check the spelling of org/repo on huggingface.co; "
                                "private repos need HF_TOKEN on the node."}}}, 404)
            job = "j3" if "flaky" in ref else "j1"
            return _json({"job_id": job, "model_ref": ref, "reference": ref,
                          "stage": "downloading", "files": ["tiny.gguf"],
                          "bytes_total": 100 * 2**20, "bytes_downloaded": 0,
                          "progress_url": f"/v1/models/download/{job}/progress"}, 202)
        if path == "/v1/models/download/j3/progress":  # a transfer that keeps breaking
            notes = ["attempt 2/3: connection reset, resuming at 25.0 MB in 0.4 s",
                     "attempt 3/3: checksum mismatch on tiny.gguf, fetching it again"]
            steps = [{"stage": "downloading", "job_id": "j3", "model_ref": "r",
                      "bytes_downloaded": 25 * 2**20, "bytes_total": 100 * 2**20,
                      "attempt": n + 2, "note": note} for n, note in enumerate(notes)]
            steps.append({"stage": "failed", "job_id": "j3", "model_ref": "r", "error": {
                "code": "DOWNLOAD_FAILED", "message": "tiny.gguf failed 3 times", "details": {}}})
            return _sse(steps)
        if path == "/v1/models/download/j1/progress":
            steps = [{"stage": "downloading", "job_id": "j1", "model_ref": "r",
                      "bytes_downloaded": n * 25 * 2**20, "bytes_total": 100 * 2**20,
                      "speed_mbps": 250.0} for n in range(1, 5)]
            steps.append({"stage": "complete", "job_id": "j1", "model_ref": "r",
                          "bytes_downloaded": 100 * 2**20, "bytes_total": 100 * 2**20,
                          "local_path": "/srv/rbee/models/hf/tiny.gguf", "model_id": "tiny"})
            return _sse(steps)
        if path == "/v1/logs":
            lines = [{"source": "agent", "line": f"2026-11-23 10:00:{i:02d} INFO rbee.agent: "
                      f"{msg}"} for i, msg in enumerate(LOG_LINES)]
            return _sse(lines, hold=True)
        return _json({"error": {"code": "NOT_FOUND", "message": path, "details": {}}}, 404)


LOG_LINES = [
    "agent 0.1.0 on http://127.0.0.1:9200; 1 bundled model(s): smollm2-135m",
    "spawned worker w1-a3f2 (pid 4242) for smollm2-135m on port 8001",
    "worker w1-a3f2 is ready at http://127.0.0.1:8001",
    "reusing idle worker w1-a3f2 for smollm2-135m",
]


def _json(body: Any, status: int = 200) -> httpx.Response:
    return httpx.Response(status, json=body)


class _Frames(httpx.AsyncByteStream):
    """`first` frames, then (once `gate` is open, if there is one) the others."""

    def __init__(self, frames: list[dict[str, Any]], hold: bool,
                 first: list[dict[str, Any]] | None = None,
                 gate: asyncio.Event | None = None) -> None:
        self.frames = frames
        self.hold = hold
        self.first = first or []
        self.gate = gate

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for frame in self.first:
            yield f"data: {json.dumps(frame)}\n\n".encode()
        if self.gate is not None:
            await self.gate.wait()
        for frame in self.frames:
            yield f"data: {json.dumps(frame)}\n\n".encode()
        if self.hold:
            await asyncio.sleep(3600)
        yield b"data: [DONE]\n\n"


def _sse(frames: list[dict[str, Any]], hold: bool = False,
         first: list[dict[str, Any]] | None = None,
         gate: asyncio.Event | None = None) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/event-stream"},
                          stream=_Frames(frames, hold, first, gate))


def make_app(hold_stream: bool = True) -> tuple[RbeeApp, ScriptedSource]:
    source = ScriptedSource(hold_stream=hold_stream)
    app = RbeeApp(scripted_config(), source, poll=False, save_theme=False, clock=lambda: NOW)
    return app, source


async def fill(app: RbeeApp, source: ScriptedSource, points: int = 30) -> None:
    """Feed polls as the poller would, with a memory curve for the sparkline."""
    for i in range(points):
        for name in app.config.names():
            snap = source.snapshot_of(name)
            if snap.info is not None:
                used = 8000 + 3000 * (i % 10) / 10
                wave = (i * 7) % 11  # a deterministic wobble for the sparklines
                gpus = [g.model_copy(update={
                    "vram_used_mb": int(used + 6000 * g.index),
                    "utilization_percent": min(100, 30 + 20 * g.index + 5 * wave),
                    "temperature_c": 55 + g.index + wave,
                    "power_w": 150.0 + 10 * wave}) for g in snap.info.gpus]
                info = snap.info.model_copy(update={
                    "gpus": gpus,
                    "ram_available_mb": snap.info.ram_total_mb - int(used)})
                workers = tuple(w.model_copy(update={  # busy workers serve 15 tokens/s
                    "tokens_served": w.tokens_served + (30 * i if w.state == "busy" else 0)})
                    for w in snap.workers)
                snap = NodeSnapshot(name=name, status=snap.status,
                                    agent_version=snap.agent_version, info=info,
                                    workers=workers, polled_at=NOW - 2 * (points - 1 - i))
            app.fleet.apply(snap)
    app.fleet.flush()


# ---------------------------------------------------------------- waiting on events


class Notifications:
    """Records every notification through the public `App.notify` (which `Widget.notify`
    calls too), and lets a test await one instead of sleeping."""

    def __init__(self, app: RbeeApp) -> None:
        self.messages: list[str] = []
        self._changed = asyncio.Event()
        original = app.notify

        def notify(message: str, *args: Any, **kwargs: Any) -> None:
            self.messages.append(message)
            self._changed.set()
            original(message, *args, **kwargs)

        app.notify = notify  # type: ignore[method-assign]

    def text(self) -> str:
        return "\n".join(self.messages)

    async def wait_for(self, *needles: str, limit_s: float = 10.0) -> str:
        async with asyncio.timeout(limit_s):
            while not all(n in self.text() for n in needles):
                self._changed.clear()
                await self._changed.wait()
        return self.text()


async def wait_for_workers(pilot: Any, *groups: str) -> None:
    """Wait until the app's workers (of these groups) are done, then for the screen."""
    app = pilot.app
    await pilot.pause()
    workers = [w for w in app.workers if not groups or w.group in groups]
    if workers:  # an empty list would mean every worker
        await app.workers.wait_for_complete(workers)
    await pilot.pause()


async def until(pilot: Any, check: Callable[[], object], limit_s: float = 10.0) -> None:
    """Let the app run until `check()` is true: for what no worker or message marks the end
    of (a real agent's reply). Each round waits for the app to go idle, not for a time."""
    async with asyncio.timeout(limit_s):
        while not check():
            await pilot.pause()
            await asyncio.sleep(0.02)  # polling a condition, not waiting for time to pass


async def frames(widget: Any, count: int = 2) -> None:
    """Wait until `widget` has been refreshed `count` times: what it shows is then settled
    (a table measures its columns, and drops renders made before, on the frames after new
    rows), whatever the machine's load."""
    for _ in range(count):
        drawn = asyncio.Event()
        widget.call_after_refresh(drawn.set)
        widget.refresh()
        await drawn.wait()
