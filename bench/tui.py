"""TUI benchmark: issue 6's four targets for the dashboard and the chat pane.

Every measurement runs the real `RbeeApp` (its polling loop, `DashboardScreen`, the keyed
tables, `ChatScreen`, the orchestrator and `AgentClient`) in a subprocess of its own, on a
scripted `NodeSource` built on tests/tui_support.py's (the TUI's only data boundary), so no
agent, SSH or network is involved:

  1. time to first paint (target <= 1.0 s): `python -c` imports rbee_tui.app, builds the
     app for a fleet of `--nodes` nodes and runs it; the dashboard's `on_mount` schedules
     `call_after_refresh`, which runs once the first frame has been composed and handed to
     the driver. Measured from just before the parent spawns the interpreter, so Python's
     start-up and every import are in it. Median of `--paint-runs`.
  2. dashboard CPU (target <= 10 % of one core): `--nodes` nodes x `--workers` workers, every
     number (node CPU %, RAM, VRAM; worker tokens, RSS, VRAM, state) changing on every poll,
     the app's own polling loop at `poll_interval_s=--interval`. After `--cpu-warmup` s the
     parent reads the child's CPU time (psutil user+system) over `--cpu-seconds` of wall
     time. Twice: "lockstep", the scripted source answering at once, so all nodes poll in
     the same instant and one frame shows the whole round; and "spread", each node's first
     poll at a random phase of the interval and every answer after 5-50 ms, the steady
     state of real agents, whose polls drift apart (one frame per poll).
  3. chat at 1,000 tokens/s (final text exact, render lag <= 100 ms): the real chat pane
     sends a message; the scripted agent answers with `--tokens` SSE token frames, one per
     `--token-interval-ms`, emitted on a schedule by a thread of their own (as a socket
     would: a slow TUI does not slow the source down). Lag: from the last token frame's
     emission to the reply's Markdown holding the whole text and the chat's `finally`
     (stream stopped, any final `update` done), each after a refresh; timed inside the
     app's loop by a task polling every 1 ms. Median of `--chat-runs`.
  4. memory (target: RSS growth <= 10 %): the dashboard is fed the snapshots `--hours` of
     polling produce (3600 / interval per node, each a new object), letting the app render
     (a frame's sleep, queue drained) every `--render-every` snapshots; RSS after gc at the
     end against after the first 5 %. Also reported: Python objects, and Textual's
     DataTable render caches (bounded: 10,000 cells, 1,000 rows, 1,000 lines per table).

By default the children run on Textual's real Linux driver inside a pseudo-terminal of
`--cols` x `--rows` (the parent drains it), so writing frames to a terminal is included;
`--headless` uses Textual's headless driver instead.

Output: a table, then as the last line one JSON object with the figures.

    .venv/bin/python bench/tui.py [--nodes 32] [--workers 4] [--cpu-seconds 30] [--headless]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import select
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TARGETS = {"paint_s": 1.0, "cpu_percent": 10.0, "chat_lag_ms": 100.0, "rss_growth_percent": 10.0}

# The child: the parent's clock starts just before this is spawned.
CHILD = "import sys; from bench.tui import child_main; child_main(sys.argv[1:])"


# ====================================================================== child side
# Everything down to "parent side" runs in the subprocess. rbee and Textual are imported
# inside the functions, so that the time to first paint includes their imports.


def _report(path: str, **fields: Any) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({"t": time.time(), **fields}) + "\n")


def fleet_app(nodes: int, workers: int, interval: float, poll: bool, spread: bool = False,
              latency_s: tuple[float, float] = (0.0, 0.0)) -> Any:
    """An app for `nodes` nodes (localhost and nodes-1 remote ones) on a `FleetSource`."""
    import asyncio
    import random

    from rbee_agent import __version__
    from rbee_agent.protocol import GpuInfo, NodeInfo, WorkerInfo
    from rbee_tui.app import RbeeApp
    from rbee_tui.config import Config, Node, OperatorSettings
    from rbee_tui.node_source import NodeSnapshot
    from tests.tui_support import ScriptedSource

    rnd = random.Random(6)

    class FleetSource(ScriptedSource):
        """Every node up with `workers` workers; every number moves on every poll."""

        def __init__(self) -> None:
            super().__init__(hold_stream=False)
            self.down = {}
            self.ticks: dict[str, int] = {}
            self.polls = 0

        def snapshot_of(self, name: str) -> NodeSnapshot:
            i = self.ticks[name] = self.ticks.get(name, 0) + 1
            now = time.time()
            seed = sum(map(ord, name))
            gpus = [GpuInfo(index=g, name="NVIDIA RTX 4090", vram_total_mb=24564,
                            vram_used_mb=6000 + (seed * 7 + i * 131 + g * 977) % 16000,
                            vram_free_mb=2000, utilization_percent=(seed + i * 13) % 100,
                            temperature_c=50 + (i + g) % 30, power_w=150.0 + (i * 7) % 200)
                    for g in range(2)]
            info = NodeInfo(
                hostname=name, os="Linux-6.1", arch="x86_64", cpu_count=32,
                cpu_percent=float((seed + i * 17) % 100), load_average=(1.0, 0.8, 0.5),
                ram_total_mb=256 * 1024, ram_available_mb=100 * 1024 + (i * 997) % 50000,
                models_dir="/srv/rbee/models", disk_free_mb=512 * 1024,
                backends=["cpu", "cuda"], gpus=gpus)
            busy = [(i + k) % 3 == 0 for k in range(workers)]
            pool = tuple(WorkerInfo(
                id=f"w{k}-{seed % 9973:04x}", model_id=f"model-{k}",
                model_ref=f"hf:org/model-{k}-GGUF/model-{k}.Q4_K_M.gguf", backend="cuda",
                device=k % 2, url=f"http://127.0.0.1:{8001 + k}",
                state="busy" if busy[k] else "idle", slots_total=4,
                slots_available=2 if busy[k] else 4, pid=4000 + k, started_at=now - 3600,
                last_activity=now - (i % 7), rss_mb=800 + (i * 37 + k * 11) % 400,
                vram_mb=1400 + (i * 53 + k) % 3000, tokens_served=i * (250 + 13 * k),
                layers_loaded=30, layers_total=30, active_requests=2 if busy[k] else 0)
                for k in range(workers))
            return NodeSnapshot(name=name, status="up", agent_version=__version__, info=info,
                                workers=pool, polled_at=now)

        async def poll(self, name: str) -> NodeSnapshot:
            if spread and name not in self.ticks:
                await asyncio.sleep(rnd.uniform(0, interval))  # this node's phase
            if latency_s[1] > 0:
                await asyncio.sleep(rnd.uniform(*latency_s))
            self.polls += 1
            return self.snapshot_of(name)

    config = Config(settings=OperatorSettings(poll_interval_s=interval), nodes={
        f"node{n:02d}": Node(name=f"node{n:02d}", ssh_host=f"10.0.0.{n}", ssh_user="ops",
                             status="agent up", agent_version=__version__)
        for n in range(1, nodes)})
    return RbeeApp(config, FleetSource(), poll=poll, save_theme=False)


def _probe_dashboard(app: Any, report: str) -> None:
    """Report when the dashboard has mounted and when its first frame has been painted."""
    from rbee_tui.screens.dashboard import DashboardScreen

    class Probe(DashboardScreen):
        def on_mount(self) -> None:  # Textual calls DashboardScreen.on_mount as well
            _report(report, event="mounted")
            self.call_after_refresh(lambda: _report(report, event="painted"))

    app.dashboard = Probe(app.fleet)


def _count_frames() -> dict[str, int]:
    """Count the frames Textual composes (screen updates sent to the driver)."""
    from textual.screen import Screen

    counts = {"frames": 0}
    real = Screen._compositor_refresh

    def counted(self: Screen[Any]) -> None:
        counts["frames"] += 1
        real(self)

    Screen._compositor_refresh = counted  # type: ignore[method-assign]
    return counts


def _rss_mb() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss / 2**20)


def child_main(argv: list[str]) -> None:
    mode, params = argv[0], json.loads(argv[1])
    if params.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        try:
            _child(mode, params)
        finally:
            profiler.disable()
            profiler.dump_stats(os.path.join(params["profile"], f"{mode}.prof"))
    else:
        _child(mode, params)


def _child(mode: str, params: dict[str, Any]) -> None:
    report = params["report"]
    _report(report, event="started")
    size = (params["cols"], params["rows"])
    headless = params["headless"]
    if mode == "paint":
        app = fleet_app(params["nodes"], params["workers"], 2.0, poll=True)
        _report(report, event="imported")
        _probe_dashboard(app, report)

        async def quit_after_paint(pilot: Any) -> None:
            await pilot.pause()
            app.exit()

        app.run(headless=headless, size=size, auto_pilot=quit_after_paint)
    elif mode == "dashboard":
        app = fleet_app(params["nodes"], params["workers"], params["interval"], poll=True,
                        spread=params["spread"], latency_s=tuple(params["latency_s"]))
        _probe_dashboard(app, report)
        counts = _count_frames()

        async def run_for(pilot: Any) -> None:
            import asyncio

            await asyncio.sleep(params["seconds"])
            _report(report, event="stats", polls=app.source.polls, frames=counts["frames"])
            app.exit()

        app.run(headless=headless, size=size, auto_pilot=run_for)
    elif mode == "memory":
        _memory(params, report, size, headless)
    elif mode == "chat":
        _chat(params, report, size, headless)
    else:
        raise SystemExit(f"unknown mode {mode}")


def _memory(params: dict[str, Any], report: str, size: tuple[int, int], headless: bool) -> None:
    import asyncio
    import gc

    from rbee_tui.widgets.tables import KeyedTable

    app = fleet_app(params["nodes"], params["workers"], params["interval"], poll=False)
    calls, every = params["calls"], params["render_every"]
    names = app.config.names()
    source = app.source
    counts = _count_frames()

    async def settle() -> None:
        app.fleet.flush()  # publish what changed now rather than at the frame timer
        await asyncio.sleep(1 / 60)  # a frame's time: the app renders what changed
        for _ in range(10_000):  # then until the dashboard has handled every snapshot
            if not app.dashboard.message_queue_size:
                break
            await asyncio.sleep(0.001)

    def sample(n: int) -> dict[str, Any]:
        gc.collect()
        tables = list(app.dashboard.query(KeyedTable))
        return {"n": n, "rss_mb": round(_rss_mb(), 2),
                "objects": len(gc.get_objects()) + gc.get_freeze_count(),
                "frames": counts["frames"],
                # Textual's DataTable render caches: LRU, bounded, filled by repaints.
                "cached_cells": sum(len(t._cell_render_cache) for t in tables)}

    async def feed(pilot: Any) -> None:
        await pilot.pause()
        warm = calls // 20
        marks = {warm, calls, *range(calls // 10, calls + 1, calls // 10)}
        samples = []
        started = time.perf_counter()
        for n in range(1, calls + 1):
            app.fleet.apply(source.snapshot_of(names[n % len(names)]))
            if n % every == 0 or n in marks:
                await settle()
            if n in marks:
                samples.append(sample(n))
        _report(report, event="memory", samples=samples, warm=warm,
                seconds=time.perf_counter() - started,
                history=len(app.fleet.stats_of(names[0]).ram_used_mb),
                rows=app.dashboard.query_one("#nodes").row_count)
        app.exit()

    app.run(headless=headless, size=size, auto_pilot=feed)


def _chat(params: dict[str, Any], report: str, size: tuple[int, int], headless: bool) -> None:
    import asyncio
    import gc

    import httpx
    from textual.widgets import Markdown

    from rbee_tui.events import Token
    from rbee_tui.orchestrator import run_inference
    from rbee_tui.screens import chat as chat_module
    from tests.tui_support import ScriptedSource, make_app

    tokens: list[str] = params["token_list"]
    interval = params["interval_ms"] / 1000
    emitted: list[float] = []  # when each token frame left the source
    consumed: list[float] = []  # when the chat pane got each Token event

    class Feed(httpx.AsyncByteStream):
        """SSE token frames on a fixed schedule, from a thread of their own."""

        async def __aiter__(self) -> Any:
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[bytes | None] = asyncio.Queue()

            def produce() -> None:
                start = time.perf_counter()
                for i, token in enumerate(tokens):
                    delay = start + i * interval - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    frame = f"data: {json.dumps({'token': token, 'index': i})}\n\n".encode()
                    emitted.append(time.perf_counter())
                    loop.call_soon_threadsafe(queue.put_nowait, frame)
                done = {"done": True, "total_tokens": len(tokens), "finish_reason": "length",
                        "duration_ms": (emitted[-1] - start) * 1000, "request_id": "r"}
                tail = f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n".encode()
                loop.call_soon_threadsafe(queue.put_nowait, tail)
                loop.call_soon_threadsafe(queue.put_nowait, None)

            threading.Thread(target=produce, daemon=True).start()
            while (chunk := await queue.get()) is not None:
                yield chunk

    class FastSource(ScriptedSource):
        async def _handle(self, request: httpx.Request) -> httpx.Response:
            if request.url.path.endswith("/inference") and request.method == "POST":
                return httpx.Response(200, headers={"content-type": "text/event-stream"},
                                      stream=Feed())
            return await super()._handle(request)

    # Timestamp each Token as the chat pane receives it (a pass-through around the flow).
    async def timed_run(*a: Any, **k: Any) -> Any:
        async for event in run_inference(*a, **k):
            if isinstance(event, Token):
                consumed.append(time.perf_counter())
            yield event

    chat_module.run_inference = timed_run  # type: ignore[attr-defined]

    pauses: list[float] = []
    gc_started = [0.0]

    def gc_watch(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_started[0] = time.perf_counter()
        elif info["generation"] == 2:
            pauses.append(time.perf_counter() - gc_started[0])

    gc.callbacks.append(gc_watch)

    app, _ = make_app()
    app.source = app.fleet.source = FastSource(hold_stream=False)
    expected = "".join(tokens)

    async def watch(chat: Any) -> dict[str, float]:
        """From inside the app's loop: poll every 1 ms, timestamp after the next refresh."""
        marks: dict[str, float] = {}
        stall = 0.0
        tick = time.perf_counter()
        deadline = tick + 120
        reply: Markdown | None = None
        while time.perf_counter() < deadline:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            stall, tick = max(stall, now - tick), now
            if reply is None:
                found = [m for m in chat.query(Markdown) if "assistant" in m.classes]
                reply = found[0] if found else None
                continue
            if "full" not in marks and reply.source == expected:
                marks["full"] = now
                chat.call_after_refresh(lambda: marks.setdefault("full_painted",
                                                                 time.perf_counter()))
            if "final" not in marks and chat.generating is None and "full" in marks:
                marks["final"] = now
                chat.call_after_refresh(lambda: marks.setdefault("final_painted",
                                                                 time.perf_counter()))
            if "full_painted" in marks and "final_painted" in marks:
                break
        marks["max_loop_stall"] = stall
        return marks

    async def converse(pilot: Any) -> None:
        from rbee_tui.screens.chat import ChatScreen

        await pilot.pause()
        app.open_chat("gpu1")
        await pilot.pause(0.3)
        chat = app.screen
        assert isinstance(chat, ChatScreen)
        await pilot.press(*"Tell me a long story")
        # The watcher keeps the process busy, and Pilot.press waits for an idle process (up
        # to 1 s a wait): start it just before the key that sends.
        watcher = asyncio.create_task(watch(chat))
        await pilot.press("enter")
        marks = await watcher
        await pilot.pause()
        reply = [m for m in chat.query(Markdown) if "assistant" in m.classes][-1]
        history = chat.history[-1].content if chat.history else ""
        _report(report, event="chat", emitted=[emitted[0], emitted[-1]],
                consumed_last=consumed[-1], tokens_consumed=len(consumed), marks=marks,
                exact=reply.source == expected, history_exact=history == expected,
                chars=len(reply.source), status=str(chat.query_one("#chat-status").render()),
                gc2_pauses_ms=[round(p * 1000, 1) for p in pauses])
        app.exit()

    app.run(headless=headless, size=size, auto_pilot=converse)


# ====================================================================== parent side


class Child:
    """One benchmark subprocess, on a pseudo-terminal (drained) or headless."""

    def __init__(self, mode: str, params: dict[str, Any], args: argparse.Namespace) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="rbee-bench-tui-")
        self.report = os.path.join(self.tmp.name, "report.jsonl")
        params = {**params, "report": self.report, "cols": args.cols, "rows": args.rows,
                  "headless": args.headless, "profile": args.profile}
        env = {**os.environ, "RBEE_CONFIG": os.path.join(self.tmp.name, "config.toml"),
               "TERM": "xterm-256color", "COLORTERM": "truecolor", "PYTHONPATH": str(REPO)}
        env.pop("TEXTUAL", None)
        cmd = [sys.executable, "-c", CHILD, mode, json.dumps(params)]
        self.output_bytes = 0
        self.tail = b""
        self.master: int | None = None
        self.t0 = time.time()
        if args.headless:
            with open(self.report + ".err", "w") as err:
                self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL, stderr=err)
        else:
            master, slave = pty.openpty()
            fcntl.ioctl(slave, termios.TIOCSWINSZ,
                        struct.pack("HHHH", args.rows, args.cols, 0, 0))
            self.master = master
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=slave, stdout=slave,
                                         stderr=slave, start_new_session=True)
            os.close(slave)
            threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        """Read the terminal's output as a terminal emulator would (only count it)."""
        assert self.master is not None
        while True:
            try:
                data = os.read(self.master, 1 << 16)
            except OSError:
                return
            if not data:
                return
            self.output_bytes += len(data)
            self.tail = (self.tail + data)[-4000:]

    def events(self) -> list[dict[str, Any]]:
        try:
            with open(self.report) as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def event(self, name: str) -> dict[str, Any] | None:
        return next((e for e in self.events() if e.get("event") == name), None)

    def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = self.event(name)
            if found is not None:
                return found
            if self.proc.poll() is not None:
                found = self.event(name)
                if found is not None:
                    return found
                raise RuntimeError(f"the {name!r} child exited with {self.proc.returncode}"
                                   f"{self._diagnostics()}")
            time.sleep(0.005)
        raise RuntimeError(f"no {name!r} from the child within {timeout:g} s"
                           f"{self._diagnostics()}")

    def _diagnostics(self) -> str:
        err = Path(self.report + ".err")
        text = err.read_text() if err.exists() else self.tail.decode(errors="replace")
        return f":\n{text[-3000:]}" if text else ""

    def finish(self, timeout: float = 30) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.master is not None:
            os.close(self.master)
        self.tmp.cleanup()


def bench_paint(args: argparse.Namespace) -> dict[str, Any]:
    runs: list[dict[str, float]] = []
    for _ in range(args.paint_runs):
        child = Child("paint", {"nodes": args.nodes, "workers": args.workers}, args)
        try:
            child.wait_event("painted", 30)
            at = {e["event"]: e["t"] - child.t0 for e in child.events()}
            runs.append({"paint_s": at["painted"], "python_up_s": at["started"],
                         "app_built_s": at["imported"], "mounted_s": at["mounted"]})
        finally:
            child.finish()
    return {"runs_s": [round(r["paint_s"], 3) for r in runs],
            **{f"median_{k}": round(statistics.median(r[k] for r in runs), 3)
               for k in runs[0]}}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


START_LOCAL_AGENT = ("from rbee_tui import local_agent; from rbee_tui.config import load_config; "
                     "local_agent.find_or_start(load_config().settings)")


def launch_once(args: argparse.Namespace, env: dict[str, str]) -> float:
    """`python -m rbee_tui` (what the `rbee` script runs) in a pseudo-terminal of its own,
    from just before the spawn until the terminal has received the dashboard's first frame
    (its nodes table's NODE column and the footer's "Help")."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", args.rows, args.cols, 0, 0))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "rbee_tui"], cwd=REPO, env=env,
                            stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    seen = b""
    first_frame = None
    try:
        deadline = t0 + 30
        while first_frame is None and time.perf_counter() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                seen += os.read(master, 1 << 16)
                if b"NODE" in seen and b"Help" in seen:
                    first_frame = time.perf_counter() - t0
        proc.terminate()  # (a "q" this early can be taken for part of a terminal reply)
        proc.wait(15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    if first_frame is None:
        raise RuntimeError("the dashboard never drew its first frame: "
                           + seen[-2000:].decode(errors="replace"))
    return first_frame


def _stop_local_agent(pid_file: Path) -> None:
    import signal

    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(400):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def bench_launch(args: argparse.Namespace) -> dict[str, Any]:
    """Launch to first frame, as a returning user has it: an empty config (localhost only)
    whose local agent is running (rbee leaves it running, B09), on a port of its own."""
    with tempfile.TemporaryDirectory(prefix="rbee-bench-launch-") as home:
        config = os.path.join(home, "config.toml")
        with open(config, "w") as f:
            f.write(f"[settings]\nlocal_agent_port = {_free_port()}\n")
        env = {**os.environ, "RBEE_CONFIG": config, "TERM": "xterm-256color",
               "COLORTERM": "truecolor"}
        env.pop("TEXTUAL", None)
        subprocess.run([sys.executable, "-c", START_LOCAL_AGENT], cwd=REPO, env=env,
                       check=True, timeout=120)
        try:
            runs = [launch_once(args, env) for _ in range(args.paint_runs)]
        finally:
            _stop_local_agent(Path(home) / "state" / "local-agent.pid")
    return {"runs_s": [round(r, 3) for r in runs], "median_s": round(statistics.median(runs), 3)}


def bench_cpu(args: argparse.Namespace, spread: bool) -> dict[str, Any]:
    import psutil

    seconds = args.cpu_warmup + args.cpu_seconds + 2
    latency = [0.005, 0.05] if spread else [0.0, 0.0]
    child = Child("dashboard", {"nodes": args.nodes, "workers": args.workers,
                                "interval": args.interval, "seconds": seconds,
                                "spread": spread, "latency_s": latency}, args)
    try:
        child.wait_event("painted", 30)
        proc = psutil.Process(child.proc.pid)
        time.sleep(args.cpu_warmup)
        load = os.getloadavg()[0]
        c0, w0 = proc.cpu_times(), time.perf_counter()
        time.sleep(args.cpu_seconds)
        c1, w1 = proc.cpu_times(), time.perf_counter()
        rss = proc.memory_info().rss / 2**20
        stats = child.wait_event("stats", seconds + 30)
    finally:
        child.finish()
    wall = w1 - w0
    user, system = c1.user - c0.user, c1.system - c0.system
    return {"cpu_percent": round(100 * (user + system) / wall, 2),
            "user_s": round(user, 2), "system_s": round(system, 2), "wall_s": round(wall, 2),
            "polls_per_s": round(stats["polls"] / seconds, 2),
            "frames_per_s": round(stats["frames"] / seconds, 2), "rss_mb": round(rss, 1),
            "terminal_kb_per_s": round(child.output_bytes / seconds / 1024, 1)
            if child.master is not None else None,
            "load_1min": [round(load, 2), round(os.getloadavg()[0], 2)]}


def chat_tokens(count: int) -> list[str]:
    """A model-like reply: words, some bold, lists, code blocks, paragraphs."""
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while",
             "rbee", "streams", "every", "token", "to", "the", "chat", "pane", "and", "the",
             "markdown", "widget", "renders", "it", "as", "it", "arrives"]
    out: list[str] = []
    i = 0
    while len(out) < count:
        n = len(out)
        if n % 240 == 120:
            out += ["\n\n", "```python", "\n", "def f(x):", "\n", "    return x", "\n", "```",
                    "\n\n"]
        elif n % 80 == 79:
            out.append("\n\n")
        elif n % 200 == 50:
            out += ["\n\n", "- item", " one", "\n", "- item", " two", "\n\n"]
        elif n % 17 == 5:
            out.append(f" **{words[i % len(words)]}**")
        else:
            out.append((" " if n % 80 else "") + words[i % len(words)])
        i += 1
    return out[:count]


def bench_chat(args: argparse.Namespace) -> dict[str, Any]:
    tokens = chat_tokens(args.tokens)
    runs: list[dict[str, Any]] = []
    for _ in range(args.chat_runs):
        child = Child("chat", {"token_list": tokens, "interval_ms": args.token_interval_ms},
                      args)
        try:
            got = child.wait_event("chat", 120)
        finally:
            child.finish()
        first, last = got["emitted"]
        marks = got["marks"]

        def ms(t: float, last: float = last) -> float:
            return round((t - last) * 1000, 1)

        runs.append({
            "exact": got["exact"] and got["history_exact"],
            "source_tok_s": round((len(tokens) - 1) / (last - first), 1),
            "last_token_ms": ms(got["consumed_last"]),
            "streamed_ms": ms(marks["full_painted"]),
            "lag_ms": ms(max(marks["full_painted"], marks["final_painted"])),
            "max_loop_stall_ms": round(marks["max_loop_stall"] * 1000, 1),
            "gc_full_pauses_ms": got["gc2_pauses_ms"],
            "status": got["status"], "chars": got["chars"],
        })
    lags = [r["lag_ms"] for r in runs]
    return {"tokens": len(tokens), "chars": runs[0]["chars"],
            "exact": all(r["exact"] for r in runs),
            "median_lag_ms": round(statistics.median(lags), 1), "worst_lag_ms": max(lags),
            "runs": runs}


def bench_memory(args: argparse.Namespace) -> dict[str, Any]:
    calls = round(args.hours * 3600 / args.interval) * args.nodes
    child = Child("memory", {"nodes": args.nodes, "workers": args.workers,
                             "interval": args.interval, "calls": calls,
                             "render_every": args.render_every}, args)
    try:
        got = child.wait_event("memory", 900)
    finally:
        child.finish()
    samples = {s["n"]: s for s in got["samples"]}
    warm, end = samples[got["warm"]], samples[calls]
    return {"snapshots": calls, "seconds": round(got["seconds"], 1),
            "frames": end["frames"],
            "rss_warm_mb": warm["rss_mb"], "rss_end_mb": end["rss_mb"],
            "growth_percent": round(100 * (end["rss_mb"] - warm["rss_mb"]) / warm["rss_mb"], 2),
            "objects": [warm["objects"], end["objects"]],
            "cached_cells": [warm["cached_cells"], end["cached_cells"]],
            "curve_mb": [s["rss_mb"] for s in got["samples"]],
            "history_points": got["history"], "rows": got["rows"]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=32, help="nodes, localhost included")
    p.add_argument("--workers", type=int, default=4, help="workers per node")
    p.add_argument("--interval", type=float, default=2.0, help="poll interval, s")
    p.add_argument("--paint-runs", type=int, default=5)
    p.add_argument("--cpu-warmup", type=float, default=5.0, help="s before CPU is read")
    p.add_argument("--cpu-seconds", type=float, default=30.0, help="s of CPU reading, each")
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--token-interval-ms", type=float, default=1.0)
    p.add_argument("--chat-runs", type=int, default=3)
    p.add_argument("--hours", type=float, default=1.0,
                   help="polling time whose snapshots the memory run feeds")
    p.add_argument("--render-every", type=int, default=32,
                   help="memory run: snapshots between renders")
    p.add_argument("--cols", type=int, default=160)
    p.add_argument("--rows", type=int, default=50)
    p.add_argument("--headless", action="store_true",
                   help="Textual's headless driver instead of a pseudo-terminal")
    p.add_argument("--profile", metavar="DIR",
                   help="write each child's cProfile stats to DIR/<mode>.prof")
    p.add_argument("--only", choices=["launch", "paint", "cpu", "chat", "memory"],
                   action="append",
                   help="run only these parts (repeatable)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parts = args.only or ["launch", "paint", "cpu", "chat", "memory"]
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "load_start": [round(x, 2) for x in os.getloadavg()]},
        "config": {"nodes": args.nodes, "workers": args.workers, "interval_s": args.interval,
                   "driver": "headless" if args.headless else "pty",
                   "size": [args.cols, args.rows]},
    }
    started = time.perf_counter()
    for part in parts:
        t = time.perf_counter()
        print(f"[{part}] running…", file=sys.stderr, flush=True)
        if part == "cpu":
            result["cpu_lockstep"] = bench_cpu(args, spread=False)
            result["cpu_spread"] = bench_cpu(args, spread=True)
        else:
            result[part] = {"launch": bench_launch, "paint": bench_paint, "chat": bench_chat,
                            "memory": bench_memory}[part](args)
        print(f"[{part}] {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    result["machine"]["load_end"] = [round(x, 2) for x in os.getloadavg()]
    result["seconds"] = round(time.perf_counter() - started, 1)
    print_table(result)
    print(json.dumps(result))
    return 0


def print_table(r: dict[str, Any]) -> None:
    c = r["config"]
    rows: list[tuple[str, str, str, str]] = [("measure", "value", "target", "")]

    def row(name: str, value: str, target: str, ok: bool) -> None:
        rows.append((name, value, target, "ok" if ok else "MISSED"))

    if "launch" in r:
        row("`rbee` launch to first frame in a pty (median)",
            f"{r['launch']['median_s']:.3f} s", "<= 1.0 s",
            r["launch"]["median_s"] <= TARGETS["paint_s"])
    if "paint" in r:
        p = r["paint"]
        row("time to first paint (median)", f"{p['median_paint_s']:.3f} s", "<= 1.0 s",
            p["median_paint_s"] <= TARGETS["paint_s"])
    for key, how in (("cpu_lockstep", "polls in lockstep"), ("cpu_spread", "polls spread")):
        if key in r:
            row(f"dashboard CPU, {c['nodes']}x{c['workers']} @ {c['interval_s']:g} s, {how}",
                f"{r[key]['cpu_percent']:.1f} %", "<= 10 %",
                r[key]["cpu_percent"] <= TARGETS["cpu_percent"])
    if "chat" in r:
        ch = r["chat"]
        row("chat: final text exact", str(ch["exact"]), "True", ch["exact"])
        row(f"chat: lag after {ch['tokens']} tokens @ 1000/s (median)",
            f"{ch['median_lag_ms']:.0f} ms", "<= 100 ms",
            ch["median_lag_ms"] <= TARGETS["chat_lag_ms"])
    if "memory" in r:
        m = r["memory"]
        row(f"RSS growth over {m['snapshots']} snapshots", f"{m['growth_percent']:+.1f} %",
            "<= 10 %", m["growth_percent"] <= TARGETS["rss_growth_percent"])
    widths = [max(len(x[i]) for x in rows) for i in range(4)]
    for x in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(x, widths, strict=True)).rstrip())
    notes: list[str] = []
    if "launch" in r:
        notes.append(f"launch: runs {r['launch']['runs_s']} s")
    if "paint" in r:
        p = r["paint"]
        notes.append(f"paint: runs {p['runs_s']} s; median: python up {p['median_python_up_s']}"
                     f" s, imports + app built {p['median_app_built_s']} s, dashboard mounted"
                     f" {p['median_mounted_s']} s")
    for key in ("cpu_lockstep", "cpu_spread"):
        if key in r:
            x = r[key]
            notes.append(f"{key}: user {x['user_s']} + sys {x['system_s']} s over "
                         f"{x['wall_s']} s; {x['polls_per_s']} polls/s, {x['frames_per_s']} "
                         f"frames/s, RSS {x['rss_mb']} MB, load {x['load_1min']}")
    if "chat" in r:
        ch = r["chat"]
        for i, x in enumerate(ch["runs"]):
            notes.append(f"chat run {i + 1}: source {x['source_tok_s']} tok/s; last token in "
                         f"the pane +{x['last_token_ms']} ms, whole reply painted "
                         f"+{x['streamed_ms']} ms, done +{x['lag_ms']} ms; longest loop stall "
                         f"{x['max_loop_stall_ms']} ms; full GC pauses "
                         f"{x['gc_full_pauses_ms']} ms")
    if "memory" in r:
        m = r["memory"]
        notes.append(f"memory: {m['rss_warm_mb']} -> {m['rss_end_mb']} MB in {m['seconds']} s"
                     f" ({m['frames']} frames); curve {m['curve_mb']}; objects "
                     f"{m['objects']}; cached table cells {m['cached_cells']}")
    notes.append(f"machine: {r['machine']['cpus']} CPUs, load {r['machine']['load_start']} -> "
                 f"{r['machine']['load_end']}; driver {c['driver']}; {r['seconds']} s in all")
    for line in notes:
        print("  " + line)


if __name__ == "__main__":
    sys.exit(main())
