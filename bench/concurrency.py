"""Concurrency benchmark (issue 13): rbee through its agent vs llama.cpp's own llama-server.

    bench/build_llama_server.sh                       # once per machine (minutes)
    .venv/bin/python bench/concurrency.py [--clients 1,4,16,64] [--slots 4] [--threads 2]

Both sides serve the same GGUF with the same llama.cpp (llama-server is built from the sources
that the pinned llama-cpp-python vendors, by bench/build_llama_server.sh), the same threads,
the same number of parallel slots (`-np`) and the same context per slot:

- **rbee**: a real `rbee-agent serve` (started as a subprocess, as bench/agent.py does), one
  worker spawned through it with `slots`; requests go to the agent's
  `POST /v1/workers/{id}/inference` (the path every rbee client takes), SSE.
- **llama-server**: `llama-server -np SLOTS -c SLOTS×CTX -t THREADS -tb THREADS`,
  `POST /completion` with `stream: true`, SSE.

For each client count, every client sends `--rounds` requests one after the other (closed
loop); all clients start together. Every request is greedy, fixed-length (`--max-tokens`,
end-of-text ignored on both sides: `ignore_eos`) and has a prompt of its own (the client
number is in it). Measured at the client:

- aggregate tok/s: all generated tokens / (last reply's end − first request's start);
- TTFT p50/p99: request sent → first token frame;
- inter-token p50/p99: gaps between consecutive token frames of one request;
- errors (transport errors, non-200 other than 503, error frames, short replies), 503s.

- server CPU ms per token: the CPU time the serving processes used (rbee: agent + worker;
  llama-server: its process), from psutil, over the tokens generated. On a machine shared
  with other work this is steadier than tok/s.

Each level runs `--repeat` times, alternating which side goes first, after one warm-up
request each; tok/s is the median of the repeats, latencies are pooled over them. The last
line is one JSON object; `ratio_16` is rbee's aggregate tok/s over llama-server's at 16
clients (target on a 2-core CPU: ≥ 0.9, and 64 clients with no error and no 503).
Then, unless `--skip-memory`: a worker's RSS with 1 and with 8 slots (one copy of the
weights whatever the slot count).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rbee_agent.settings import AgentSettings  # noqa: E402
from tests.agent_support import AgentProc, start_agent  # noqa: E402
from tests.support import bundled_model_path, free_port, start_worker_process  # noqa: E402

PROMPT = "Write a long story about a dragon who learns to paint. Client {client}, part {n}.\n\n"


@dataclass
class Result:
    """One request as the client saw it."""

    ttft_s: float = 0.0
    gaps_s: list[float] = field(default_factory=list)
    tokens: int = 0
    status: int = 0
    error: str = ""


@dataclass
class Level:
    """All runs of one side at one client count."""

    name: str
    clients: int
    walls_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    cpu_s: float = 0.0
    results: list[Result] = field(default_factory=list)

    def add(self, wall_s: float, cpu_s: float, results: list[Result]) -> None:
        self.walls_s.append(wall_s)
        self.tokens.append(sum(r.tokens for r in results if not r.error and r.status == 200))
        self.cpu_s += cpu_s
        self.results += results

    @property
    def ok(self) -> list[Result]:
        return [r for r in self.results if not r.error and r.status == 200]

    @property
    def tok_s(self) -> float:
        return statistics.median(t / w for t, w in zip(self.tokens, self.walls_s, strict=True))

    @property
    def cpu_ms_per_token(self) -> float:
        return 1000 * self.cpu_s / max(1, sum(self.tokens))

    @property
    def rejected(self) -> int:
        return sum(1 for r in self.results if r.status == 503)

    @property
    def errors(self) -> int:
        return sum(1 for r in self.results if r.error and r.status != 503)

    def summary(self) -> dict[str, Any]:
        ttft = sorted(r.ttft_s * 1000 for r in self.ok)
        gaps = sorted(g * 1000 for r in self.ok for g in r.gaps_s)
        return {"tok_s": round(self.tok_s, 1), "ttft_p50_ms": pct(ttft, 50),
                "ttft_p99_ms": pct(ttft, 99), "itl_p50_ms": pct(gaps, 50),
                "itl_p99_ms": pct(gaps, 99), "requests": len(self.results),
                "errors": self.errors, "rejected_503": self.rejected,
                "cpu_ms_per_token": round(self.cpu_ms_per_token, 2),
                "runs_tok_s": [round(t / w, 1) for t, w in
                               zip(self.tokens, self.walls_s, strict=True)]}


def pct(values: list[float], p: int) -> float | None:
    if not values:
        return None
    index = min(len(values) - 1, max(0, round(p / 100 * len(values)) - 1))
    return round(values[index], 1)


# ---------------------------------------------------------------------- the two servers


@dataclass
class Server:
    name: str
    url: str
    headers: dict[str, str]
    body: Callable[[str, int], dict[str, Any]]
    parse: Callable[[dict[str, Any], Result], bool]  # True when the stream is done
    pids: list[int] = field(default_factory=list)  # the processes that serve

    def cpu_s(self) -> float:
        total = 0.0
        for pid in self.pids:
            with contextlib.suppress(psutil.Error):
                times = psutil.Process(pid).cpu_times()
                total += times.user + times.system
        return total


def rbee_body(prompt: str, max_tokens: int) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}


def rbee_parse(event: dict[str, Any], result: Result) -> bool:
    if "error" in event:
        result.error = event["error"].get("code", "stream error")
        return True
    if event.get("done"):
        result.tokens = int(event["total_tokens"])
        return True
    return False


def llama_server_body(prompt: str, max_tokens: int) -> dict[str, Any]:
    return {"prompt": prompt, "n_predict": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "cache_prompt": True}


def llama_server_parse(event: dict[str, Any], result: Result) -> bool:
    if "error" in event:
        result.error = str(event["error"])
        return True
    if event.get("stop"):
        result.tokens = int(event.get("tokens_predicted", 0))
        return True
    return False


def is_token(server: Server, event: dict[str, Any]) -> bool:
    return "token" in event if server.name == "rbee" else bool(event.get("content"))


async def one_request(client: httpx.AsyncClient, server: Server, prompt: str,
                      max_tokens: int) -> Result:
    result = Result()
    start = time.perf_counter()
    last = 0.0
    try:
        async with client.stream("POST", server.url, json=server.body(prompt, max_tokens),
                                 headers=server.headers) as r:
            result.status = r.status_code
            if r.status_code != 200:
                await r.aread()
                result.error = f"HTTP {r.status_code}: {r.text[:200]}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                now = time.perf_counter()
                if is_token(server, event):
                    if last == 0.0:
                        result.ttft_s = now - start
                    else:
                        result.gaps_s.append(now - last)
                    last = now
                if server.parse(event, result):
                    break
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    if not result.error and result.tokens != max_tokens:
        result.error = f"{result.tokens} of {max_tokens} tokens"
    return result


async def run_level(server: Server, level: Level, rounds: int, max_tokens: int,
                    run: int) -> None:
    clients = level.clients
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0),
                                 limits=limits) as client:
        async def client_loop(i: int) -> list[Result]:
            return [await one_request(client, server,
                                      PROMPT.format(client=i, n=f"{run}.{n}"), max_tokens)
                    for n in range(rounds)]

        cpu = server.cpu_s()
        start = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop(i) for i in range(clients)))
        wall = time.perf_counter() - start
        cpu = server.cpu_s() - cpu
    level.add(wall, cpu, [r for rs in per_client for r in rs])


# ---------------------------------------------------------------------- start-up


def llama_server_binary(given: Path | None) -> Path:
    if given is not None:
        return given
    out = subprocess.run([str(REPO / "bench" / "build_llama_server.sh")], check=True,
                         stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


class LlamaServer:
    def __init__(self, binary: Path, model: Path, slots: int, ctx: int, threads: int) -> None:
        self.port = free_port()
        fd, name = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
        self.log = Path(name)
        self.args = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port",
                     str(self.port), "-np", str(slots), "-c", str(slots * ctx),
                     "-t", str(threads), "-tb", str(threads)]
        with os.fdopen(fd, "wb") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"llama-server exited {self.proc.returncode}; see "
                                 f"{self.log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"llama-server not ready after {timeout:.0f} s; see {self.log}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def rbee_worker(agent: AgentProc, slots: int, ctx: int) -> tuple[str, int]:
    worker = agent.spawn(ctx_size=ctx, slots=slots)
    ready = agent.wait_state(worker["id"], "idle", timeout=120)
    return str(worker["id"]), int(ready["pid"])


# ---------------------------------------------------------------------- memory


def worker_rss(slots: int, ctx: int, threads: int) -> dict[str, Any]:
    """A worker's RSS once loaded and after one request (weights are mmapped: resident
    once touched), from psutil."""
    worker = start_worker_process(Path(tempfile.mkdtemp()), "--slots", str(slots),
                                  "--ctx-size", str(ctx), "--threads", str(threads))
    try:
        worker.wait_ready(120)
        httpx.post(f"{worker.url}/v1/inference", headers=worker.headers, timeout=120,
                   json={"prompt": "Hi", "max_tokens": 8, "stream": False})
        info = psutil.Process(worker.proc.pid).memory_full_info()
        return {"slots": slots, "rss_mb": round(info.rss / 2**20, 1),
                "uss_mb": round(info.uss / 2**20, 1)}
    finally:
        worker.stop()


# ---------------------------------------------------------------------- main


def row(level: Level) -> str:
    s = level.summary()

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    return (f"{level.clients:>7} {level.name:<13} {s['tok_s']:>8.1f} {f(s['ttft_p50_ms']):>9} "
            f"{f(s['ttft_p99_ms']):>9} {f(s['itl_p50_ms']):>8} {f(s['itl_p99_ms']):>8} "
            f"{s['errors']:>6} {s['rejected_503']:>5} {s['requests']:>5} "
            f"{s['cpu_ms_per_token']:>7.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--clients", default="1,4,16,64")
    p.add_argument("--slots", type=int, default=4, help="parallel slots, both sides")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx-size", type=int, default=2048, help="context per slot")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="requests per client")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs per level and side, alternating which side goes first")
    p.add_argument("--llama-server", type=Path, default=None,
                   help="llama-server binary (default: build or find it with "
                   "bench/build_llama_server.sh)")
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]
    model = bundled_model_path()
    binary = llama_server_binary(args.llama_server)

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"model {model.name}; slots {args.slots} × ctx {args.ctx_size}; threads "
          f"{args.threads}; {args.max_tokens} tokens per request (ignore_eos), greedy; "
          f"{args.rounds} request(s) per client; cpus {os.cpu_count()}; load average {load}")
    home = Path(tempfile.mkdtemp(prefix="rbee-bench-concurrency-"))
    # The product's queue, not the tests' (they turn it off to see ALL_SLOTS_BUSY at once).
    queue = AgentSettings.model_fields["worker_queue_depth"].default
    agent = start_agent(home, **{"worker-threads": str(args.threads),
                                 "worker-queue-depth": str(queue)})
    server = LlamaServer(binary, model, args.slots, args.ctx_size, args.threads)
    results: dict[str, Any] = {"slots": args.slots, "threads": args.threads,
                               "ctx_size": args.ctx_size, "max_tokens": args.max_tokens,
                               "rounds": args.rounds, "repeat": args.repeat, "levels": {}}
    try:
        worker_id, worker_pid = rbee_worker(agent, args.slots, args.ctx_size)
        server.wait_ready()
        sides = [
            Server("rbee", f"{agent.url}/v1/workers/{worker_id}/inference", agent.headers,
                   rbee_body, rbee_parse, [agent.proc.pid, worker_pid]),
            Server("llama-server", f"{server.url}/completion", {}, llama_server_body,
                   llama_server_parse, [server.proc.pid]),
        ]
        for side in sides:  # warm-up, not counted
            asyncio.run(run_level(side, Level(side.name, 1), 1, 8, -1))
        print(f"\n{'clients':>7} {'server':<13} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
              f"{'ITL p50':>8} {'ITL p99':>8} {'errors':>6} {'503s':>5} {'reqs':>5} "
              f"{'CPU ms/tok':>7}")
        for clients in levels:
            pair: dict[str, Any] = {}
            runs = {side.name: Level(side.name, clients) for side in sides}
            for run in range(args.repeat):
                for side in (sides if run % 2 == 0 else sides[::-1]):
                    asyncio.run(run_level(side, runs[side.name], args.rounds,
                                          args.max_tokens, run))
            for side in sides:
                level = runs[side.name]
                print(row(level), flush=True)
                pair[side.name] = level.summary()
                failed = [r.error for r in level.results if r.error][:3]
                if failed:
                    print(f"        first errors: {failed}")
            pair["ratio"] = round(pair["rbee"]["tok_s"] / pair["llama-server"]["tok_s"], 3)
            results["levels"][str(clients)] = pair
    finally:
        server.stop()
        agent.stop()
    for clients, pair in results["levels"].items():
        print(f"{clients:>3} clients: rbee/llama-server aggregate tok/s {pair['ratio']:.3f}")
    if "16" in results["levels"]:
        results["ratio_16"] = results["levels"]["16"]["ratio"]
    if "64" in results["levels"]:
        rbee64 = results["levels"]["64"]["rbee"]
        results["rbee_64_errors"] = rbee64["errors"]
        results["rbee_64_503s"] = rbee64["rejected_503"]
    if not args.skip_memory:
        memory = [worker_rss(n, args.ctx_size, args.threads) for n in (1, 8)]
        for m in memory:
            print(f"worker RSS with {m['slots']} slot(s): {m['rss_mb']} MB "
                  f"(USS {m['uss_mb']} MB)")
        results["memory"] = memory
    results["load_average"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
