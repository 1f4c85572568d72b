"""OpenAI routes (issue 14): what the OpenAI layer and the gateway cost on top of rbee.

    bench/build_llama_server.sh                       # once per machine (minutes)
    .venv/bin/python bench/openai_routes.py [--runs 7] [--tokens 128] [--clients 16]
                                            [--rounds 3] [--threads N] [--llama-server PATH]

Four ways to generate the same tokens (same prompt, greedy, streamed):
- **native**: `POST /v1/workers/{id}/inference` on the agent (rbee's own protocol);
- **agent OpenAI**: `POST /openai/v1/completions` on the agent;
- **gateway**: `POST /v1/completions` on `rbee serve`, which relays to the agent's OpenAI
  route (nodes registered as direct HTTP, so no SSH in between; the model pinned to the node);
- **llama-server OpenAI**: `POST /v1/completions` on llama.cpp's own llama-server (started by
  bench/concurrency.py's launcher, built from the same llama.cpp), with the same slots,
  context per slot and threads as the rbee worker; `ignore_eos` and `n_predict` make it
  generate exactly `--tokens` tokens, as the greedy rbee runs do (checked on every run).

Single stream, on a 1-slot worker (and a 1-slot llama-server) with `--threads`: after one
warm-up each, every round runs each way once, the order reversed every other round; medians
of tok/s (tokens / send → last frame) and TTFT, the CPU per token of the processes that
serve each way (agent + worker, + gateway; llama-server) and of rbee's relaying layers alone
(agent + gateway), and the median of each round's ratios (neighbouring runs, so drift in a
shared machine's load cancels). Then `--clients` streams at once, on a second agent whose
worker has one slot per client and one llama.cpp thread (and a llama-server with `-np
clients -t 1`), in `--rounds` bursts that alternate between the ways in the same way:
median aggregate tok/s (all tokens / wall time) and paired ratios. A 503 would be retried
with backoff and counted. Targets: agent OpenAI ≥ 0.97× native; gateway ≥ 0.95× agent
OpenAI; agent OpenAI over llama-server's OpenAI route is reported beside them. The clients
read the streams with rbee's own lean HTTP reader (`rbee_agent.relay`), so the bench's
parsing takes as little as possible from the cores the servers share. The last line is one
JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.concurrency import LlamaServer, llama_server_binary  # noqa: E402
from rbee_agent import relay  # noqa: E402
from rbee_agent.settings import AgentSettings  # noqa: E402
from rbee_agent.worker.engine import default_threads  # noqa: E402
from tests.agent_support import AgentProc, start_agent  # noqa: E402
from tests.gateway_support import GatewayProc, direct, start_gateway  # noqa: E402
from tests.support import LONG_PROMPT, bundled_model_path  # noqa: E402

MODEL = "smollm2-135m"
T = TypeVar("T")


@dataclass(frozen=True)
class Way:
    name: str
    host: str
    port: int
    path: str
    key: str
    model: str | None  # None: rbee's own route, which names no model
    pids: list[int] = field(default_factory=list)  # every process that serves this way
    relay_pids: list[int] = field(default_factory=list)  # rbee's layers: agent, gateway
    fixed_length: bool = False  # llama-server: generate exactly `tokens`, end-of-text or not

    def body(self, tokens: int) -> bytes:
        fields: dict[str, Any] = {"prompt": LONG_PROMPT, "max_tokens": tokens,
                                  "temperature": 0, "seed": 1, "stream": True}
        if self.model is not None:
            fields.update(model=self.model, stream_options={"include_usage": True})
        if self.fixed_length:
            fields.update(ignore_eos=True, n_predict=tokens)
        return json.dumps(fields).encode()


@dataclass
class Run:
    tokens: int
    ttft_s: float
    total_s: float
    retries: int


async def stream_once(way: Way, tokens: int) -> Run:
    """One streamed generation, retried on 503; timed from the accepted send."""
    headers = {"Authorization": f"Bearer {way.key}", "Content-Type": "application/json"}
    retries = 0
    body = way.body(tokens)
    while True:
        started = time.perf_counter()
        upstream = await relay.post(way.host, way.port, way.path, headers, body)
        if upstream.status == 503:  # no free slot (and no queue): back off, as the SDK does
            await upstream.read()
            await upstream.aclose()
            retries += 1
            await asyncio.sleep(min(0.5, 0.025 * 2**retries))
            continue
        if upstream.status != 200:
            raise SystemExit(f"{way.name}: HTTP {upstream.status}: {await upstream.read()!r}")
        break
    first = 0.0
    count = 0
    try:
        async for batch in upstream.sse_batches():
            if not first and (b'"token"' in batch or b'"finish_reason":null' in batch):
                first = time.perf_counter()
            if b'"done":true' in batch or b'"usage":{' in batch:
                count = _total(batch)
    finally:
        await upstream.aclose()
    end = time.perf_counter()
    return Run(count, first - started, end - started, retries)


def _total(batch: bytes) -> int:
    for frame in batch.split(b"\n\n"):
        if frame.startswith(b"data: {"):
            event = json.loads(frame[6:])
            if event.get("done"):
                return int(event["total_tokens"])
            if event.get("usage"):
                return int(event["usage"]["completion_tokens"])
    return 0


def cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


@dataclass
class Cpu:
    """CPU seconds one way's serving processes, and rbee's relaying layers among them, spent
    over its runs: a figure a shared machine's load moves far less than it moves tok/s."""

    serving_s: float = 0.0
    relay_s: float = 0.0
    tokens: int = 0

    async def measure(self, way: Way, run: Awaitable[T]) -> T:
        serving, relaying = cpu_s(way.pids), cpu_s(way.relay_pids)
        result = await run
        self.serving_s += cpu_s(way.pids) - serving
        self.relay_s += cpu_s(way.relay_pids) - relaying
        return result

    def per_token_us(self) -> dict[str, float]:
        tokens = max(1, self.tokens)
        return {"cpu_us_per_token": round(self.serving_s / tokens * 1e6, 1),
                "relay_cpu_us_per_token": round(self.relay_s / tokens * 1e6, 1)}


def in_turn(ways: list[Way], round_: int) -> list[Way]:
    """Each round runs every way once, the order reversed every other round, so no way always
    follows the same neighbour."""
    return ways if round_ % 2 == 0 else ways[::-1]


async def single(ways: list[Way], tokens: int, runs: int) -> dict[str, Any]:
    """Medians per way, the median of each round's ratios (neighbouring runs: drift in a
    shared machine's load cancels), and the CPU per token of each way's processes."""
    for way in ways:
        await stream_once(way, 16)
    tps: dict[str, list[float]] = {w.name: [] for w in ways}
    ttft: dict[str, list[float]] = {w.name: [] for w in ways}
    cpu = {w.name: Cpu() for w in ways}
    for round_ in range(runs):
        for way in in_turn(ways, round_):
            run = await cpu[way.name].measure(way, stream_once(way, tokens))
            assert run.tokens == tokens, (way.name, run)
            cpu[way.name].tokens += run.tokens
            tps[way.name].append(run.tokens / run.total_s)
            ttft[way.name].append(run.ttft_s * 1000)
    found: dict[str, Any] = {
        name: {"tok_s": round(statistics.median(tps[name]), 2),
               "ttft_ms": round(statistics.median(ttft[name]), 2),
               **cpu[name].per_token_us()}
        for name in tps}
    found["paired_ratios"] = paired(tps)
    return found


RATIOS = {  # name: (numerator way, denominator way)
    "openai_vs_native": ("agent_openai", "native"),
    "gateway_vs_agent": ("gateway", "agent_openai"),
    "openai_vs_llama_server": ("agent_openai", "llama_server_openai"),
    "gateway_vs_llama_server": ("gateway", "llama_server_openai"),
}


def paired(tps: dict[str, list[float]]) -> dict[str, float]:
    return {name: round(statistics.median(a / b for a, b in zip(tps[top], tps[bottom],
                                                                strict=True)), 4)
            for name, (top, bottom) in RATIOS.items()}


async def burst(way: Way, tokens: int, clients: int) -> tuple[float, int, float, int]:
    """(aggregate tok/s, 503 retries, median TTFT s, tokens) of `clients` streams at once."""
    started = time.perf_counter()
    runs = await asyncio.gather(*(stream_once(way, tokens) for _ in range(clients)))
    wall = time.perf_counter() - started
    assert all(r.tokens == tokens for r in runs), (way.name, runs)
    total = sum(r.tokens for r in runs)
    return (total / wall, sum(r.retries for r in runs),
            statistics.median(r.ttft_s for r in runs), total)


async def concurrent(ways: list[Way], tokens: int, clients: int, rounds: int
                     ) -> dict[str, Any]:
    """Bursts alternate between the ways, as the single streams do; medians per way."""
    for way in ways:  # warm-up: every slot's first request, not counted
        await burst(way, 16, clients)
    found: dict[str, list[tuple[float, int, float, int]]] = {w.name: [] for w in ways}
    cpu = {w.name: Cpu() for w in ways}
    for round_ in range(rounds):
        for way in in_turn(ways, round_):
            found[way.name].append(await cpu[way.name].measure(way, burst(way, tokens,
                                                                          clients)))
            cpu[way.name].tokens += found[way.name][-1][3]
    med = statistics.median
    result: dict[str, Any] = {
        name: {"tok_s": round(med(r[0] for r in runs), 2),
               "retries_503": round(med(r[1] for r in runs)),
               "ttft_p50_ms": round(med(r[2] for r in runs) * 1000, 1),
               **cpu[name].per_token_us()}
        for name, runs in found.items()}
    result["paired_ratios"] = paired({name: [r[0] for r in runs]
                                      for name, runs in found.items()})
    return result


def ways(agent: AgentProc, worker: tuple[str, int], gateway: GatewayProc, node: str,
         server: LlamaServer) -> list[Way]:
    gw_port = int(gateway.url.rsplit(":", 1)[1].split("/")[0])
    worker_id, worker_pid = worker
    rbee = [agent.proc.pid, worker_pid]
    return [
        Way("native", "127.0.0.1", agent.port, f"/v1/workers/{worker_id}/inference",
            agent.key, None, rbee, [agent.proc.pid]),
        Way("agent_openai", "127.0.0.1", agent.port, "/openai/v1/completions", agent.key,
            MODEL, rbee, [agent.proc.pid]),
        Way("gateway", "127.0.0.1", gw_port, "/v1/completions", gateway.key,
            f"{MODEL}@{node}", [*rbee, gateway.proc.pid], [agent.proc.pid, gateway.proc.pid]),
        Way("llama_server_openai", "127.0.0.1", server.port, "/v1/completions", "none",
            MODEL, [server.proc.pid], [], fixed_length=True),
    ]


def warm_worker(agent: AgentProc) -> tuple[str, int]:
    worker = agent.spawn()
    ready = agent.wait_state(worker["id"], "idle", timeout=120)
    return str(worker["id"]), int(ready["pid"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="bursts of --clients per way")
    p.add_argument("--threads", type=int, default=default_threads(),
                   help="llama.cpp threads, single stream (default: the worker's own default, "
                   "half the CPUs)")
    p.add_argument("--llama-server", type=Path, default=None,
                   help="llama-server binary (default: find or build it with "
                   "bench/build_llama_server.sh)")
    args = p.parse_args()
    binary = llama_server_binary(args.llama_server)
    model = bundled_model_path()
    ctx = AgentSettings.model_fields["worker_ctx_size"].default  # per slot, as the worker's
    load_before = [round(x, 2) for x in os.getloadavg()]
    home = Path(tempfile.mkdtemp(prefix="rbee-bench-openai-"))
    # Single streams: one slot with every thread. Bursts: one slot per client, one llama.cpp
    # thread, so all of them stream at once (a worker without a queue would refuse most).
    # llama-server the same each time; one at a time, so the idle one holds no memory.
    one_agent = start_agent(home / "single", **{"worker-threads": str(args.threads)})
    burst_agent = start_agent(home / "burst", **{"worker-threads": "1",
                                                  "worker-slots": str(args.clients)})
    gateway = start_gateway(home / "rbee", {"localhost": direct(one_agent),
                                            "burst": direct(burst_agent)},
                            gateway_state_ttl_s=1.0)
    server: LlamaServer | None = None
    try:
        server = LlamaServer(binary, model, 1, ctx, args.threads)
        server.wait_ready()
        paths = ways(one_agent, warm_worker(one_agent), gateway, "localhost", server)
        one = asyncio.run(single(paths, args.tokens, args.runs))
        print(f"single stream: {json.dumps(one)}", flush=True)
        server.stop()
        server = LlamaServer(binary, model, args.clients, ctx, 1)
        server.wait_ready()
        paths = ways(burst_agent, warm_worker(burst_agent), gateway, "burst", server)
        many = asyncio.run(concurrent(paths, args.tokens, args.clients, args.rounds))
    finally:
        if server is not None:
            server.stop()
        gateway.stop()
        one_agent.stop()
        burst_agent.stop()
    result: dict[str, Any] = {
        "single": one, f"clients_{args.clients}": many,
        **{f"{name}_single": one["paired_ratios"][name] for name in RATIOS},
        **{f"{name}_clients": many["paired_ratios"][name] for name in RATIOS},
        "tokens": args.tokens, "runs": args.runs, "rounds": args.rounds,
        "threads": args.threads, "load_average_before": load_before,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    print(f"{'':20}{'single tok/s':>13}{'TTFT ms':>9}{'CPU µs/tok':>11}{'relay':>7}"
          f"{f'{args.clients} clients tok/s':>20}{'CPU µs/tok':>11}{'relay':>7}{'503s':>6}")
    for name in (w.name for w in paths):
        s, m = one[name], many[name]
        print(f"{name:20}{s['tok_s']:>13}{s['ttft_ms']:>9}{s['cpu_us_per_token']:>11}"
              f"{s['relay_cpu_us_per_token']:>7}{m['tok_s']:>20}{m['cpu_us_per_token']:>11}"
              f"{m['relay_cpu_us_per_token']:>7}{m['retries_503']:>6}")
    targets = {"openai_vs_native": "agent OpenAI / native (target ≥ 0.97)",
               "gateway_vs_agent": "gateway / agent OpenAI (target ≥ 0.95)",
               "openai_vs_llama_server": "agent OpenAI / llama-server OpenAI",
               "gateway_vs_llama_server": "gateway / llama-server OpenAI"}
    for name, what in targets.items():
        print(f"{what}, median of paired runs: {result[f'{name}_single']} single, "
              f"{result[f'{name}_clients']} with {args.clients} clients")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
