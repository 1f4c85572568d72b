from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.agent_support import AgentProc
from tests.agent_support import start_agent as start_agent_process
from tests.cli_support import RbeeEnv, make_env
from tests.support import WorkerProc, start_worker_process


@pytest.fixture(autouse=True)
def isolated_operator_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test touches the real config, state or saved chats: `RBEE_CONFIG` points into the
    test's temp dir unless the test sets it itself."""
    monkeypatch.setenv("RBEE_CONFIG", str(tmp_path / "operator" / "config.toml"))


@pytest.fixture(autouse=True)
def no_cursor_blink(monkeypatch: pytest.MonkeyPatch) -> None:
    """A blinking cursor makes snapshots and Pilot timing depend on the clock (harlequin)."""
    from textual.widgets import Input, TextArea

    monkeypatch.setattr(Input, "cursor_blink", False)
    monkeypatch.setattr(TextArea, "cursor_blink", False)


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
