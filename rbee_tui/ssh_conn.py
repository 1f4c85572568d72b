"""SSH connections to nodes (asyncssh): connect with retries, classify failures, run
commands, SFTP, local port forwards. `rbee_tui.ssh` is the public face; import from there.

- `Dialer` / `connect()`: tries by the `ssh_retry` policy (the one retry policy, B142) with
  `ssh_connect_timeout_s` each, one `Attempt` event per try (B01). Only an unreachable host
  is retried; refused authentication and host-key problems end at once (retrying cannot
  help) with their own message and fix (B02).
- Host keys are checked against rbee's own known_hosts (`ssh_hostkeys`), never
  ~/.ssh/known_hosts. An unknown key is added only when the caller says the operator
  accepted it; a changed key is never accepted.
- `SshConnection`: `run`, `run_script`, `stream`, SFTP `upload`/`write_file`/`read_file`,
  and `forward` (a local port forward to a port on the node, B10).

This module never prompts, never prints, and never puts a secret on a command line (files
holding secrets go over SFTP). Failures leave it only as `RbeeError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import posixpath
import shlex
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from rbee_agent.protocol import ErrorCode, RbeeError
from rbee_tui.config import Node, OperatorSettings
from rbee_tui.events import Attempt, Event, HostKeyUnknown, PhaseDone, PhaseStarted
from rbee_tui.ssh_hostkeys import HostKeys, host_key_error, known_hosts_path

TAIL_LINES = 20
KEEPALIVE_COUNT = 3
VENV_DIR = "venv"


# ------------------------------------------------------------------ small helpers


def ssh_user(node: Node) -> str:
    return node.ssh_user or getpass.getuser()


def address(node: Node) -> str:
    host = node.ssh_host or "?"
    return f"[{host}]:{node.ssh_port}" if ":" in host else f"{host}:{node.ssh_port}"


def target(node: Node) -> str:
    return f"{ssh_user(node)}@{address(node)}"


def ssh_command_line(node: Node) -> str:
    """The plain `ssh` command that reaches the node, for hints."""
    parts = ["ssh"]
    if node.ssh_port != 22:
        parts += ["-p", str(node.ssh_port)]
    if node.ssh_key:
        parts += ["-i", node.ssh_key]
    parts.append(f"{ssh_user(node)}@{node.ssh_host}")
    return " ".join(shlex.quote(p) for p in parts)


def shell_path(path: str) -> str:
    """A shell word for a node path, expanding a leading `~` to the remote $HOME."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def require_ssh(node: Node) -> str:
    """The node's SSH host, or INVALID_REQUEST for a node that is not reached over SSH."""
    if node.is_local:
        raise RbeeError(
            ErrorCode.INVALID_REQUEST,
            f"Node '{node.name}' is this machine: it needs no SSH",
            hint="rbee starts the local agent itself when a command needs it.",
        )
    if not node.ssh_host:
        raise RbeeError(
            ErrorCode.INVALID_REQUEST,
            f"Node '{node.name}' has no SSH host",
            hint=f"Set one with: rbee nodes edit {node.name} --ssh-host HOST",
        )
    return node.ssh_host


def _tail(text: str, lines: int = TAIL_LINES) -> list[str]:
    return [line for line in text.splitlines() if line.strip()][-lines:]


# ------------------------------------------------------------------ failures


def _auth_error(node: Node, key_path: Path | None, reason: str) -> RbeeError:
    user, host = ssh_user(node), node.ssh_host
    key = str(key_path) if key_path else "your default keys (~/.ssh/id_*, ssh-agent)"
    copy = (f"ssh-copy-id -i {shlex.quote(str(key_path))}.pub" if key_path else "ssh-copy-id")
    port = f" -p {node.ssh_port}" if node.ssh_port != 22 else ""
    return RbeeError(
        ErrorCode.SSH_AUTH_FAILED,
        f"{address(node)} refused the login of user '{user}' with {key} ({reason})",
        hint=f"Put the public key in ~{user}/.ssh/authorized_keys on the node "
        f"({copy}{port} {user}@{host} does it); keep ~/.ssh at mode 700 and "
        "authorized_keys at 600 there, and the private key at 600 here; check the user name.",
        details={"node": node.name, "host": host, "port": node.ssh_port, "user": user,
                 "key": str(key_path) if key_path else None},
    )


def _unreachable(node: Node, reason: str) -> RbeeError:
    return RbeeError(
        ErrorCode.SSH_UNREACHABLE,
        f"Cannot reach {address(node)} over SSH: {reason}",
        hint="Check the host name and port, that the machine is on, and that sshd runs there "
        f"(try: {ssh_command_line(node)}).",
        details={"node": node.name, "host": node.ssh_host, "port": node.ssh_port},
    )


def classify(exc: BaseException, node: Node, keys: HostKeys, key_path: Path | None,
             timeout_s: float) -> RbeeError:
    """Turn whatever asyncssh or the socket layer raised into one RbeeError."""
    if isinstance(exc, RbeeError):
        return exc
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return host_key_error(node, keys)
    if isinstance(exc, asyncssh.PermissionDenied):
        return _auth_error(node, key_path, exc.reason or "permission denied")
    if isinstance(exc, TimeoutError):
        return _unreachable(node, f"no SSH answer within {timeout_s:g} s")
    if isinstance(exc, ConnectionRefusedError):
        return _unreachable(node, "connection refused (is sshd listening on that port?)")
    if isinstance(exc, OSError):
        return _unreachable(node, exc.strerror or str(exc) or type(exc).__name__)
    if isinstance(exc, asyncssh.DisconnectError):
        return _unreachable(node, f"the connection was closed during the handshake "
                                  f"({exc.reason or type(exc).__name__})")
    return _unreachable(node, f"{type(exc).__name__}: {exc}")


def load_key(node: Node) -> tuple[Path | None, asyncssh.SSHKey | None]:
    """Check the node's key file here, before anything is sent (B01)."""
    if not node.ssh_key:
        return None, None
    path = Path(node.ssh_key).expanduser()
    hint = "Fix the key path (rbee nodes edit), or leave it empty to use ssh-agent and " \
           "~/.ssh/id_* keys. Make a key with: ssh-keygen -t ed25519"
    if not path.is_file():
        problem = "is not a file" if path.exists() else "does not exist"
        raise RbeeError(ErrorCode.SSH_KEY_MISSING, f"The SSH key file {path} {problem}",
                        hint=hint, details={"node": node.name, "key": str(path)})
    try:
        return path, asyncssh.read_private_key(path)
    except OSError as exc:
        raise RbeeError(ErrorCode.SSH_KEY_MISSING,
                        f"The SSH key file {path} cannot be read: {exc.strerror}",
                        hint=hint, details={"node": node.name, "key": str(path)}) from None
    except (asyncssh.KeyImportError, ValueError) as exc:
        encrypted = "passphrase" in str(exc).lower()
        raise RbeeError(
            ErrorCode.SSH_AUTH_FAILED,
            f"The SSH key file {path} is passphrase-protected" if encrypted
            else f"The file {path} is not an SSH private key ({exc})",
            hint=f"rbee does not ask for passphrases: run ssh-add {shlex.quote(str(path))} and "
            "leave the node's key path empty so ssh-agent is used." if encrypted else hint,
            details={"node": node.name, "key": str(path)},
        ) from None


# ------------------------------------------------------------------ connecting


class _Client(asyncssh.SSHClient):
    def __init__(self, keys: HostKeys) -> None:
        self._keys = keys
        self.lost = False

    def validate_host_public_key(self, host: str, addr: str, port: int,
                                 key: asyncssh.SSHKey) -> bool:
        return self._keys.validate(key)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


async def connect_once(node: Node, settings: OperatorSettings, *,
                       accept_new_host_key: bool = False) -> SshConnection:
    """One try, no retries; any failure comes out as a classified RbeeError."""
    host = require_ssh(node)
    key_path, key = load_key(node)
    keys = HostKeys(known_hosts_path(), accept_new_host_key)
    client = _Client(keys)
    options: dict[str, Any] = {
        "port": node.ssh_port,
        "known_hosts": keys.match,
        "client_factory": lambda: client,
        "connect_timeout": settings.ssh_connect_timeout_s,
        "keepalive_interval": settings.ssh_connect_timeout_s,
        "keepalive_count_max": KEEPALIVE_COUNT,
    }
    if node.ssh_user:
        options["username"] = node.ssh_user
    if key is not None:
        options["client_keys"] = [key]
        options["agent_path"] = None  # like IdentitiesOnly: the configured key, nothing else
    try:
        conn = await asyncssh.connect(host, **options)
    except (OSError, asyncssh.Error, TimeoutError) as exc:
        if keys.accepted and isinstance(exc, asyncssh.PermissionDenied):
            keys.remember()  # the key exchange proved the host key
        raise classify(exc, node, keys, key_path, settings.ssh_connect_timeout_s) from None
    if keys.accepted:
        keys.remember()
    return SshConnection(node, settings, conn, client)


class Dialer:
    """Connect with retries, as a stream of events; `connection` is set once it answered.

        dialer = Dialer(node, settings)
        async for event in dialer.events():
            yield event
        conn = dialer.connection
    """

    def __init__(self, node: Node, settings: OperatorSettings, *,
                 accept_new_host_key: bool = False, phase: str = "ssh") -> None:
        self.node = node
        self.settings = settings
        self.accept_new_host_key = accept_new_host_key
        self.phase = phase
        self.connection: SshConnection | None = None

    async def events(self) -> AsyncIterator[Event]:
        require_ssh(self.node)
        load_key(self.node)  # a missing key ends here: nothing is sent
        retry = self.settings.ssh_retry
        for number in range(1, retry.attempts + 1):
            try:
                self.connection = await connect_once(
                    self.node, self.settings, accept_new_host_key=self.accept_new_host_key)
            except RbeeError as err:
                wait = (retry.wait_after(number) if err.code == ErrorCode.SSH_UNREACHABLE
                        else None)
                err.details["attempts"] = number
                yield Attempt(self.phase, number, retry.attempts, error=err, retry_in_s=wait)
                if err.code == ErrorCode.SSH_HOST_KEY_UNKNOWN:
                    d = err.details
                    yield HostKeyUnknown(d["host"], d["port"], d["key_type"], d["fingerprint"])
                if wait is None:
                    raise err
                await asyncio.sleep(wait)
                continue
            yield Attempt(self.phase, number, retry.attempts)
            return

    async def phase_events(self) -> AsyncIterator[Event]:
        """`events()` framed as a visible step: PhaseStarted, the Attempts, PhaseDone.
        A node without SSH settings or with a missing key fails before the first event."""
        require_ssh(self.node)
        load_key(self.node)
        yield PhaseStarted(self.phase, f"Connecting to {target(self.node)}")
        async for event in self.events():
            yield event
        yield PhaseDone(self.phase, f"Connected to {target(self.node)}")

    @property
    def opened(self) -> SshConnection:
        assert self.connection is not None, "Dialer.events() has not connected yet"
        return self.connection

    async def open(self) -> SshConnection:
        """Connect, ignoring the events."""
        async for _event in self.events():
            pass
        assert self.connection is not None
        return self.connection


@asynccontextmanager
async def connect(node: Node, settings: OperatorSettings, *,
                  accept_new_host_key: bool = False) -> AsyncIterator[SshConnection]:
    """`async with connect(node, settings) as conn:` — retried per B01, closed on exit."""
    conn = await Dialer(node, settings, accept_new_host_key=accept_new_host_key).open()
    try:
        yield conn
    finally:
        await conn.close()


# ------------------------------------------------------------------ the connection


@dataclass(frozen=True)
class CommandResult:
    command: str
    exit_status: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


class SshConnection:
    """One open SSH connection to a node. Close it (or use `connect()`)."""

    def __init__(self, node: Node, settings: OperatorSettings,
                 conn: asyncssh.SSHClientConnection, client: _Client) -> None:
        self.node = node
        self.settings = settings
        self._conn = conn
        self._client = client
        self._listeners: list[asyncssh.SSHListener] = []
        self._sftp: asyncssh.SFTPClient | None = None
        self._home: str | None = None

    @property
    def closed(self) -> bool:
        return self._client.lost or self._conn.is_closed()

    async def close(self) -> None:
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        if self._sftp is not None:
            self._sftp.exit()
            self._sftp = None
        self._conn.close()
        try:
            await asyncio.wait_for(self._conn.wait_closed(), self.settings.ssh_connect_timeout_s)
        except (TimeoutError, OSError, asyncssh.Error):
            self._conn.abort()

    async def __aenter__(self) -> SshConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -------------------------------------------------------------- errors

    def lost(self, exc: BaseException) -> RbeeError:
        reason = getattr(exc, "reason", "") or str(exc) or type(exc).__name__
        return RbeeError(
            ErrorCode.SSH_UNREACHABLE,
            f"Lost the SSH connection to node '{self.node.name}' ({address(self.node)}): "
            f"{reason}",
            hint=f"Check the node and the network (try: {ssh_command_line(self.node)}).",
            details={"node": self.node.name, "host": self.node.ssh_host,
                     "port": self.node.ssh_port},
        )

    def failed(self, what: str, command: str, status: int, output: str) -> RbeeError:
        tail = _tail(output)
        last = tail[-1] if tail else "no error output"
        return RbeeError(
            ErrorCode.SSH_COMMAND_FAILED,
            f"{what} failed on node '{self.node.name}' (exit {status}): {last}",
            hint=f"The remote output is in the details; try it by hand: "
            f"{ssh_command_line(self.node)} {shlex.quote(command)}",
            details={"node": self.node.name, "command": command, "exit_status": status,
                     "stderr_tail": tail},
        )

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except asyncssh.SFTPError as exc:
            raise RbeeError(
                ErrorCode.SSH_COMMAND_FAILED,
                f"{what} failed on node '{self.node.name}': {exc.reason}",
                hint="Check the path and its permissions on the node, and free disk space.",
                details={"node": self.node.name, "sftp_code": exc.code},
            ) from None
        except asyncssh.ChannelOpenError as exc:
            raise RbeeError(
                ErrorCode.SSH_COMMAND_FAILED,
                f"{what}: node '{self.node.name}' refused the SSH channel ({exc.reason})",
                hint="The node's sshd may forbid this (AllowTcpForwarding, Subsystem sftp).",
                details={"node": self.node.name},
            ) from None
        except (asyncssh.DisconnectError, asyncssh.ConnectionLost, BrokenPipeError,
                ConnectionError) as exc:
            raise self.lost(exc) from None

    # -------------------------------------------------------------- commands

    async def run(self, command: str, *, check: bool = True, input: str | None = None,
                  limit_s: float | None = None, what: str | None = None) -> CommandResult:
        """Run a command through the login shell. A non-zero exit with `check` raises
        SSH_COMMAND_FAILED with the stderr tail and the command."""
        label = what or f"'{command}'"
        with self._errors(label):
            try:
                done = await self._conn.run(command, input=input, check=False, timeout=limit_s,
                                            errors="replace")
            except asyncssh.TimeoutError as exc:
                raise self.failed(f"{label} (timed out after {limit_s:g} s)", command, -1,
                                  str(exc.stderr or "")) from None
        status = done.returncode if done.returncode is not None else -1
        result = CommandResult(command, status, str(done.stdout or ""), str(done.stderr or ""))
        if check and not result.ok:
            raise self.failed(label, command, status, result.stderr or result.stdout)
        return result

    async def run_script(self, script: str, *, check: bool = True,
                         limit_s: float | None = None, what: str | None = None
                         ) -> CommandResult:
        """Run a POSIX sh script, whatever the user's login shell is."""
        return await self.run(f"sh -c {shlex.quote(script)}", check=check, limit_s=limit_s,
                              what=what)

    async def stream(self, command: str, *, what: str | None = None) -> AsyncIterator[str]:
        """Yield the command's output lines (stderr merged) as they come; a non-zero exit
        raises SSH_COMMAND_FAILED with the last lines."""
        label = what or f"'{command}'"
        last: deque[str] = deque(maxlen=TAIL_LINES)
        with self._errors(label):
            process = await self._conn.create_process(command, stderr=asyncssh.STDOUT,
                                                      errors="replace")
        try:
            with self._errors(label):
                async for raw in process.stdout:
                    if not raw:  # end of output
                        break
                    line = str(raw).rstrip("\r\n")
                    last.append(line)
                    yield line
                done = await process.wait()
        finally:
            process.close()
        status = done.returncode if done.returncode is not None else -1
        if status != 0:
            raise self.failed(label, command, status, "\n".join(last))

    async def alive(self) -> bool:
        """True when the node still answers on this connection."""
        if self.closed:
            return False
        try:
            async with asyncio.timeout(self.settings.ssh_connect_timeout_s):
                return (await self.run("true", check=False)).ok
        except (RbeeError, TimeoutError):
            return False

    # -------------------------------------------------------------- paths and files

    async def home(self) -> str:
        if self._home is None:
            out = await self.run_script('printf "%s" "$HOME"', what="Reading $HOME")
            self._home = out.stdout.strip() or "/"
        return self._home

    async def abs_path(self, path: str) -> str:
        """The node path with `~` expanded and relative paths taken from $HOME."""
        if path.startswith("/"):
            return posixpath.normpath(path)
        home = await self.home()
        rest = path[1:].lstrip("/") if path.startswith("~") else path
        return posixpath.normpath(posixpath.join(home, rest))

    async def sftp(self) -> asyncssh.SFTPClient:
        if self._sftp is None:
            with self._errors("Opening SFTP"):
                self._sftp = await self._conn.start_sftp_client()
        return self._sftp

    async def upload(self, local: Path, remote: str) -> None:
        sftp = await self.sftp()
        with self._errors(f"Uploading {local.name} to {remote}"):
            await sftp.put(str(local), remote)

    async def write_file(self, remote: str, data: bytes, *, mode: int = 0o600) -> None:
        """Write atomically (temp file + rename), created with `mode` so no byte is ever
        readable by others, then chmod'ed in case a umask or old file interfered."""
        sftp = await self.sftp()
        tmp = f"{remote}.rbee-tmp"
        with self._errors(f"Writing {remote}"):
            attrs = asyncssh.SFTPAttrs(permissions=mode)
            async with sftp.open(tmp, "wb", attrs) as fh:
                await fh.write(data)
            await sftp.chmod(tmp, mode)
            try:
                await sftp.posix_rename(tmp, remote)
            except asyncssh.SFTPOpUnsupported:
                if await sftp.exists(remote):
                    await sftp.remove(remote)
                await sftp.rename(tmp, remote)

    async def read_file(self, remote: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        sftp = await self.sftp()
        with self._errors(f"Reading {remote}"):
            try:
                async with sftp.open(remote, "rb") as fh:
                    data = await fh.read()
                    return data if isinstance(data, bytes) else data.encode()
            except asyncssh.SFTPNoSuchFile:
                return None

    # -------------------------------------------------------------- forwards

    async def forward(self, remote_host: str, remote_port: int) -> int:
        """Listen on a free 127.0.0.1 port here; connections go to remote_host:remote_port
        as seen from the node. Returns the local port. Closed with the connection."""
        with self._errors(f"Forwarding to {remote_host}:{remote_port}"):
            listener = await self._conn.forward_local_port("127.0.0.1", 0,
                                                           remote_host, remote_port)
        self._listeners.append(listener)
        return listener.get_port()

    async def forward_back(self, local_port: int) -> int:
        """Listen on a free 127.0.0.1 port of the node; connections come back over this
        connection to 127.0.0.1:local_port here. Returns the node's port (B207)."""
        with self._errors(f"Forwarding the node's loopback back to port {local_port}"):
            listener = await self._conn.forward_remote_port("127.0.0.1", 0,
                                                            "127.0.0.1", local_port)
        self._listeners.append(listener)
        return listener.get_port()


# ------------------------------------------------------------------ node facts

AGENT_VERSION_PY = "from importlib.metadata import version; print(version('rbee'))"


def parse_facts(text: str) -> dict[str, str]:
    facts: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep:
            facts[name.strip()] = value.strip()
    return facts


def version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts)
