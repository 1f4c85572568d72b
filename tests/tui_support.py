"""A scripted node source for TUI tests: deterministic nodes, workers, models and streams.

This is the TUI's data boundary (`NodeSource`); the app, its screens and the real
orchestrator run unchanged on top of it. Streams come from an httpx MockTransport that
speaks the agent's wire protocol, so the real AgentClient parses them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
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


def worker(worker_id: str, model: str, state: str, tokens: int, busy: bool = False
           ) -> WorkerInfo:
    now = time.time()
    return WorkerInfo(
        id=worker_id, model_id=model, model_ref=f"bundled:{model}", backend="cuda", device=0,
        url="http://127.0.0.1:8001", state=state,  # type: ignore[arg-type]
        slots_total=1, slots_available=0 if busy else 1, pid=4242, started_at=now - 600,
        last_activity=now, rss_mb=812, vram_mb=1450, tokens_served=tokens,
        layers_loaded=30, layers_total=30, active_requests=1 if busy else 0,
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


class ScriptedSource:
    """Answers polls from a table; a node can be taken down and brought back."""

    def __init__(self, hold_stream: bool = True) -> None:
        self.down: dict[str, str] = {
            "lab-a100": "Cannot reach the agent of node 'lab-a100' at 127.0.0.1:9200"}
        self.hold_stream = hold_stream
        self.requests: list[str] = []

    def snapshot_of(self, name: str) -> NodeSnapshot:
        if name in self.down:
            return NodeSnapshot(name=name, status="down", reason=self.down[name])
        if name == "gpu1":
            return NodeSnapshot(name=name, status="up", agent_version=__version__,
                                info=node_info("gpu1", 2), workers=(
                                    worker("w1-a3f2", "smollm2-135m", "idle", 1234),
                                    worker("w2-77c1", "qwen2.5-7b-instruct", "busy", 98765,
                                           busy=True)))
        return NodeSnapshot(name=name, status="up", agent_version=__version__,
                            info=node_info("localhost", 0),
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
        node = request.url.host
        if path == "/v1/health":
            return _json({"status": "ok", "version": __version__, "api_version": "1"})
        if path == "/v1/workers" and request.method == "POST":
            spawned = worker("w3-new", json.loads(request.content)["model_ref"], "loading", 0)
            return _json({"worker": spawned.model_dump(), "reused": False}, 201)
        if path == "/v1/workers":
            snap = self.snapshot_of(node)
            return _json({"workers": [w.model_dump() for w in snap.workers]})
        if path == "/v1/models":
            return _json(ModelsReply(models=MODELS).model_dump())
        if path.endswith("/inference") and request.method == "POST":
            frames = [{"token": t, "index": i} for i, t in enumerate(TOKENS)]
            if self.hold_stream:
                return _sse(frames[:STREAM_PAUSE_AFTER], hold=True)
            done = {"done": True, "total_tokens": len(TOKENS), "duration_ms": 120.0,
                    "finish_reason": "stop", "request_id": "r1"}
            return _sse([*frames, done])
        if "/inference/" in path and request.method == "DELETE":
            return httpx.Response(204)
        if path == "/v1/models/download" and request.method == "POST":
            ref = json.loads(request.content)["model_ref"]
            return _json({"job_id": "j1", "model_ref": ref, "reference": ref,
                          "stage": "downloading", "files": ["tiny.gguf"],
                          "bytes_total": 100 * 2**20, "bytes_downloaded": 0,
                          "progress_url": "/v1/models/download/j1/progress"}, 202)
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
    def __init__(self, frames: list[dict[str, Any]], hold: bool) -> None:
        self.frames = frames
        self.hold = hold

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for frame in self.frames:
            yield f"data: {json.dumps(frame)}\n\n".encode()
        if self.hold:
            await asyncio.sleep(3600)
        yield b"data: [DONE]\n\n"


def _sse(frames: list[dict[str, Any]], hold: bool = False) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/event-stream"},
                          stream=_Frames(frames, hold))


def make_app(hold_stream: bool = True) -> tuple[RbeeApp, ScriptedSource]:
    source = ScriptedSource(hold_stream=hold_stream)
    app = RbeeApp(scripted_config(), source, poll=False, save_theme=False)
    return app, source


async def fill(app: RbeeApp, source: ScriptedSource, points: int = 30) -> None:
    """Feed polls as the poller would, with a memory curve for the sparkline."""
    for i in range(points):
        for name in app.config.names():
            snap = source.snapshot_of(name)
            if snap.info is not None:
                used = 8000 + 3000 * (i % 10) / 10
                gpus = [g.model_copy(update={"vram_used_mb": int(used)})
                        for g in snap.info.gpus]
                info = snap.info.model_copy(update={
                    "gpus": gpus,
                    "ram_available_mb": snap.info.ram_total_mb - int(used)})
                snap = NodeSnapshot(name=name, status=snap.status,
                                    agent_version=snap.agent_version, info=info,
                                    workers=snap.workers, polled_at=1000.0 + 2 * i)
            app.apply_snapshot(snap)
