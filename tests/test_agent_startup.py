"""Start-up and data-dir safety (B130, B131), catalog faults (B124), settings sources and logs
of 500s (B120, B133)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from rbee_agent.catalog import Catalog
from rbee_agent.server import create_app
from rbee_agent.settings import AgentSettings, load_settings
from tests.agent_support import AgentProc
from tests.support import REPO, bundled_model_path, free_port

KEY = "startup-key"


def serve(home: Path, *flags: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `rbee-agent serve` to its end (it is expected to refuse to start)."""
    args = [sys.executable, "-m", "rbee_agent", "serve", "--config", str(home / "agent.toml"),
            "--data-dir", str(home / "data"), "--log-dir", str(home / "logs"), *flags]
    env = {**os.environ, "RBEE_AGENT_API_KEY": KEY}
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=timeout)


# --------------------------------------------------------------------------- B130


def test_b130_damaged_catalog_is_one_line_with_a_backup_and_a_rebuild(
    start_agent: Callable[..., AgentProc], tmp_path: Path
) -> None:
    home = tmp_path / "node"
    models = home / "data" / "models"
    hf_file = models / "hf" / "org" / "repo" / "main" / "tiny.gguf"
    hf_file.parent.mkdir(parents=True)
    shutil.copy(bundled_model_path(), hf_file)
    (home / "data" / "catalog.sqlite3").write_bytes(b"this is not a database" * 100)

    r = serve(home, "--port", str(free_port()))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "damaged" in r.stderr and "--rebuild-catalog" in r.stderr
    backups = list((home / "data").glob("catalog.sqlite3.damaged-*"))
    assert len(backups) == 1 and backups[0].read_bytes().startswith(b"this is not")

    a = start_agent("node", **{"rebuild-catalog": None})  # type: ignore[arg-type]
    models_seen = {m["id"]: m for m in a.get("/v1/models").json()["models"]}
    assert models_seen["tiny"]["reference"] == "hf:org/repo/tiny.gguf"
    assert models_seen["tiny"]["provider"] == "hf"
    assert backups[0].exists()


def test_b130_second_agent_on_a_taken_port_exits_1_and_touches_nothing(
    start_agent: Callable[..., AgentProc], tmp_path: Path
) -> None:
    first = start_agent("first")
    log_before = (first.home / "logs" / "agent.log").read_text()
    second = tmp_path / "second"
    r = serve(second, "--port", str(first.port))
    assert r.returncode == 1
    assert f"Port {first.port}" in r.stderr and "in use" in r.stderr
    assert f"pid {first.proc.pid}" in r.stderr
    assert not (second / "data").exists() and not (second / "logs").exists()
    # the same data and log dirs as the first agent: nothing written to them
    shared = serve(first.home, "--port", str(first.port))
    assert shared.returncode == 1
    assert (first.home / "logs" / "agent.log").read_text() == log_before


def test_b130_two_agents_on_one_data_dir_the_second_refuses_with_the_first_pid(
    start_agent: Callable[..., AgentProc],
) -> None:
    first = start_agent("first")
    r = serve(first.home, "--port", str(free_port()))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "in use by another agent" in r.stderr and f"pid {first.proc.pid}" in r.stderr


# --------------------------------------------------------------------------- B131


def test_b131_a_file_model_placed_in_the_models_dir_is_kept_on_delete(agent: AgentProc) -> None:
    models_dir = Path(agent.get("/v1/node").json()["models_dir"])
    placed = models_dir / "mine.gguf"
    shutil.copy(bundled_model_path(), placed)
    worker = agent.spawn(placed.as_uri())
    agent.wait_state(worker["id"], "idle")
    agent.delete(f"/v1/workers/{worker['id']}")
    assert agent.delete(f"/v1/models/{worker['model_id']}").status_code == 200
    assert placed.exists(), "the user's file was deleted with its catalog row"


# --------------------------------------------------------------------------- catalog faults


@pytest.fixture
async def app_client(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Catalog]]:
    settings = AgentSettings(api_key=KEY, data_dir=tmp_path / "data", log_dir=tmp_path / "logs",
                             catalog_busy_timeout_s=0.2, port=free_port())
    settings.data_dir.mkdir(parents=True)
    catalog = Catalog(settings.catalog_path, settings.catalog_busy_timeout_s)
    app = create_app(settings, catalog)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a",
                                 headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client, catalog
    catalog.close()


async def test_b124_locked_catalog_is_busy_and_listing_does_not_wait(
    app_client: tuple[httpx.AsyncClient, Catalog], tmp_path: Path
) -> None:
    client, catalog = app_client
    holder = sqlite3.connect(catalog.path)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        model = tmp_path / "m.gguf"
        os.link(bundled_model_path(), model) if _same_fs(tmp_path) else shutil.copy(
            bundled_model_path(), model)
        spawn = asyncio.ensure_future(client.post("/v1/workers",
                                                  json={"model_ref": model.as_uri()}))
        started = time.monotonic()
        listing = await client.get("/v1/models")
        assert listing.status_code == 200 and time.monotonic() - started < 0.5
        r = await spawn
        assert r.status_code == 503 and r.json()["error"]["code"] == "CATALOG_BUSY"
        assert "locked" in r.json()["error"]["message"]
    finally:
        holder.rollback()
        holder.close()


async def test_b124_full_disk_during_a_catalog_write_is_insufficient_disk(
    app_client: tuple[httpx.AsyncClient, Catalog], tmp_path: Path
) -> None:
    client, catalog = app_client
    pages = catalog._conn.execute("PRAGMA page_count").fetchone()[0]
    catalog._conn.execute(f"PRAGMA max_page_count={pages}")  # SQLite's own "disk full"
    with pytest.raises(sqlite3.OperationalError, match="full"):  # fill the last page
        for n in range(10_000):
            with catalog._conn:  # each row committed, so the full page stays full
                catalog._conn.execute("INSERT INTO models VALUES (?, 'file', ?, '', 0, NULL,"
                                      " '', '', 0, 0, 0)", (f"filler-{n}", f"ref-{n}"))
    model = tmp_path / "m.gguf"
    shutil.copy(bundled_model_path(), model)
    r = await client.post("/v1/workers", json={"model_ref": model.as_uri()})
    assert r.status_code == 507 and r.json()["error"]["code"] == "INSUFFICIENT_DISK"


def _same_fs(path: Path) -> bool:
    return os.stat(path).st_dev == os.stat(bundled_model_path()).st_dev


# --------------------------------------------------------------------------- B133 logs


async def test_b133_a_500_is_logged_with_its_traceback_under_rbee(
    app_client: tuple[httpx.AsyncClient, Catalog], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, _ = app_client
    supervisor = client._transport.app.state.supervisor  # type: ignore[attr-defined]

    def broken() -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(supervisor, "infos", broken)
    with caplog.at_level(logging.ERROR, logger="rbee"):
        r = await client.get("/v1/workers")
    assert r.status_code == 500 and r.json()["error"]["code"] == "INTERNAL_ERROR"
    records = [rec for rec in caplog.records if rec.exc_info]
    assert len(records) == 1 and records[0].name.startswith("rbee.")
    assert "boom" in caplog.text


# --------------------------------------------------------------------------- B120 settings


def test_b120_help_shows_real_defaults() -> None:
    r = subprocess.run([sys.executable, "-m", "rbee_agent", "serve", "--help"],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "PydanticUndefined" not in text
    assert "--data-dir" in text and "(default: /" in text
    assert "RBEE_AGENT_IDLE_TIMEOUT_S (default: 300.0)" in text


def test_b120_environment_sits_between_flags_and_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('api_key = "k"\nidle_timeout_s = 10\nstop_grace_s = 7\n')
    monkeypatch.setenv("RBEE_AGENT_IDLE_TIMEOUT_S", "20")
    settings, _ = load_settings(config, {})
    assert settings.idle_timeout_s == 20 and settings.stop_grace_s == 7
    settings, _ = load_settings(config, {"idle_timeout_s": "30"})
    assert settings.idle_timeout_s == 30
