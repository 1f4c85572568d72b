"""The agent app in-process: auth on every route, preflight shortages, settings and keys.

Shortages are driven through the resources boundary (RAM figure, fake NVML); nothing is
spawned because preflight refuses first.
"""

from __future__ import annotations

import math
import re
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute

from rbee_agent import resources
from rbee_agent.catalog import Catalog
from rbee_agent.protocol import CatalogEntry
from rbee_agent.server import create_app
from rbee_agent.settings import AgentSettings, load_settings
from tests.fake_nvml import FakeGpu, FakeNvml, GiB, use_nvml
from tests.support import REPO, bundled_model_path

KEY = "in-process-key"


@pytest.fixture
def settings(tmp_path: Path) -> AgentSettings:
    return AgentSettings(api_key=KEY, data_dir=tmp_path / "data", log_dir=tmp_path / "logs")


@pytest.fixture
async def client(settings: AgentSettings) -> AsyncIterator[httpx.AsyncClient]:
    settings.data_dir.mkdir(parents=True)
    catalog = Catalog(settings.catalog_path)
    catalog.register_file(bundled_model_path(), id="smollm2-135m")
    app = create_app(settings, catalog)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a",
                                 headers={"Authorization": f"Bearer {KEY}"}) as c:
        c.app = app  # type: ignore[attr-defined]
        yield c
    catalog.close()


def all_routes(routes: list[Any]) -> Iterator[Any]:
    """Every route, including those of included routers."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        yield from all_routes(inner.routes) if inner is not None else [route]


async def test_b22_every_route_but_health_needs_the_key(client: httpx.AsyncClient) -> None:
    app = client.app  # type: ignore[attr-defined]
    routes = list(all_routes(app.routes))
    assert all(isinstance(r, APIRoute) for r in routes), "an unchecked kind of route"
    assert len(routes) >= 14  # health + 13 keyed routes
    checked = 0
    for route in routes:
        path = re.sub(r"\{[^}]+\}", "x", route.path)
        for method in route.methods:
            r = await client.request(method, path, headers={"Authorization": ""})
            if route.path == "/v1/health":
                assert r.status_code == 200
                continue
            assert r.status_code == 401, f"{method} {route.path} answered without a key"
            # The OpenAI routes answer in OpenAI's shape, with OpenAI's code (B184).
            openai = route.path.startswith("/openai/")
            missing, invalid = (("invalid_api_key",) * 2 if openai
                                else ("MISSING_API_KEY", "INVALID_API_KEY"))
            assert r.json()["error"]["code"] == missing
            wrong = await client.request(method, path, headers={"Authorization": "Bearer no"})
            assert wrong.status_code == 401 and wrong.json()["error"]["code"] == invalid
            checked += 1
    assert checked >= 13


async def test_b25_insufficient_ram_names_required_and_available(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resources, "ram_available_mb", lambda: 50)
    r = await client.post("/v1/workers", json={"model_ref": "smollm2-135m"})
    assert r.status_code == 507
    err = r.json()["error"]
    assert err["code"] == "INSUFFICIENT_RAM"
    size_mb = bundled_model_path().stat().st_size / 1024 / 1024
    details = err["details"]
    # B121: weights + KV cache (2048 × 30 layers × 3 KV heads × 128 × 2 bytes) + compute.
    assert details["weights_mb"] == math.ceil(size_mb) and details["kv_cache_mb"] == 45
    assert details["required_mb"] == details["weights_mb"] + 45 + details["compute_mb"]
    assert details["available_mb"] == 50
    assert (await client.get("/v1/workers")).json()["workers"] == []


async def test_b25_insufficient_vram_on_a_fake_gpu(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = FakeGpu(name="NVIDIA RTX 4090", memory=(24 * GiB, 24 * GiB - 64 * 1024**2,
                                                    64 * 1024**2))
    use_nvml(monkeypatch, FakeNvml([full]))
    r = await client.post("/v1/workers", json={"model_ref": "smollm2-135m", "backend": "cuda"})
    err = r.json()["error"]
    assert r.status_code == 507 and err["code"] == "INSUFFICIENT_VRAM"
    assert err["details"]["available_mb"] == 64 and err["details"]["device"] == 0
    assert "RTX 4090" in err["message"]
    r = await client.post("/v1/workers", json={"model_ref": "smollm2-135m", "backend": "cuda",
                                                "device": 2})
    assert r.json()["error"]["code"] == "DEVICE_NOT_FOUND"
    assert r.json()["error"]["details"]["devices"] == [0]


async def test_b23_node_reports_fake_gpus(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_nvml(monkeypatch, FakeNvml([FakeGpu()]))
    node = (await client.get("/v1/node")).json()
    assert node["backends"] == ["cpu", "cuda"]
    assert node["gpus"][0]["vram_total_mb"] == 80 * 1024
    assert node["gpus"][0]["vram_free_mb"] == 60 * 1024


async def test_b35_models_lists_catalog_entries(client: httpx.AsyncClient) -> None:
    models = (await client.get("/v1/models")).json()["models"]
    entry = CatalogEntry.model_validate(models[0])
    assert entry.id == "smollm2-135m" and entry.quantization == "Q4_1"


# ---------------------------------------------------------------- settings and keys


def test_b20_api_key_generated_once_with_mode_0600(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RBEE_AGENT_API_KEY", raising=False)
    config = tmp_path / "agent.toml"
    config.write_text('idle_timeout_s = 1.5\n')
    first, _ = load_settings(config)
    assert first.api_key and len(first.api_key) >= 32
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert "idle_timeout_s = 1.5" in config.read_text()
    second, _ = load_settings(config)
    assert second.api_key == first.api_key and second.idle_timeout_s == 1.5


def test_b20_key_file_then_env_then_config(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('api_key = "from-config"\n')
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    monkeypatch.setenv("RBEE_AGENT_API_KEY", "from-env")
    assert load_settings(config, api_key_file=key_file)[0].api_key == "from-file"
    assert load_settings(config)[0].api_key == "from-env"
    monkeypatch.delenv("RBEE_AGENT_API_KEY")
    assert load_settings(config)[0].api_key == "from-config"


def test_b20_flags_override_the_file(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('api_key = "k"\nport = 9300\nhealth_interval_s = 30\n')
    settings, _ = load_settings(config, {"port": "9400", "health_interval_s": "0.5"})
    assert settings.port == 9400 and settings.health_interval_s == 0.5


@pytest.mark.parametrize(
    ("content", "needle"),
    [("port = [", "not valid TOML"), ("port = 70000", "'port'"), ("colour = 1", "'colour'")],
)
def test_b20_bad_config_is_one_clear_line(tmp_path: Path, content: str, needle: str) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(content + "\n")
    r = subprocess.run([sys.executable, "-m", "rbee_agent", "serve", "--config", str(config)],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 1
    assert needle in r.stderr and str(config) in r.stderr
    assert "Traceback" not in r.stderr
