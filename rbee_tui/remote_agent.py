"""The agent on a remote node, driven over SSH: status, start, stop, restart, logs (B07).

Where things live on the node, under the node's install path (`AgentLayout`):
    venv/  wheels/  agent.toml (0600)  data/  logs/agent.log  logs/agent.out  agent.pid

How the agent runs there: a systemd --user unit `rbee-agent-<port>.service` when
`systemctl --user` works on the node and the user lingers (so the service outlives the SSH
session and survives reboots); otherwise a detached process (`nohup setsid`) whose pid is
kept in agent.pid and whose stdout/stderr go to logs/agent.out. Stop sends SIGTERM and waits
while the agent drains its workers (B31), then SIGKILL after the timeout.

This module never starts a second agent beside a running one and never signals a process
that agent.pid does not show to be rbee's agent.
"""

from __future__ import annotations

import asyncio
import math
import posixpath
import shlex
import tomllib
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import httpx
from pydantic import ValidationError

from rbee_agent import __version__
from rbee_agent.protocol import ErrorCode, HealthReply, NodeInfo, RbeeError
from rbee_tui.client import version_mismatch
from rbee_tui.config import Node, OperatorSettings
from rbee_tui.events import Event, Finished, PhaseDone, PhaseStarted
from rbee_tui.ssh_conn import (
    AGENT_VERSION_PY,
    VENV_DIR,
    Dialer,
    SshConnection,
    parse_facts,
)

Manager = Literal["systemd", "process"]
STOP_TIMEOUT_S = 40.0  # the agent drains workers for up to 30 s (B30) before it exits
HEALTH_POLL_S = 0.1
LIVENESS_EVERY_S = 1.0
LOG_LINES = 60
LOG_MARK = "@@rbee-log@@"


@dataclass(frozen=True)
class AgentLayout:
    root: str  # absolute path on the node
    port: int

    def _in(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    @property
    def venv(self) -> str:
        return self._in(VENV_DIR)

    @property
    def python(self) -> str:
        return self._in(VENV_DIR, "bin", "python")

    @property
    def wheels(self) -> str:
        return self._in("wheels")

    @property
    def config(self) -> str:
        return self._in("agent.toml")

    @property
    def data(self) -> str:
        return self._in("data")

    @property
    def logs(self) -> str:
        return self._in("logs")

    @property
    def log_file(self) -> str:
        return self._in("logs", "agent.log")

    @property
    def out_file(self) -> str:
        return self._in("logs", "agent.out")

    @property
    def pid_file(self) -> str:
        return self._in("agent.pid")

    @property
    def unit_name(self) -> str:
        return f"rbee-agent-{self.port}.service"

    def serve_args(self) -> list[str]:
        return [self.python, "-m", "rbee_agent", "serve", "--config", self.config]


@dataclass(frozen=True)
class AgentStatus:
    node: str
    install_path: str
    installed: bool
    version: str | None
    running: bool
    pid: int | None
    manager: Manager
    systemd_usable: bool  # systemctl --user works and the user lingers
    units_dir: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LogTail:
    source: str  # a file path on the node, or "journal"
    lines: list[str]


def not_installed(node: Node, root: str) -> RbeeError:
    return RbeeError(
        ErrorCode.AGENT_NOT_INSTALLED,
        f"No rbee agent is installed on node '{node.name}' (looked in {root})",
        hint=f"Install it with: rbee nodes install {node.name}",
        details={"node": node.name, "install_path": root},
    )


# ------------------------------------------------------------------ node-side scripts

_ALIVE = r"""
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  if [ -r "/proc/$1/stat" ]; then
    case "$(cut -d')' -f2 "/proc/$1/stat" | cut -c2)" in Z) return 1;; esac
  fi
  return 0
}
agent_pid() {
  [ -f "$d/agent.pid" ] || return 1
  p=$(cat "$d/agent.pid" 2>/dev/null)
  [ -n "$p" ] && alive "$p" || return 1
  args=$(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null || ps -p "$p" -o args= 2>/dev/null)
  case "$args" in *rbee_agent*) echo "$p";; *) return 1;; esac
}
units="${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user"
ctl=no
if command -v systemctl >/dev/null 2>&1 && systemctl --user show-environment >/dev/null 2>&1
then ctl=yes; fi
"""

_STATUS = r"""
v=""
if [ -x "$d/venv/bin/python" ]; then v=$("$d/venv/bin/python" -c "$AGENT_VERSION" 2>/dev/null); fi
echo "version=$v"
linger=$(loginctl show-user "$(id -un)" --property=Linger --value 2>/dev/null)
echo "systemctl=$ctl"
echo "linger=$linger"
echo "units_dir=$units"
if [ "$ctl" = yes ] && [ -f "$units/$unit" ]; then
  echo "unit=yes"
  if systemctl --user is-active --quiet "$unit"; then
    echo "systemd_pid=$(systemctl --user show --property=MainPID --value "$unit")"
  fi
fi
p=$(agent_pid) && echo "process_pid=$p"
true
"""

_RUNNING = r"""
if [ "$ctl" = yes ] && [ -f "$units/$unit" ] && systemctl --user is-active --quiet "$unit"
then echo "running=yes"; exit 0; fi
if agent_pid >/dev/null; then echo "running=yes"; else echo "running=no"; fi
"""

_START_PROCESS = r"""
set -e
mkdir -p "$d/logs"
cd "$d"
if command -v setsid >/dev/null 2>&1; then S=setsid; else S=; fi
nohup $S __SERVE__ > "$d/logs/agent.out" 2>&1 < /dev/null &
echo "$!" > "$d/agent.pid"
echo "pid=$!"
"""

_STOP = r"""
stopped=""
if [ "$ctl" = yes ] && [ -f "$units/$unit" ] && systemctl --user is-active --quiet "$unit"; then
  pid=$(systemctl --user show --property=MainPID --value "$unit")
  systemctl --user stop "$unit" && stopped="$pid"
fi
if p=$(agent_pid); then
  kill -TERM "$p" 2>/dev/null || true
  i=0
  while alive "$p"; do
    if [ "$i" -ge __STEPS__ ]; then
      kill -KILL "$p" 2>/dev/null || true; echo "killed=yes"; break
    fi
    sleep 0.1
    i=$((i + 1))
  done
  stopped="$p"
fi
rm -f "$d/agent.pid"
echo "stopped=$stopped"
"""


_PORT_HOLDER = r"""
line=$(ss -ltnpH "sport = :$port" 2>/dev/null | head -n 1)
pid=$(printf '%s' "$line" | sed -n 's/.*pid=\([0-9][0-9]*\).*/\1/p')
if [ -n "$pid" ]; then
  echo "pid=$pid"
  echo "user=$(ps -o user= -p "$pid" 2>/dev/null)"
  echo "args=$(ps -o args= -p "$pid" 2>/dev/null | cut -c1-100)"
fi
true
"""


def _unit_quote(arg: str) -> str:
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{escaped}"'


def unit_text(layout: AgentLayout, stop_timeout_s: float = STOP_TIMEOUT_S) -> str:
    """The systemd --user unit that runs the agent."""
    exec_start = " ".join(_unit_quote(a) for a in layout.serve_args())
    return (
        "[Unit]\n"
        f"Description=rbee agent (port {layout.port})\n"
        "After=network-online.target\n\n"
        "[Service]\n"
        "Type=simple\n"
        f"WorkingDirectory={layout.root.replace('%', '%%')}\n"
        f"ExecStart={exec_start}\n"
        "Restart=on-failure\n"
        "RestartSec=2\n"
        "KillSignal=SIGTERM\n"
        f"TimeoutStopSec={math.ceil(stop_timeout_s)}\n\n"
        "[Install]\n"
        "WantedBy=default.target\n"
    )


# ------------------------------------------------------------------ the agent on a node


class RemoteAgent:
    """The agent of one node, over an open SSH connection."""

    def __init__(self, conn: SshConnection, layout: AgentLayout) -> None:
        self.conn = conn
        self.node = conn.node
        self.settings = conn.settings
        self.layout = layout
        self._local_port: int | None = None
        self._stranger = False  # something that is not this agent answered on its port

    @classmethod
    async def open(cls, conn: SshConnection) -> RemoteAgent:
        root = await conn.abs_path(conn.node.install_path)
        return cls(conn, AgentLayout(root, conn.node.agent_port))

    def _script(self, body: str) -> str:
        head = (f"d={shlex.quote(self.layout.root)}\n"
                f"unit={shlex.quote(self.layout.unit_name)}\n"
                f"AGENT_VERSION={shlex.quote(AGENT_VERSION_PY)}\n")
        return head + _ALIVE + body

    async def status(self) -> AgentStatus:
        out = await self.conn.run_script(self._script(_STATUS), what="Reading the agent status")
        facts = parse_facts(out.stdout)
        unit = facts.get("unit") == "yes"
        pids = [facts.get("systemd_pid", ""), facts.get("process_pid", "")]
        pid = next((int(p) for p in pids if p.isdigit() and int(p) > 0), None)
        systemctl = facts.get("systemctl") == "yes"
        return AgentStatus(
            node=self.node.name,
            install_path=self.layout.root,
            installed=bool(facts.get("version")),
            version=facts.get("version") or None,
            running=pid is not None,
            pid=pid,
            manager="systemd" if unit else "process",
            systemd_usable=systemctl and facts.get("linger") == "yes",
            units_dir=facts.get("units_dir") or None,
        )

    async def require_installed(self) -> AgentStatus:
        status = await self.status()
        if not status.installed:
            raise not_installed(self.node, self.layout.root)
        return status

    async def install_service(self, status: AgentStatus) -> Manager:
        """Write and enable the systemd --user unit where systemd can keep the agent."""
        if not status.systemd_usable or status.units_dir is None:
            return "process"
        path = posixpath.join(status.units_dir, self.layout.unit_name)
        await self.conn.run(f"mkdir -p {shlex.quote(status.units_dir)}", what="Making the "
                            "systemd user unit folder")
        await self.conn.write_file(path, unit_text(self.layout).encode(), mode=0o644)
        await self.conn.run(f"systemctl --user daemon-reload && systemctl --user enable "
                            f"{shlex.quote(self.layout.unit_name)}",
                            what="Enabling the systemd user unit")
        return "systemd"

    async def running(self) -> bool:
        """The light check: is the agent process (or its unit) alive?"""
        out = await self.conn.run_script(self._script(_RUNNING), what="Checking the agent")
        return parse_facts(out.stdout).get("running") == "yes"

    async def start(self, status: AgentStatus | None = None) -> AgentStatus:
        """Start the agent unless it runs; returns the status right after (no health wait).
        `status`: a status read just before, to save a round trip."""
        if status is None or not status.installed:
            status = await self.require_installed()
        if status.running:
            return status
        if status.manager == "systemd":
            await self.conn.run(f"systemctl --user start {shlex.quote(self.layout.unit_name)}",
                                what="Starting the agent's systemd unit")
        else:
            serve = " ".join(shlex.quote(a) for a in self.layout.serve_args())
            await self.conn.run_script(self._script(_START_PROCESS.replace("__SERVE__", serve)),
                                       what="Starting the agent")
        return await self.status()

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM the running agent and wait; returns its pid, or None if none ran."""
        steps = max(1, math.ceil(timeout_s / 0.1))
        out = await self.conn.run_script(
            self._script(_STOP.replace("__STEPS__", str(steps))),
            what="Stopping the agent", limit_s=timeout_s + 30,
        )
        stopped = parse_facts(out.stdout).get("stopped", "")
        return int(stopped) if stopped.isdigit() else None

    async def local_url(self) -> str:
        """A local URL for the agent through a forward over this connection."""
        if self._local_port is None:
            self._local_port = await self.conn.forward(self.node.agent_host,
                                                       self.node.agent_port)
        return f"http://127.0.0.1:{self._local_port}"

    async def api_key(self) -> str | None:
        """The key the node's agent reads from its config (over SFTP: never on a command
        line); None when the config holds none."""
        raw = await self.conn.read_file(self.layout.config)
        try:
            key = tomllib.loads(raw.decode()).get("api_key") if raw else None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError):
            return None
        return key if isinstance(key, str) and key else None

    async def wait_healthy(self, timeout_s: float | None = None, pid: int | None = None
                           ) -> HealthReply:
        """Wait until the agent answers as itself (B140): an authenticated `GET /v1/node`
        with the key of its config, reporting the pid that was started (when it reports one
        and `pid` is given). Fail fast when the agent process is gone, with its last log
        lines and, when something else answered on its port, saying so."""
        limit = timeout_s if timeout_s is not None else self.settings.agent_start_timeout_s
        base = await self.local_url()
        key = await self.api_key()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        checked = loop.time()
        self._stranger = False
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with httpx.AsyncClient(base_url=base, headers=headers,
                                     timeout=self.settings.http_timeout_s) as http:
            while True:
                reply = await self._health(http, pid, authenticated=key is not None)
                if reply is not None:
                    return reply
                now = loop.time()
                if now >= deadline:
                    raise await self._start_failed(
                        f"did not answer on {self.node.agent_host}:{self.node.agent_port} "
                        f"within {limit:g} s")
                if now - checked >= LIVENESS_EVERY_S:
                    checked = now
                    if not await self.running():
                        raise await self._start_failed("exited while starting")
                await asyncio.sleep(HEALTH_POLL_S)

    async def _health(self, http: httpx.AsyncClient, pid: int | None, authenticated: bool
                      ) -> HealthReply | None:
        """Our agent's health, or None while it is not (yet) the one answering."""
        try:
            if authenticated:
                node = await http.get("/v1/node")
                if node.status_code in (401, 403):
                    self._stranger = True
                    return None
                if node.status_code != 200:
                    return None
                info = NodeInfo.model_validate_json(node.content)
                if pid is not None and info.agent_pid not in (None, pid):
                    self._stranger = True
                    return None
            reply = await http.get("/v1/health")
        except httpx.HTTPError:
            return None
        except ValidationError:
            raise self._not_an_agent() from None
        if reply.status_code != 200:
            return None
        try:
            return HealthReply.model_validate_json(reply.content)
        except ValidationError:
            raise self._not_an_agent() from None

    def _not_an_agent(self) -> RbeeError:
        return RbeeError(
            ErrorCode.AGENT_UNREACHABLE,
            f"Port {self.node.agent_port} on node '{self.node.name}' answers, but not as "
            "an rbee agent",
            hint="Another program uses that port: pick another agent port for the node "
            f"(rbee nodes edit {self.node.name} --agent-port N, then rbee nodes install "
            f"{self.node.name}).",
            details={"node": self.node.name, "port": self.node.agent_port},
        )

    async def _start_failed(self, what: str) -> RbeeError:
        tails = await self.log_tails(lines=20)
        lines = next((t.lines for t in tails if t.lines), [])
        # the line that says what went wrong, rather than a trailing hint or blank
        last = next((ln for ln in reversed(lines) if "error" in ln.lower()),
                    lines[-1] if lines else "no output")
        source = next((t.source for t in tails if t.lines), self.layout.out_file)
        held = (f"; port {self.node.agent_port} on the node is held by another agent"
                f"{await self._port_holder()}, one that refuses this node's key"
                if self._stranger else "")
        return RbeeError(
            ErrorCode.AGENT_UNREACHABLE,
            f"The agent on node '{self.node.name}' {what}: {last}{held}",
            hint=f"Its output is in {source} on the node (last lines in the details)."
            + (f" Give the node's agent a free port: rbee nodes edit {self.node.name} "
               f"--agent-port N, then rbee nodes install {self.node.name}."
               if self._stranger else ""),
            details={"node": self.node.name, "log": source, "log_tail": lines,
                     "port_held": self._stranger},
        )

    async def _port_holder(self) -> str:
        """Who listens on the agent's port on the node, where `ss` there shows it (B140)."""
        script = f"port={int(self.node.agent_port)}\n{_PORT_HOLDER}"
        try:
            facts = parse_facts((await self.conn.run_script(
                script, check=False, what="Looking up the port's owner")).stdout)
        except RbeeError:
            return ""
        if not facts.get("pid"):
            return ""
        return (f" (pid {facts['pid']}, user {facts.get('user') or '?'}: "
                f"{facts.get('args') or '?'})")

    async def log_tails(self, lines: int = LOG_LINES) -> list[LogTail]:
        """The last lines of the agent's output (agent.out, or the journal under systemd)
        and of its own log file, newest source first."""
        files = " ".join(shlex.quote(f) for f in (self.layout.out_file, self.layout.log_file))
        body = (
            f'if [ "$ctl" = yes ] && [ -f "$units/$unit" ]; then echo "{LOG_MARK} journal"; '
            f'journalctl --user -u "$unit" -n {lines} --no-pager -o cat 2>&1; fi\n'
            f"for f in {files}; do\n"
            f'  if [ -f "$f" ]; then echo "{LOG_MARK} $f"; tail -n {lines} "$f"; fi\n'
            "done\ntrue\n"
        )
        out = await self.conn.run_script(self._script(body), what="Reading the agent's logs")
        tails: list[LogTail] = []
        for line in out.stdout.splitlines():
            if line.startswith(LOG_MARK + " "):
                tails.append(LogTail(line[len(LOG_MARK) + 1:], []))
            elif tails:
                tails[-1].lines.append(line)
        return tails


# ------------------------------------------------------------------ flows (B07)


async def start_agent(node: Node, settings: OperatorSettings) -> AsyncIterator[Event]:
    """Start the node's agent (no-op when it runs) and wait for its health.

    Events: PhaseStarted/Attempt/PhaseDone("ssh"), PhaseStarted/PhaseDone("start"),
    PhaseStarted/PhaseDone("health"), Finished(data=AgentStatus fields + agent_version,
    the version the agent's health reports).
    Raises AGENT_NOT_INSTALLED, AGENT_UNREACHABLE (with the log tail), VERSION_MISMATCH.
    """
    dialer = Dialer(node, settings)
    async for event in dialer.phase_events():
        yield event
    async with dialer.opened as conn:
        agent = await RemoteAgent.open(conn)
        async for event in _start_and_wait(agent):
            yield event


async def _start_and_wait(agent: RemoteAgent) -> AsyncIterator[Event]:
    node = agent.node
    yield PhaseStarted("start", f"Starting the agent on node '{node.name}'")
    before = await agent.require_installed()
    status = await agent.start(before)
    how = "systemd --user" if status.manager == "systemd" else "detached process"
    yield PhaseDone("start", f"Already running (pid {before.pid})" if before.running
                    else f"Started as a {how} (pid {status.pid})")
    yield PhaseStarted("health", f"Waiting for the agent on {node.agent_host}:{node.agent_port}")
    health = await agent.wait_healthy(pid=status.pid)
    if health.version != __version__:
        raise version_mismatch(node.name, health.version)
    yield PhaseDone("health", f"rbee {health.version} answers")
    yield Finished(f"The agent of node '{node.name}' runs rbee {health.version} "
                   f"(pid {status.pid}, {how})",
                   data={**status.to_dict(), "agent_version": health.version})


async def stop_agent(node: Node, settings: OperatorSettings, *,
                     timeout_s: float = STOP_TIMEOUT_S) -> AsyncIterator[Event]:
    """Stop the node's agent (SIGTERM, wait, SIGKILL after timeout_s).

    Events: the "ssh" phase, PhaseStarted/PhaseDone("stop"), Finished(data={"stopped",
    "pid"}). Raises AGENT_NOT_INSTALLED when there is no agent at the install path.
    """
    dialer = Dialer(node, settings)
    async for event in dialer.phase_events():
        yield event
    async with dialer.opened as conn:
        agent = await RemoteAgent.open(conn)
        await agent.require_installed()
        yield PhaseStarted("stop", f"Stopping the agent on node '{node.name}'")
        pid = await agent.stop(timeout_s)
        yield PhaseDone("stop", f"Stopped (pid {pid})" if pid else "It was not running")
    message = (f"The agent of node '{node.name}' stopped" if pid
               else f"The agent of node '{node.name}' was not running")
    yield Finished(message, data={"stopped": pid is not None, "pid": pid})


async def restart_agent(node: Node, settings: OperatorSettings, *,
                        timeout_s: float = STOP_TIMEOUT_S) -> AsyncIterator[Event]:
    """Stop, then start and wait for health: the events of stop_agent and start_agent's
    "start"/"health" phases over one connection, ending with start_agent's Finished."""
    dialer = Dialer(node, settings)
    async for event in dialer.phase_events():
        yield event
    async with dialer.opened as conn:
        agent = await RemoteAgent.open(conn)
        await agent.require_installed()
        yield PhaseStarted("stop", f"Stopping the agent on node '{node.name}'")
        pid = await agent.stop(timeout_s)
        yield PhaseDone("stop", f"Stopped (pid {pid})" if pid else "It was not running")
        async for event in _start_and_wait(agent):
            yield event


async def agent_status(node: Node, settings: OperatorSettings) -> AgentStatus:
    """Installed? Which version? Running (pid, systemd or process)? One SSH round trip."""
    async with await Dialer(node, settings).open() as conn:
        return await (await RemoteAgent.open(conn)).status()


async def fetch_agent_logs(node: Node, settings: OperatorSettings, *,
                           lines: int = LOG_LINES) -> list[LogTail]:
    """The agent's log tails over SSH, for a node whose agent does not answer HTTP."""
    async with await Dialer(node, settings).open() as conn:
        agent = await RemoteAgent.open(conn)
        tails = await agent.log_tails(lines)
        if not tails:
            await agent.require_installed()
        return tails
