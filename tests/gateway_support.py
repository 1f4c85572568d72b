"""`rbee serve` in a subprocess with its own operator config, for the gateway tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import tomli_w
from prometheus_client.parser import text_string_to_metric_families

from tests.agent_support import AgentProc
from tests.support import REPO, free_port

# Routing sees every change at once; a node that is down is asked again every 0.1 s.
FAST = {"gateway_state_ttl_s": 0.0, "gateway_health_interval_s": 0.1,
        "gateway_refresh_timeout_s": 10.0, "http_attempts": 1}


def direct(agent: AgentProc) -> dict[str, Any]:
    """A registry entry that reaches `agent` over direct HTTP."""
    return {"transport": "direct", "agent_host": "127.0.0.1", "agent_port": agent.port,
            "api_key": agent.key}


@dataclass
class GatewayProc:
    proc: subprocess.Popen[str]
    url: str
    key: str
    config: Path

    def sdk(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=key or self.key, max_retries=0,
                             timeout=120)

    def get(self, path: str, key: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key or self.key}"}
        return httpx.get(self.url.removesuffix("/v1") + path, headers=headers, timeout=30)

    def metrics(self) -> dict[str, list[Any]]:
        """Every sample of `GET /metrics`, by family name (parsed as Prometheus does)."""
        reply = self.get("/metrics")
        assert reply.status_code == 200, reply.text
        return {family.name: family.samples
                for family in text_string_to_metric_families(reply.text)}

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        assert self.proc.stderr is not None
        return self.proc.stderr.read()


def start_gateway(home: Path, nodes: dict[str, dict[str, Any]], *args: str,
                  **settings: Any) -> GatewayProc:
    """`rbee serve` on a free port for the nodes given (`localhost` among them, so that no
    local agent of this machine is started)."""
    config = home / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_bytes(tomli_w.dumps({"settings": {**FAST, **settings},
                                      "nodes": nodes}).encode())
    env = {**os.environ, "RBEE_CONFIG": str(config)}
    proc = subprocess.Popen([sys.executable, "-m", "rbee_tui", "serve", "--port",
                             str(free_port()), *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    first, second = proc.stdout.readline(), proc.stdout.readline()
    if not second.startswith("API key: "):
        proc.kill()
        raise AssertionError(f"rbee serve did not start: {first}{second}"
                             f"{proc.communicate()[1]}")
    return GatewayProc(proc, first.split()[-1], second.split()[-1], config)
