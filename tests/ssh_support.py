"""SSH servers for tests: an in-process asyncssh server and OpenSSH's sshd, both on loopback.

`AsyncSshServer` runs commands for real (a subprocess on this machine), serves SFTP over the
real filesystem and allows direct-tcpip forwards; it starts in milliseconds. `OpenSshd` is the
real thing (`sshd -D -e -f cfg` with a temporary config); tests skip with the reason when
sshd is missing or cannot run here. Both accept only keys listed in their authorized_keys.
The fixtures that start them are in tests/ssh_fixtures.py.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh
import pytest

from rbee_tui.config import Node, OperatorSettings
from tests.support import free_port

SSHD = Path("/usr/sbin/sshd")
HOME = str(Path.home())


def fast_settings(**overrides: object) -> OperatorSettings:
    """B01's numbers shrunk: tests never wait seconds for a dead host."""
    values: dict[str, object] = {
        "ssh_connect_timeout_s": 2.0,
        "ssh_attempts": 3,
        "ssh_backoff_ms": [0, 20, 40],
        "agent_start_timeout_s": 60.0,
    }
    values.update(overrides)
    return OperatorSettings.model_validate(values)


def make_key(path: Path) -> Path:
    """A fresh ed25519 private key at `path` (0600) and its `.pub` beside it."""
    key = asyncssh.generate_private_key("ssh-ed25519", comment="rbee-test")
    key.write_private_key(str(path))
    key.write_public_key(str(path) + ".pub")
    path.chmod(0o600)
    return path


def public_line(key_path: Path) -> str:
    return Path(str(key_path) + ".pub").read_text().strip()


@dataclass
class SshEnv:
    """Per-test isolation: rbee's state dir (and so its known_hosts) lives in tmp."""

    tmp: Path
    key: Path
    other_key: Path

    @property
    def known_hosts(self) -> Path:
        from rbee_tui.ssh import known_hosts_path

        return known_hosts_path()

    @property
    def install(self) -> Path:
        """The install path of `node()` (unless a test gives another)."""
        return self.tmp / "install"

    def node(self, port: int, **fields: object) -> Node:
        values: dict[str, object] = {
            "name": "gpu1", "ssh_host": "127.0.0.1", "ssh_port": port,
            "ssh_user": getpass.getuser(), "ssh_key": str(self.key),
            "install_path": str(self.install),
        }
        values.update(fields)
        return Node.model_validate(values)


# ------------------------------------------------------------------ asyncssh server


class _ServerConn(asyncssh.SSHServer):
    """Public-key auth only (asyncssh checks authorized_client_keys); forwards allowed."""

    def __init__(self, live: list[asyncssh.SSHServerConnection]) -> None:
        self._live = live
        self._conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._live.append(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn in self._live:
            self._live.remove(self._conn)

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> bool:
        return True


async def _pump(reader: asyncio.StreamReader | asyncssh.SSHReader[bytes],
                writer: asyncio.StreamWriter | asyncssh.SSHWriter[bytes]) -> None:
    while True:
        data = await reader.read(65536)
        if not data:
            break
        writer.write(data)


async def _feed(process: asyncssh.SSHServerProcess[bytes],
                proc: asyncio.subprocess.Process) -> None:
    assert proc.stdin is not None
    try:
        await _pump(process.stdin, proc.stdin)
    except (asyncssh.Error, ConnectionError):
        pass
    finally:
        proc.stdin.close()


async def _exec(process: asyncssh.SSHServerProcess[bytes]) -> None:
    """Run the requested command with /bin/sh on this machine, like sshd would."""
    if not process.command:
        process.stderr.write(b"this test server runs commands only\n")
        process.exit(1)
        return
    proc = await asyncio.create_subprocess_exec(
        "/bin/sh", "-c", process.command, cwd=HOME,
        env={**os.environ, "PIP_FIND_LINKS": pip_find_links()},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    feeder = asyncio.ensure_future(_feed(process, proc))
    await asyncio.gather(_pump(proc.stdout, process.stdout),
                         _pump(proc.stderr, process.stderr))
    code = await proc.wait()
    feeder.cancel()
    process.exit(code)


@dataclass
class AsyncSshServer:
    authorized_keys: Path
    host_key: asyncssh.SSHKey = field(default_factory=lambda: asyncssh.generate_private_key(
        "ssh-ed25519"))
    port: int = 0
    live: list[asyncssh.SSHServerConnection] = field(default_factory=list)
    _server: asyncssh.SSHAcceptor | None = None

    async def start(self) -> AsyncSshServer:
        self._server = await asyncssh.create_server(
            lambda: _ServerConn(self.live), "127.0.0.1", self.port,
            server_host_keys=[self.host_key],
            authorized_client_keys=str(self.authorized_keys),
            process_factory=_exec, encoding=None,
            sftp_factory=True, allow_scp=False,
            login_timeout=10,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def fingerprint(self) -> str:
        return self.host_key.get_fingerprint("sha256")

    async def swap_host_key(self) -> None:
        """Restart on the same port with a new host key (a reinstalled node, or worse)."""
        await self.close()
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        await self.start()

    def freeze_connections(self) -> list[asyncssh.SSHServerConnection]:
        """Stop reading from every open connection: a link that hangs without closing."""
        for conn in self.live:
            conn._transport.pause_reading()  # type: ignore[union-attr]
        return list(self.live)

    async def drop_connections(self) -> None:
        """Cut every open connection, as a node reboot or a network drop would."""
        conns = list(self.live)
        for conn in conns:
            conn.abort()
        for conn in conns:
            await conn.wait_closed()

    async def close(self) -> None:
        await self.drop_connections()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


# ------------------------------------------------------------------ OpenSSH sshd


@dataclass
class OpenSshd:
    port: int
    proc: subprocess.Popen[bytes]
    home: Path
    host_key_pub: str

    @property
    def log_path(self) -> Path:
        return self.home / "sshd.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


SSHD_CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {home}/ssh_host_ed25519_key
PidFile {home}/sshd.pid
AuthorizedKeysFile {home}/authorized_keys
UsePAM no
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
Subsystem sftp internal-sftp
LogLevel VERBOSE
MaxStartups 100
SetEnv PIP_FIND_LINKS="{find_links}"{more_env}
"""


def pip_find_links() -> str:
    """Where a node's pip finds wheels in tests: the machine's own find-links and the
    llama-cpp-python wheel dev.sh built (else every install on a fresh machine compiles
    llama.cpp for ~6 minutes). sshd gives sessions a clean environment, so it is set there."""
    cache = os.environ.get("RBEE_WHEEL_CACHE") or str(Path.home() / ".cache/rbee/wheels")
    return " ".join(p for p in (os.environ.get("PIP_FIND_LINKS"), cache) if p)


def start_sshd(home: Path, authorized: list[Path], env: dict[str, str] | None = None
               ) -> OpenSshd:
    """Start sshd on a free loopback port, or skip the test saying why it cannot run.
    `env`: more variables for the sessions (a node with another PATH)."""
    if not SSHD.exists():
        pytest.skip(f"OpenSSH sshd is not installed ({SSHD} missing; .ci/run installs "
                    "openssh-server with apt-get)")
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen is not installed (package openssh-client)")
    if os.geteuid() == 0 and not Path("/run/sshd").is_dir():
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)  # privsep dir
    home.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                    str(home / "ssh_host_ed25519_key")], check=True)
    (home / "authorized_keys").write_text("".join(public_line(k) + "\n" for k in authorized))
    port = free_port()
    config = home / "sshd_config"
    more_env = "".join(f' {k}="{v}"' for k, v in (env or {}).items())  # one SetEnv line:
    # sshd takes the first line of each keyword
    config.write_text(SSHD_CONFIG.format(port=port, home=home, find_links=pip_find_links(),
                                         more_env=more_env))
    with (home / "sshd.log").open("wb") as log:
        proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    sshd = OpenSshd(port, proc, home, (home / "ssh_host_ed25519_key.pub").read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.skip(f"sshd cannot run here (exit {proc.returncode}): "
                        f"{sshd.log().strip()[-300:]}")
        if "Server listening" in sshd.log():
            return sshd
        time.sleep(0.02)
    sshd.stop()
    pytest.skip(f"sshd did not start listening within 10 s: {sshd.log().strip()[-300:]}")


# ------------------------------------------------------------------ things to reach


@dataclass
class TinyHttp:
    """A one-route HTTP server on loopback standing in for an agent behind a forward."""

    body: bytes
    port: int = 0
    hits: int = 0
    _server: asyncio.Server | None = None

    async def start(self) -> TinyHttp:
        self._server = await asyncio.start_server(self._answer, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        self.hits += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                     % (len(self.body), self.body))
        await writer.drain()
        writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


def fake_install(root: Path, port: int, **config: object) -> Path:
    """An agent 'installed' without pip: its venv is this test run's venv, where rbee is
    installed. For start/stop tests only: never run pip against it."""
    from rbee_agent.tomlfile import write_private_toml

    root.mkdir(parents=True, exist_ok=True)
    (root / "venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    values: dict[str, object] = {
        "api_key": "test-key-123456", "host": "127.0.0.1", "port": port,
        "data_dir": str(root / "data"), "log_dir": str(root / "logs"),
    }
    values.update(config)
    write_private_toml(root / "agent.toml", values)
    return root


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
