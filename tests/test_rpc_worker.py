"""B200-B203: a llama.cpp RPC server process and a worker that splits SmolLM2's layers onto
it, on this machine (both on the CPU), without the agent."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support import REPO, WorkerProc, free_port

PROMPT = "The capital of France is"


def start_rpc_server(tmp: Path, *extra: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    log = tmp / f"rpc-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rbee_agent.rpc_server", "--port", str(port),
             "--cache-dir", str(tmp / "rpc-cache"), *extra],
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    return proc, port, log


def listening(pid: int) -> list[tuple[str, int]]:
    """The TCP addresses a process listens on (psutil reads /proc/net/tcp and tcp6)."""
    return [(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections("tcp")
            if c.status == psutil.CONN_LISTEN]


def wait_listening(proc: subprocess.Popen[bytes], log: Path) -> list[tuple[str, int]]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text(errors="replace")
        found = listening(proc.pid)
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"the RPC server never listened:\n{log.read_text()}")


@pytest.fixture
def rpc_server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    proc, port, log = start_rpc_server(tmp_path)
    try:
        wait_listening(proc, log)
        yield proc, port, log
    finally:
        proc.kill()
        proc.wait(10)


def greedy(worker: WorkerProc, max_tokens: int = 24) -> str:
    r = httpx.post(f"{worker.url}/v1/inference", headers=worker.headers, timeout=120,
                   json={"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
                         "stream": False})
    assert r.status_code == 200, r.text
    text: str = r.json()["text"]
    return text


def test_b200_the_rpc_server_listens_on_loopback_only(
        rpc_server: tuple[subprocess.Popen[bytes], int, Path]) -> None:
    proc, port, _ = rpc_server
    assert listening(proc.pid) == [("127.0.0.1", port)]


def test_b200_the_rpc_server_has_no_host_option(tmp_path: Path) -> None:
    proc, _, log = start_rpc_server(tmp_path, "--host", "0.0.0.0")
    assert proc.wait(60) == 2
    assert "unrecognized arguments: --host" in log.read_text()


def test_b202_a_split_worker_gives_the_single_node_greedy_text(
        rpc_server: tuple[subprocess.Popen[bytes], int, Path],
        start_worker: Callable[..., WorkerProc], worker: WorkerProc) -> None:
    _, port, log = rpc_server
    split = start_worker("--rpc", f"127.0.0.1:{port}", "--gpu-layers", "15")
    assert "llama.cpp devices: CPU, RPC0" in split.log()
    assert greedy(split) == greedy(worker)
    assert "Accepted client connection" in log.read_text(), "the layers went to the server"


def test_b203_a_split_worker_whose_server_is_gone_exits_naming_it(
        start_worker: Callable[..., WorkerProc]) -> None:
    port = free_port()
    split = start_worker("--rpc", f"127.0.0.1:{port}", "--gpu-layers", "15", wait=False)
    assert split.proc.wait(60) != 0
    assert f"127.0.0.1:{port}" in split.log()


def test_b202_two_rpc_servers_share_the_offloaded_layers(
        tmp_path: Path, start_worker: Callable[..., WorkerProc], worker: WorkerProc) -> None:
    servers = [start_rpc_server(tmp_path / name) for name in ("a", "b")]
    try:
        for proc, _, log in servers:
            wait_listening(proc, log)
        before = [psutil.Process(proc.pid).memory_info().rss for proc, _, _ in servers]
        endpoints = ",".join(f"127.0.0.1:{port}" for _, port, _ in servers)
        split = start_worker("--rpc", endpoints, "--gpu-layers", "20", "--tensor-split", "1,1")
        assert "llama.cpp devices: CPU, RPC0, RPC1" in split.log()
        assert greedy(split) == greedy(worker)
        after = [psutil.Process(proc.pid).memory_info().rss for proc, _, _ in servers]
        grown = [(a - b) // 2**20 for a, b in zip(after, before, strict=True)]
        assert all(mb >= 20 for mb in grown), f"each server holds its layers: {grown} MB"
    finally:
        for proc, _, _ in servers:
            proc.kill()
            proc.wait(10)
