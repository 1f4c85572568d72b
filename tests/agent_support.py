"""Real `rbee-agent serve` processes on free loopback ports, with settings shrunk for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support import REPO, free_port

FAST = {
    "health-interval-s": "30",
    "idle-timeout-s": "300",
    "idle-check-s": "0.1",
    "stop-grace-s": "5",
    # No worker queue unless a test asks: a busy 1-slot worker answers ALL_SLOTS_BUSY at once
    # (B44) instead of holding the request; tests of the queue set their own depth.
    "worker-queue-depth": "0",
}


@dataclass
class AgentProc:
    proc: subprocess.Popen[bytes]
    port: int
    home: Path
    key: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def log(self) -> str:
        return (self.home / "stderr.log").read_text(errors="replace")

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=60)

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.url + path, headers=self.headers, timeout=60, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.post(self.url + path, headers=self.headers, timeout=60, **kw)

    def delete(self, path: str) -> httpx.Response:
        return httpx.delete(self.url + path, headers=self.headers, timeout=60)

    def spawn(self, model_ref: str = "smollm2-135m", **kw: Any) -> dict[str, Any]:
        r = self.post("/v1/workers", json={"model_ref": model_ref, **kw})
        assert r.status_code in (200, 201), r.text
        return dict(r.json()["worker"])

    def wait_state(self, worker_id: str, state: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.get(f"/v1/workers/{worker_id}")
            if r.status_code == 200 and r.json()["state"] == state:
                return dict(r.json())
            time.sleep(0.05)
        raise AssertionError(f"worker {worker_id} never reached {state}:\n{self.log()}")

    def wait_gone(self, worker_id: str, timeout: float) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.get(f"/v1/workers/{worker_id}").status_code == 404:
                return time.monotonic() - start
            time.sleep(0.02)
        raise AssertionError(f"worker {worker_id} still listed after {timeout}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_agent(
    home: Path, key: str = "agent-test-key", env: dict[str, str] | None = None,
    port: int | None = None, **settings: str | None,
) -> AgentProc:
    """An agent on a free port (or `port`); `env` adds to (or overrides) the inherited
    environment."""
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    first = free_port()
    flags = {**FAST, "worker-port-min": str(first), "worker-port-max": str(first + 50),
             **settings, "data-dir": str(home / "data"), "log-dir": str(home / "logs"),
             "port": str(port)}
    args = [sys.executable, "-m", "rbee_agent", "serve", "--config", str(home / "agent.toml")]
    for name, value in flags.items():
        args += [f"--{name}"] if value is None else [f"--{name}", value]  # None: a switch
    full_env = {**os.environ, "RBEE_AGENT_API_KEY": key, "PYTHONUNBUFFERED": "1", **(env or {})}
    with (home / "stderr.log").open("ab") as err:
        proc = subprocess.Popen(args, stdout=err, stderr=subprocess.STDOUT, cwd=REPO,
                                env=full_env)
    agent = AgentProc(proc, port, home, key)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"agent exited {proc.returncode}:\n{agent.log()}")
        try:
            if httpx.get(f"{agent.url}/v1/health", timeout=1).status_code == 200:
                return agent
        except httpx.TransportError:
            time.sleep(0.05)
    raise AssertionError(f"agent did not start:\n{agent.log()}")
