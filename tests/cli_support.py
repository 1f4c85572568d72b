"""Run the real `rbee` command in a subprocess with an isolated config (RBEE_CONFIG)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import tomli_w

from tests.support import REPO, default_sigint, free_port


@dataclass
class RbeeEnv:
    home: Path
    env: dict[str, str]
    port: int

    @property
    def config(self) -> Path:
        return self.home / "config.toml"

    @property
    def state(self) -> Path:
        return self.home / "state"

    def run(self, *args: str, timeout: float = 120, input: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "rbee_tui", *args], capture_output=True,
                              text=True, cwd=REPO, env=self.env, timeout=timeout, input=input)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "rbee_tui", *args], cwd=REPO,
                                env=self.env, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, preexec_fn=default_sigint)

    def write_config(self, settings: dict[str, Any], nodes: dict[str, Any] | None = None
                     ) -> None:
        self.config.write_bytes(tomli_w.dumps({"settings": {"local_agent_port": self.port,
                                                            **settings},
                                               "nodes": nodes or {}}).encode())

    def agent_pid(self) -> int | None:
        try:
            return int((self.state / "local-agent.pid").read_text().split()[0])
        except (FileNotFoundError, ValueError):
            return None

    def stop_local_agent(self) -> None:
        pid = self.agent_pid()
        if pid is None:
            return
        try:
            process = psutil.Process(pid)
            process.send_signal(signal.SIGTERM)
            psutil.wait_procs([process], timeout=30)
        except psutil.NoSuchProcess:
            pass


def make_env(home: Path, **settings: Any) -> RbeeEnv:
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RBEE_CONFIG": str(home / "config.toml"), "PYTHONUNBUFFERED": "1",
           "COLUMNS": "200"}
    env.pop("RBEE_AGENT_API_KEY", None)
    rbee = RbeeEnv(home, env, free_port())
    rbee.write_config(settings)
    return rbee
