"""What the agent claims before it touches shared state: its port, then its data dir (B130).

Binding first means a second agent started on a taken port leaves no trace: it has not yet
opened the log file, the catalog or the models dir. The data-dir lock (an `flock` on
`<data dir>/agent.lock`, which holds the owner's pid) keeps two agents from sharing one
catalog and one models dir, where one could delete a file the other's worker reads. The
kernel drops the lock when the process dies, however it dies, so a stale lock file is
harmless.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from pathlib import Path
from types import TracebackType

import psutil

from rbee_agent.protocol import ErrorCode, RbeeError

LOCK_NAME = "agent.lock"


def bind_listener(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or PORT_IN_USE naming the owner when visible."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno != errno.EADDRINUSE:
            raise RbeeError(ErrorCode.INVALID_CONFIG,
                            f"Cannot listen on {host}:{port}: {exc.strerror}",
                            hint="Check the host and port settings.") from None
        owner = port_owner(port)
        raise RbeeError(
            ErrorCode.PORT_IN_USE,
            f"Port {port} on {host} is already in use" + (f" by {owner}" if owner else ""),
            hint="Another agent may already run there (rbee-agent answers /v1/health); "
            "stop it, or start this one with --port N.",
            details={"port": port, "owner": owner},
        ) from None
    sock.setblocking(False)
    return sock


def port_owner(port: int) -> str | None:
    """'pid N (name)' of the process listening on `port`, when this user may see it."""
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                if conn.pid is None:
                    return None
                try:
                    return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
                except psutil.Error:
                    return f"pid {conn.pid}"
    return None


class DataDirLock:
    """An exclusive lock on the data dir for as long as the agent runs."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> DataDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RbeeError(
                ErrorCode.DATA_DIR_LOCKED,
                f"The data dir {self.path.parent} is in use by another agent (pid {holder})",
                hint="Run one agent per data dir: stop that one, or give this one another "
                "--data-dir.",
                details={"data_dir": str(self.path.parent), "pid": holder},
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
