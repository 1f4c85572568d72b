"""llama.cpp RPC server processes the agent runs for split workers on other nodes (B201).

An RPC server exposes one device of this node (the CPU or one GPU) to the llama.cpp of a
split worker's head node. ggml-rpc has no authentication and no encryption, so the server
listens on 127.0.0.1 only (`rbee_agent.rpc_server` has no host option) and is reached
through the operator's SSH tunnel (docs/architecture.md, "Split models").

Each server is a child process in its own session that dies with the agent
(`--parent-pid`), started on a free loopback port; it counts as started once it listens
there. Its exit is noticed the moment it happens: a server that dies unasked is `failed`,
with its last output, until it is removed. `shutdown` stops them all with the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import signal
import socket
import sys
import time
from pathlib import Path

import psutil

from rbee_agent import resources
from rbee_agent.protocol import (
    ErrorCode,
    RbeeError,
    RpcServerInfo,
    RpcServerRequest,
    RpcServerState,
)
from rbee_agent.settings import AgentSettings
from rbee_agent.worker_launch import allowed_env

log = logging.getLogger("rbee.agent")

_LOG_TAIL_BYTES = 4096


class RpcServer:
    def __init__(self, server_id: str, request: RpcServerRequest, port: int,
                 log_path: Path) -> None:
        self.id = server_id
        self.device = request.device
        self.threads = request.threads or 1
        self.mem_mb = request.mem_mb
        self.port = port
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.state: RpcServerState = "starting"
        self.started_at = time.time()
        self.failure: RbeeError | None = None
        self.exited = asyncio.Event()
        self.last_used = time.monotonic()  # when a client was last seen connected

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def last_lines(self, n: int = 5) -> list[str]:
        try:
            with self.log_path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - _LOG_TAIL_BYTES))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if line.strip()][-n:]

    def listening(self) -> bool:
        """Whether the process listens on its loopback port (read from /proc, no connect:
        llama.cpp's server takes one client at a time with a backlog of one)."""
        if self.pid is None:
            return False
        with contextlib.suppress(psutil.Error):
            return any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.port
                       for c in psutil.Process(self.pid).net_connections("tcp"))
        return False

    def clients(self) -> int:
        """Connections a split worker (or its tunnel's sshd) holds to the server now."""
        if self.pid is None:
            return 0
        with contextlib.suppress(psutil.Error):
            return sum(1 for c in psutil.Process(self.pid).net_connections("tcp")
                       if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == self.port)
        return 0

    def info(self, free_mb: int | None) -> RpcServerInfo:
        return RpcServerInfo(
            id=self.id, device=self.device, port=self.port, pid=self.pid, state=self.state,
            started_at=self.started_at, free_mb=free_mb if self.state == "ready" else None,
            clients=self.clients() if self.state == "ready" else 0,
            error=self.failure.to_body().error if self.failure else None,
        )


class RpcServers:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.servers: dict[str, RpcServer] = {}
        self._ids = (f"rpc{n}-{secrets.token_hex(2)}" for n in itertools.count(1))
        self._log_dir = settings.log_dir / "rpc"
        self._cache_dir = settings.data_dir / "rpc-cache"
        self._watchers: set[asyncio.Task[None]] = set()
        self._closing = False

    # ------------------------------------------------------------------ views

    def offered_mb(self, server: RpcServer) -> int | None:
        """What a server offers: its device's free memory, capped at what was asked."""
        free = self.free_mb(server.device)
        if free is None or server.mem_mb is None:
            return free
        return min(free, server.mem_mb)

    def free_mb(self, device: str) -> int | None:
        """The memory a device offers a split worker, less the agent's reserve (MiB)."""
        if device == "cpu":
            return max(0, resources.ram_available_mb() - self.settings.ram_reserve_mb)
        index = int(device.removeprefix("cuda"))
        for gpu in resources.gpus():
            if gpu.index == index and gpu.vram_free_mb is not None:
                return max(0, gpu.vram_free_mb - self.settings.vram_reserve_mb)
        return None

    def infos(self) -> list[RpcServerInfo]:
        return [s.info(self.offered_mb(s)) for s in self.servers.values()]

    def get(self, server_id: str) -> RpcServer:
        server = self.servers.get(server_id)
        if server is None:
            raise RbeeError(
                ErrorCode.NOT_FOUND, f"No RPC server {server_id[:80]!r} on this node",
                hint="List them with GET /v1/rpc-servers.",
                details={"rpc_server_id": server_id[:80], "rpc_servers": sorted(self.servers)})
        return server

    # ------------------------------------------------------------------ start

    async def start(self, request: RpcServerRequest) -> RpcServerInfo:
        if self._closing:
            raise RbeeError(ErrorCode.AGENT_SHUTTING_DOWN, "The agent is shutting down")
        free = await asyncio.to_thread(self.free_mb, request.device)
        if request.device != "cpu" and free is None:
            raise RbeeError(ErrorCode.DEVICE_NOT_FOUND,
                            f"No GPU {request.device.removeprefix('cuda')} on this node",
                            hint="Serve device cpu, or one of the node's GPUs (rbee nodes "
                                 "check NODE lists them).")
        self._log_dir.mkdir(parents=True, exist_ok=True)
        server_id = next(self._ids)
        server = RpcServer(server_id, request, _free_loopback_port(),
                           self._log_dir / f"{server_id}.log")
        self.servers[server_id] = server
        try:
            await self._launch(server)
            await self._wait_listening(server)
        except BaseException:
            await self._stop(server)
            self.servers.pop(server_id, None)
            raise
        server.state = "ready"
        log.info("rpc server %s (pid %s) serves %s on 127.0.0.1:%d", server.id, server.pid,
                 server.device, server.port)
        return server.info(self.offered_mb(server))

    async def _launch(self, server: RpcServer) -> None:
        env = allowed_env()
        env["PYTHONUNBUFFERED"] = "1"
        device = server.device
        if device != "cpu":  # one GPU, numbered as NVML does, seen as cuda0 inside
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
            env["CUDA_VISIBLE_DEVICES"] = device.removeprefix("cuda")
            device = "cuda0"
        cmd = [sys.executable, "-m", "rbee_agent.rpc_server", "--port", str(server.port),
               "--device", device, "--threads", str(server.threads),
               "--cache-dir", str(self._cache_dir), "--parent-pid", str(os.getpid())]
        with server.log_path.open("ab") as out:
            server.proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=out,
                stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True)
        task = asyncio.ensure_future(self._watch_exit(server, server.proc))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _wait_listening(self, server: RpcServer) -> None:
        async with asyncio.timeout(self.settings.start_timeout_s):
            while not await asyncio.to_thread(server.listening):
                if server.exited.is_set():
                    raise self._start_failed(server, "exited")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(server.exited.wait(), 0.05)

    def _start_failed(self, server: RpcServer, how: str) -> RbeeError:
        lines = server.last_lines()
        return RbeeError(
            ErrorCode.WORKER_START_FAILED,
            f"RPC server {server.id} for {server.device} {how} while starting: "
            f"{lines[-1] if lines else 'no output'}",
            hint=f"See its log on the node: {server.log_path}",
            details={"rpc_server_id": server.id, "last_lines": lines},
        )

    async def _watch_exit(self, server: RpcServer, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        server.exited.set()
        if server.state in ("stopping", "stopped"):
            server.state = "stopped"
            return
        server.failure = RbeeError(
            ErrorCode.WORKER_CRASHED,
            f"RPC server {server.id} ({server.device}, port {server.port}) exited with code "
            f"{code}",
            hint=f"See its log on the node: {server.log_path}",
            details={"rpc_server_id": server.id, "exit_code": code,
                     "last_lines": server.last_lines()},
        )
        server.state = "failed"
        log.warning("%s", server.failure.message)

    async def reap_unused(self, every_s: float) -> None:
        """B209: stop a server no client has held for `rpc_unused_stop_s`. A split worker
        keeps its connection while its model is loaded, so a server without one serves
        nobody: the operator that held the split's tunnels died, or never spawned it."""
        while True:
            await asyncio.sleep(every_s)
            now = time.monotonic()
            for server in list(self.servers.values()):
                if server.state != "ready":
                    continue
                if await asyncio.to_thread(server.clients):
                    server.last_used = now
                elif now - server.last_used >= self.settings.rpc_unused_stop_s:
                    log.info("rpc server %s has had no client for %.0f s; stopping it",
                             server.id, now - server.last_used)
                    await self._stop(server)
                    self.servers.pop(server.id, None)

    # ------------------------------------------------------------------ stop

    async def stop(self, server_id: str) -> RpcServerInfo:
        server = self.get(server_id)
        await self._stop(server)
        self.servers.pop(server_id, None)
        return server.info(None)

    async def _stop(self, server: RpcServer) -> None:
        """SIGTERM (llama.cpp's server has nothing to flush), SIGKILL after the grace."""
        if server.state not in ("failed", "stopped"):
            server.state = "stopping"
        proc = server.proc
        if proc is None or proc.returncode is not None:
            if server.state == "stopping":
                server.state = "stopped"
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.settings.stop_grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        log.info("rpc server %s stopped", server.id)

    async def shutdown(self) -> None:
        self._closing = True
        await asyncio.gather(*(self._stop(s) for s in list(self.servers.values())),
                             return_exceptions=True)
        self.servers.clear()
        for task in list(self._watchers):
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
