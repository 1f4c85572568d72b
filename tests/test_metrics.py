"""`GET /metrics` on the agent (B190, B191), parsed with prometheus_client's own parser."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rbee_agent.catalog import Catalog
from rbee_agent.server import create_app
from rbee_agent.settings import AgentSettings
from tests.agent_support import AgentProc
from tests.fake_nvml import FakeGpu, FakeNvml, GiB, use_nvml
from tests.support import bundled_model_path, sse_events

MODEL = "smollm2-135m"


def families(text: str) -> dict[str, list[Any]]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples: list[Any], sample: str | None = None, **labels: str) -> float:
    found = [s.value for s in samples if (sample is None or s.name == sample)
             and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (sample, labels, samples)
    return float(found[0])


def test_b191_agent_metrics_count_requests_tokens_and_latency(agent: AgentProc) -> None:
    client = openai.OpenAI(base_url=f"{agent.url}/openai/v1", api_key=agent.key,
                           max_retries=0)
    reply = client.chat.completions.create(model=MODEL, max_tokens=8,
                                           messages=[{"role": "user", "content": "Hi"}])
    worker = agent.get("/v1/workers").json()["workers"][0]
    with httpx.stream("POST", f"{agent.url}/v1/workers/{worker['id']}/inference",
                      headers=agent.headers, json={"prompt": "Bees", "max_tokens": 6},
                      timeout=60) as native:
        done = sse_events(native)[-1]
    assert agent.get("/v1/no/such/route").status_code == 404
    text = agent.get("/metrics")
    assert text.headers["content-type"].startswith("text/plain")
    got = families(text.text)
    requests = got["rbee_requests"]
    assert value(requests, route="/openai/v1/chat/completions", status="200") == 1
    assert value(requests, route="/v1/workers/{worker_id}/inference", status="200") == 1
    assert value(requests, route="unmatched", status="404") == 1  # no label per stray URL
    tokens = reply.usage.completion_tokens + done["total_tokens"]  # type: ignore[union-attr]
    assert value(got["rbee_tokens_generated"], model=MODEL) == tokens
    ttft = got["rbee_time_to_first_token_seconds"]
    assert value(ttft, "rbee_time_to_first_token_seconds_count", model=MODEL) == 2
    gaps = value(got["rbee_inter_token_seconds"], "rbee_inter_token_seconds_count",
                 model=MODEL)
    assert 0 < gaps <= tokens - 2
    assert value(got["rbee_workers"], state="idle") == 1
    assert value(got["rbee_workers"], state="busy") == 0
    labels = {"worker": worker["id"], "model": MODEL}
    assert value(got["rbee_worker_slots"], **labels) == 1
    assert value(got["rbee_worker_slots_busy"], **labels) == 0
    assert value(got["rbee_worker_queue_length"], **labels) == 0
    assert value(got["rbee_download_bytes"]) == 0
    agent.delete(f"/v1/workers/{worker['id']}")


def test_b190_agent_metrics_need_the_key(agent: AgentProc) -> None:
    assert httpx.get(f"{agent.url}/metrics", timeout=10).status_code == 401
    wrong = httpx.get(f"{agent.url}/metrics", headers={"Authorization": "Bearer x"},
                      timeout=10)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "INVALID_API_KEY"


@pytest.fixture
async def app_client(tmp_path: Path) -> AsyncIterator[Any]:
    async def make(**settings: Any) -> httpx.AsyncClient:
        values = AgentSettings(api_key="k", data_dir=tmp_path / "data",
                               log_dir=tmp_path / "logs", **settings)
        values.data_dir.mkdir(parents=True, exist_ok=True)
        catalog = Catalog(values.catalog_path)
        catalog.register_file(bundled_model_path(), id=MODEL)
        made.append(catalog)
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(values,
                                                                              catalog)),
                                 base_url="http://agent")

    made: list[Catalog] = []
    yield make
    for catalog in made:
        catalog.close()


async def test_b190_metrics_public_opens_them_on_loopback_only(app_client: Any) -> None:
    local = await app_client(metrics_public=True)
    assert (await local.get("/metrics")).status_code == 200
    wide = await app_client(metrics_public=True, host="0.0.0.0")
    assert (await wide.get("/metrics")).status_code == 401
    default = await app_client()
    assert (await default.get("/metrics")).status_code == 401


async def test_b191_vram_per_gpu(app_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    use_nvml(monkeypatch, FakeNvml([FakeGpu(), FakeGpu(name="NVIDIA L4",
                                                       memory=(24 * GiB, 6 * GiB, 18 * GiB))]))
    client = await app_client()
    got = families((await client.get("/metrics", headers={"Authorization": "Bearer k"})).text)
    assert value(got["rbee_gpu_vram_used_bytes"], gpu="0") == 20 * GiB
    assert value(got["rbee_gpu_vram_total_bytes"], gpu="0") == 80 * GiB
    assert value(got["rbee_gpu_vram_used_bytes"], gpu="1", name="NVIDIA L4") == 6 * GiB
