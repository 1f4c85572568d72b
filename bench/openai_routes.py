"""OpenAI routes (issue 14): what the OpenAI layer and the gateway cost on top of rbee.

    .venv/bin/python bench/openai_routes.py [--runs 7] [--tokens 128] [--clients 16]
                                            [--rounds 3] [--threads 2]

Three ways to the same worker (same prompt, greedy, streamed):
- **native**: `POST /v1/workers/{id}/inference` on the agent (rbee's own protocol);
- **agent OpenAI**: `POST /openai/v1/completions` on the agent;
- **gateway**: `POST /v1/completions` on `rbee serve`, which relays to the agent's OpenAI
  route (nodes registered as direct HTTP, so no SSH in between; the model pinned to the node).

Single stream, on a 1-slot worker with `--threads`: runs alternate native, OpenAI, gateway
after one warm-up each; medians of tok/s (tokens / send → last frame) and TTFT, the CPU the
agent and the gateway spent per token, and the median of each round's ratios (neighbouring
runs, so drift in a shared machine's load cancels). Then `--clients` streams at once, on a
second agent whose worker has one slot per client and one thread per slot (so every stream
runs; a worker without a queue would refuse the rest), in `--rounds` bursts alternating
between the ways: median aggregate tok/s (all tokens / wall time) and paired ratios. A 503
would be retried with backoff and counted. Targets: agent OpenAI ≥ 0.97× native; gateway ≥
0.95× agent OpenAI. The clients read the streams with rbee's own lean HTTP reader
(`rbee_agent.relay`), so the bench's parsing takes as little as possible from the cores the
servers share. The last line is one JSON object.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rbee_agent import relay  # noqa: E402
from tests.agent_support import AgentProc, start_agent  # noqa: E402
from tests.gateway_support import GatewayProc, direct, start_gateway  # noqa: E402
from tests.support import LONG_PROMPT  # noqa: E402

MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Way:
    name: str
    host: str
    port: int
    path: str
    key: str
    model: str | None  # None: rbee's own route, which names no model

    def body(self, tokens: int) -> bytes:
        fields: dict[str, Any] = {"prompt": LONG_PROMPT, "max_tokens": tokens,
                                  "temperature": 0, "seed": 1, "stream": True}
        if self.model is not None:
            fields.update(model=self.model, stream_options={"include_usage": True})
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


async def single(ways: list[Way], tokens: int, runs: int, pids: list[int]) -> dict[str, Any]:
    """Medians per way, the median of each round's ratios (neighbouring runs: drift in a
    shared machine's load cancels), and the CPU the agent and the gateway spent per token, a
    figure the load moves far less than it moves tok/s."""
    for way in ways:
        await stream_once(way, 16)
    tps: dict[str, list[float]] = {w.name: [] for w in ways}
    ttft: dict[str, list[float]] = {w.name: [] for w in ways}
    cpu: dict[str, float] = {w.name: 0.0 for w in ways}
    for _ in range(runs):
        for way in ways:
            before = cpu_s(pids)
            run = await stream_once(way, tokens)
            cpu[way.name] += cpu_s(pids) - before
            assert run.tokens == tokens, (way.name, run)
            tps[way.name].append(run.tokens / run.total_s)
            ttft[way.name].append(run.ttft_s * 1000)
    found: dict[str, Any] = {
        name: {"tok_s": round(statistics.median(tps[name]), 2),
               "ttft_ms": round(statistics.median(ttft[name]), 2),
               "server_cpu_us_per_token": round(cpu[name] / (runs * tokens) * 1e6, 1)}
        for name in tps}
    found["paired_ratios"] = paired(tps)
    return found


def paired(tps: dict[str, list[float]]) -> dict[str, float]:
    med = statistics.median
    return {
        "openai_vs_native": round(med(o / n for o, n in zip(tps["agent_openai"],
                                                            tps["native"], strict=True)), 4),
        "gateway_vs_agent": round(med(g / o for g, o in zip(tps["gateway"],
                                                            tps["agent_openai"],
                                                            strict=True)), 4),
    }


async def burst(way: Way, tokens: int, clients: int) -> tuple[float, int, float]:
    """(aggregate tok/s, 503 retries, median TTFT s) of `clients` streams at once."""
    started = time.perf_counter()
    runs = await asyncio.gather(*(stream_once(way, tokens) for _ in range(clients)))
    wall = time.perf_counter() - started
    return (sum(r.tokens for r in runs) / wall, sum(r.retries for r in runs),
            statistics.median(r.ttft_s for r in runs))


async def concurrent(ways: list[Way], tokens: int, clients: int, rounds: int
                     ) -> dict[str, Any]:
    """Bursts alternate between the ways, as the single streams do; medians per way."""
    found: dict[str, list[tuple[float, int, float]]] = {w.name: [] for w in ways}
    for _ in range(rounds):
        for way in ways:
            found[way.name].append(await burst(way, tokens, clients))
    med = statistics.median
    result: dict[str, Any] = {
        name: {"tok_s": round(med(r[0] for r in runs), 2),
               "retries_503": round(med(r[1] for r in runs)),
               "ttft_p50_ms": round(med(r[2] for r in runs) * 1000, 1)}
        for name, runs in found.items()}
    result["paired_ratios"] = paired({name: [r[0] for r in runs]
                                      for name, runs in found.items()})
    return result


def ways(agent: AgentProc, worker_id: str, gateway: GatewayProc, node: str) -> list[Way]:
    gw_port = int(gateway.url.rsplit(":", 1)[1].split("/")[0])
    return [
        Way("native", "127.0.0.1", agent.port, f"/v1/workers/{worker_id}/inference",
            agent.key, None),
        Way("agent_openai", "127.0.0.1", agent.port, "/openai/v1/completions", agent.key,
            MODEL),
        Way("gateway", "127.0.0.1", gw_port, "/v1/completions", gateway.key,
            f"{MODEL}@{node}"),
    ]


def warm_worker(agent: AgentProc) -> str:
    worker = agent.spawn()
    agent.wait_state(worker["id"], "idle", timeout=120)
    return str(worker["id"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="bursts of --clients per way")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads, single stream")
    args = p.parse_args()
    home = Path(tempfile.mkdtemp(prefix="rbee-bench-openai-"))
    # Single streams: one slot with every thread. Bursts: one slot per client, one thread
    # each, so all of them stream at once (a worker without a queue would refuse most).
    one_agent = start_agent(home / "single", **{"worker-threads": str(args.threads)})
    burst_agent = start_agent(home / "burst", **{"worker-threads": "1",
                                                  "worker-slots": str(args.clients)})
    gateway = start_gateway(home / "rbee", {"localhost": direct(one_agent),
                                            "burst": direct(burst_agent)},
                            gateway_state_ttl_s=1.0)
    try:
        paths = ways(one_agent, warm_worker(one_agent), gateway, "localhost")
        one = asyncio.run(single(paths, args.tokens, args.runs,
                                 [one_agent.proc.pid, gateway.proc.pid]))
        print(f"single stream: {json.dumps(one)}", flush=True)
        paths = ways(burst_agent, warm_worker(burst_agent), gateway, "burst")
        many = asyncio.run(concurrent(paths, args.tokens, args.clients, args.rounds))
    finally:
        gateway.stop()
        one_agent.stop()
        burst_agent.stop()
    result: dict[str, Any] = {
        "single": one, f"clients_{args.clients}": many,
        "openai_vs_native_single": one["paired_ratios"]["openai_vs_native"],
        "gateway_vs_agent_single": one["paired_ratios"]["gateway_vs_agent"],
        "openai_vs_native_clients": many["paired_ratios"]["openai_vs_native"],
        "gateway_vs_agent_clients": many["paired_ratios"]["gateway_vs_agent"],
        "tokens": args.tokens, "runs": args.runs, "rounds": args.rounds,
        "threads": args.threads, "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    print(f"{'':14}{'single tok/s':>14}{'TTFT ms':>10}{'server CPU µs/tok':>19}"
          f"{f'{args.clients} clients tok/s':>20}{'503 retries':>13}")
    for name in ("native", "agent_openai", "gateway"):
        print(f"{name:14}{one[name]['tok_s']:>14}{one[name]['ttft_ms']:>10}"
              f"{one[name]['server_cpu_us_per_token']:>19}"
              f"{many[name]['tok_s']:>20}{many[name]['retries_503']:>13}")
    print(f"agent OpenAI / native (median of paired runs): "
          f"{result['openai_vs_native_single']} single, {result['openai_vs_native_clients']} "
          f"with {args.clients} clients (target ≥ 0.97)")
    print(f"gateway / agent OpenAI (median of paired runs): "
          f"{result['gateway_vs_agent_single']} single, {result['gateway_vs_agent_clients']} "
          f"with {args.clients} clients (target ≥ 0.95)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
