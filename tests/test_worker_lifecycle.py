"""B40, B41, B42, B46, B27 and the parent-death guard, with real worker processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import psutil
import pytest

from tests.support import (
    LONG_PROMPT,
    REPO,
    WorkerProc,
    bundled_model_path,
    free_port,
    sse_data,
    sse_events,
)


def run_worker_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rbee_agent.worker", *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def base_args(model: Path) -> list[str]:
    return ["--worker-id", "w", "--model", str(model), "--port", str(free_port()),
            "--api-key", "k"]


def test_b40_missing_model_file_exits_with_one_clear_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    r = run_worker_cli(*base_args(missing))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and "does not exist" in lines[0]


def test_b40_non_gguf_file_exits_with_one_clear_line(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 this is a zip file, not a model")
    r = run_worker_cli(*base_args(bogus))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bogus) in lines[0] and "not a GGUF file" in lines[0]


def test_b40_truncated_gguf_fails_to_load_and_exits_nonzero(tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(bundled_model_path().read_bytes()[: 4 * 1024 * 1024])
    r = run_worker_cli(*base_args(cut))
    assert r.returncode == 1
    assert str(cut) in r.stderr and "Traceback" not in r.stderr


def test_b40_api_key_is_required_and_may_come_from_env(tmp_path: Path) -> None:
    args = [a for a in base_args(bundled_model_path()) if a not in ("--api-key", "k")]
    r = run_worker_cli(*args)
    assert r.returncode == 1 and "RBEE_WORKER_API_KEY" in r.stderr


def test_b40_unknown_backend_is_a_usage_error() -> None:
    r = run_worker_cli(*base_args(bundled_model_path()), "--backend", "tpu")
    assert r.returncode == 2 and "invalid choice: 'tpu'" in r.stderr


def test_b41_progress_stream_ends_at_layers_total_then_done(
    start_worker: Callable[..., WorkerProc],
) -> None:
    w = start_worker(wait=False)
    deadline = time.monotonic() + 30
    while True:
        try:
            with httpx.stream("GET", f"{w.url}/v1/loading/progress", headers=w.headers,
                              timeout=30) as r:
                events = sse_events(r)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert events[-1] == {"stage": "ready", "layers_loaded": 30, "layers_total": 30}
    layers = [e["layers_loaded"] for e in events]
    assert layers == sorted(layers)
    assert all(e["stage"] == "loading" for e in events[:-1])


# ---------------------------------------------------------------- B46 shutdown


def long_stream(w: WorkerProc, max_tokens: int) -> tuple[threading.Thread, list[dict]]:
    events: list[dict] = []
    started = threading.Event()

    def run() -> None:
        with httpx.stream("POST", f"{w.url}/v1/inference", headers=w.headers, timeout=60,
                          json={"prompt": LONG_PROMPT, "max_tokens": max_tokens,
                                "temperature": 0}) as r:
            for data in sse_data(r):
                started.set()
                if data != "[DONE]":
                    events.append(json.loads(data))

    t = threading.Thread(target=run)
    t.start()
    assert started.wait(30)
    return t, events


@pytest.mark.parametrize("how", ["admin", "sigterm"])
def test_b46_shutdown_drains_the_active_request_then_exits_0(
    start_worker: Callable[..., WorkerProc], how: str
) -> None:
    w = start_worker()
    t, events = long_stream(w, 150)
    if how == "admin":
        r = httpx.post(f"{w.url}/v1/admin/shutdown", headers=w.headers)
        assert r.status_code == 200 and r.json() == {"state": "draining", "active_requests": 1}
    else:
        w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10  # the signal is handled on the worker's loop
        while httpx.get(f"{w.url}/v1/health").json()["state"] != "draining":
            assert time.monotonic() < deadline
    refused = httpx.post(f"{w.url}/v1/inference", headers=w.headers,
                         json={"prompt": "Hi", "max_tokens": 2})
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "WORKER_DRAINING"
    t.join(60)
    assert events[-1]["done"] is True and events[-1]["finish_reason"] == "length"
    assert events[-1]["total_tokens"] == 150
    assert w.proc.wait(30) == 0
    assert "model unloaded" in w.log()


def test_b46_drain_is_bounded(start_worker: Callable[..., WorkerProc]) -> None:
    w = start_worker("--drain-timeout", "0.5")
    t, events = long_stream(w, 1500)
    started = time.monotonic()
    httpx.post(f"{w.url}/v1/admin/shutdown", headers=w.headers)
    assert w.proc.wait(30) == 0
    assert time.monotonic() - started < 5
    t.join(10)
    assert events[-1]["finish_reason"] == "cancelled"


# ---------------------------------------------------------------- B27 ready callback


class _Recorder(BaseHTTPRequestHandler):
    calls: ClassVar[list[tuple[str, dict]]] = []
    fail_first = 0

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        type(self).calls.append((self.headers.get("authorization", ""), body))
        status = 500 if len(type(self).calls) <= type(self).fail_first else 200
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def callback_server() -> Iterator[tuple[str, type[_Recorder]]]:
    class Recorder(_Recorder):
        calls: ClassVar[list[tuple[str, dict]]] = []
        fail_first = 1

    server = HTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/workers/ready", Recorder
    server.shutdown()


def test_b27_ready_callback_is_authenticated_and_retried(
    start_worker: Callable[..., WorkerProc], callback_server: tuple[str, type[_Recorder]]
) -> None:
    url, recorder = callback_server
    w = start_worker("--callback-url", url, key="worker-own-key")
    deadline = time.monotonic() + 10
    while len(recorder.calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(recorder.calls) == 2, "a failed callback is retried once it answers 500"
    auth, body = recorder.calls[-1]
    assert auth == "Bearer worker-own-key"
    assert body["worker_id"] == f"w{w.port}" and body["url"] == w.url
    assert body["backend"] == "cpu" and body["device"] == 0
    assert body["model"] == str(bundled_model_path()) and body["pid"] == w.proc.pid
    assert body["layers_total"] == 30
    assert body["gpu_layers"] == 0 and body["queue_depth"] == 64 and body["slots"] == 1


# ---------------------------------------------------------------- parent death


def test_worker_dies_with_its_parent(tmp_path: Path) -> None:
    """An agent killed hard (SIGKILL) must leave no orphan worker behind."""
    port = free_port()
    parent = subprocess.Popen(
        [sys.executable, "-c", (
            "import subprocess, sys, time\n"
            f"p = subprocess.Popen([sys.executable, '-m', 'rbee_agent.worker', '--worker-id',"
            f" 'orphan', '--model', {str(bundled_model_path())!r}, '--port', '{port}',"
            " '--api-key', 'k'])\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(120)\n"
        )],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )
    assert parent.stdout is not None
    child_pid = int(parent.stdout.readline())
    child = psutil.Process(child_pid)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    gone, _ = psutil.wait_procs([child], timeout=3)
    assert gone, "worker outlived its killed parent"
