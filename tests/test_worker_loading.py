"""B41, B42: the HTTP surface answers while llama.cpp loads, with real layer progress.

In-process (real engine, real model, the real ASGI app) so the test can subscribe to the
progress stream before loading starts and observe the loading state deterministically.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from rbee_agent.protocol import LoadingProgress
from rbee_agent.worker.app import create_app
from rbee_agent.worker.engine import Engine, EngineConfig
from rbee_agent.worker.service import WorkerService, WorkerSettings
from tests.support import bundled_model_path

KEY = "k-loading"


@pytest.fixture
async def service() -> AsyncIterator[WorkerService]:
    model = bundled_model_path()
    settings = WorkerSettings(worker_id="w", model_path=model, port=1, api_key=KEY)
    svc = WorkerService(settings, Engine(EngineConfig(model_path=model)))
    yield svc
    svc.request_shutdown()
    await asyncio.wait_for(svc.exit_requested.wait(), 30)


async def test_b41_b42_answers_while_loading_then_ready(service: WorkerService) -> None:
    app = create_app(service)
    transport = httpx.ASGITransport(app=app)
    events: list[LoadingProgress] = []

    async def follow() -> None:
        async for event in service.progress.follow():
            events.append(event)

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0)
    service.start()
    async with httpx.AsyncClient(transport=transport, base_url="http://w",
                                 headers={"Authorization": f"Bearer {KEY}"}) as client:
        ready = (await client.get("/v1/ready")).json()
        assert ready == {"ready": False, "state": "loading", "model_loaded": False,
                         "progress_url": "/v1/loading/progress"}
        busy = await client.post("/v1/inference", json={"prompt": "Hi"})
        assert busy.status_code == 503
        assert busy.json()["error"]["code"] == "MODEL_LOADING"
        assert "layer" in busy.json()["error"]["message"]
        await asyncio.wait_for(follower, 30)
        assert (await client.get("/v1/ready")).json() == {
            "ready": True, "state": "idle", "model_loaded": True, "queued": 0,
            "queue_depth": 64}
    loading = [e for e in events if e.stage == "loading"]
    assert len(loading) >= 3, "llama.cpp's progress callback should report several steps"
    layers = [e.layers_loaded for e in loading]
    assert layers == sorted(layers) and layers[0] < 30
    assert events[-1] == LoadingProgress(stage="ready", layers_loaded=30, layers_total=30)


def test_b25_a_taken_port_is_the_last_word_on_stderr() -> None:
    """A worker whose port was taken between the agent's choice and its bind exits at once,
    and says why in its last lines: the agent reads them to retry on another port. The
    load that had started must not flood stderr once the loop is gone."""
    import socket
    import subprocess
    import sys

    from tests.support import REPO, free_port

    with socket.socket() as taken:
        port = free_port()
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = subprocess.run(
            [sys.executable, "-m", "rbee_agent.worker", "--worker-id", "w", "--model",
             str(bundled_model_path()), "--port", str(port), "--api-key", "k"],
            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-3:]
    assert any("address already in use" in line for line in last), result.stderr
    assert "Traceback" not in result.stderr
