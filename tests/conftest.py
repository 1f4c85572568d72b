from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.agent_support import AgentProc
from tests.agent_support import start_agent as start_agent_process
from tests.cli_support import RbeeEnv, make_env
from tests.support import WorkerProc, start_worker_process


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProc]]:
    """Start real worker processes on free loopback ports; all are killed at teardown."""
    started: list[WorkerProc] = []

    def start(*extra: str, wait: bool = True, key: str = "test-key-123456") -> WorkerProc:
        worker = start_worker_process(tmp_path, *extra, key=key)
        started.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProc]:
    """One shared idle worker (1 slot) for tests that leave it idle when they finish."""
    w = start_worker_process(tmp_path_factory.mktemp("worker"))
    try:
        w.wait_ready()
        yield w
    finally:
        w.stop()


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Callable[..., AgentProc]]:
    """Start real agents; each is stopped (SIGTERM, then SIGKILL) at teardown."""
    started: list[AgentProc] = []

    def start(name: str = "agent", **settings: str) -> AgentProc:
        agent = start_agent_process(tmp_path / name, **settings)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProc]:
    """One shared agent for tests that leave no workers behind."""
    a = start_agent_process(tmp_path_factory.mktemp("agent"))
    try:
        yield a
    finally:
        a.stop()


@pytest.fixture
def rbee(tmp_path: Path) -> Iterator[RbeeEnv]:
    """An isolated operator config; the local agent it starts is stopped at teardown."""
    env = make_env(tmp_path / "rbee")
    yield env
    env.stop_local_agent()
