"""B09: callers racing to start the local agent start exactly one, and rbee keeps its pid."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from rbee_tui import local_agent
from rbee_tui.config import OperatorSettings
from tests.cli_support import RbeeEnv


def test_b09_racing_callers_start_one_agent(rbee: RbeeEnv,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEE_CONFIG", str(rbee.config))
    settings = OperatorSettings(local_agent_port=rbee.port)
    with ThreadPoolExecutor(4) as pool:
        agents = list(pool.map(lambda _: local_agent.find_or_start(settings), range(4)))
    assert sum(a.started_here for a in agents) == 1
    started = next(a for a in agents if a.started_here)
    assert local_agent.recorded_pid() == started.pid
    agent_processes = [p for p in psutil.process_iter(["cmdline"])
                       if str(rbee.state) in " ".join(p.info["cmdline"] or [])
                       and "rbee_agent" in " ".join(p.info["cmdline"] or [])]
    assert [p.pid for p in agent_processes] == [started.pid]
