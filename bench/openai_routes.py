"""OpenAI routes (issue 14): what the OpenAI layer and the gateway cost on top of rbee.

    .venv/bin/python bench/openai_routes.py [--runs 5] [--tokens 128] [--clients 16]
                                            [--threads 2] [--slots 1]

Three ways to the same worker (one agent, one worker, same prompt, greedy, streamed):
- **native**: `POST /v1/workers/{id}/inference` on the agent (rbee's own protocol);
- **agent OpenAI**: `POST /openai/v1/completions` on the agent;
- **gateway**: `POST /v1/completions` on `rbee serve`, which relays to the agent's OpenAI
  route (the node is registered as direct HTTP, so no SSH in between).

Single stream: runs alternate native, OpenAI, gateway after one warm-up each; medians of tok/s
(tokens / send → last frame) and TTFT. Then `--clients` concurrent streams per way, one way at a
time: aggregate tok/s (all tokens / wall time), with 503 answers retried with backoff (50 ms,
doubling, at most 0.5 s) and counted (a worker without a queue refuses what its slots cannot
take). Targets: agent
OpenAI ≥ 0.97× native; gateway ≥ 0.95× agent OpenAI. The clients read the streams with
rbee's own lean HTTP reader (`rbee_agent.relay`), so the bench's parsing takes as little as
possible from the 2 cores the server side shares. The last line is one JSON object.
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
    openai: bool

    def body(self, tokens: int) -> bytes:
        fields: dict[str, Any] = {"prompt": LONG_PROMPT, "max_tokens": tokens,
                                  "temperature": 0, "seed": 1, "stream": True}
        if self.openai:
            fields.update(model=MODEL, stream_options={"include_usage": True})
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


async def single(ways: list[Way], tokens: int, runs: int, agent_pid: int,
                 gateway_pid: int) -> dict[str, Any]:
    """Medians per way, and the CPU the agent and the gateway spent per token: a figure the
    load of a shared machine does not move the way it moves tok/s."""
    for way in ways:
        await stream_once(way, 16)
    tps: dict[str, list[float]] = {w.name: [] for w in ways}
    ttft: dict[str, list[float]] = {w.name: [] for w in ways}
    cpu: dict[str, float] = {w.name: 0.0 for w in ways}
    for _ in range(runs):
        for way in ways:
            before = cpu_s([agent_pid, gateway_pid])
            run = await stream_once(way, tokens)
            cpu[way.name] += cpu_s([agent_pid, gateway_pid]) - before
            assert run.tokens == tokens, (way.name, run)
            tps[way.name].append(run.tokens / run.total_s)
            ttft[way.name].append(run.ttft_s * 1000)
    return {name: {"tok_s": round(statistics.median(tps[name]), 2),
                   "ttft_ms": round(statistics.median(ttft[name]), 2),
                   "server_cpu_us_per_token": round(cpu[name] / (runs * tokens) * 1e6, 1)}
            for name in tps}


async def concurrent(way: Way, tokens: int, clients: int) -> dict[str, Any]:
    started = time.perf_counter()
    runs = await asyncio.gather(*(stream_once(way, tokens) for _ in range(clients)))
    wall = time.perf_counter() - started
    total = sum(r.tokens for r in runs)
    return {"tok_s": round(total / wall, 2), "retries_503": sum(r.retries for r in runs),
            "ttft_p50_ms": round(statistics.median(r.ttft_s for r in runs) * 1000, 1)}


def ways(agent: AgentProc, worker_id: str, gateway: GatewayProc) -> list[Way]:
    gw_port = int(gateway.url.rsplit(":", 1)[1].split("/")[0])
    return [
        Way("native", "127.0.0.1", agent.port, f"/v1/workers/{worker_id}/inference",
            agent.key, False),
        Way("agent_openai", "127.0.0.1", agent.port, "/openai/v1/completions", agent.key,
            True),
        Way("gateway", "127.0.0.1", gw_port, "/v1/completions", gateway.key, True),
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--slots", type=int, default=1)
    args = p.parse_args()
    home = Path(tempfile.mkdtemp(prefix="rbee-bench-openai-"))
    agent = start_agent(home / "agent", **{"worker-threads": str(args.threads),
                                            "worker-slots": str(args.slots)})
    gateway = start_gateway(home / "rbee", {"localhost": direct(agent)},
                            gateway_state_ttl_s=1.0)
    try:
        worker = agent.spawn()
        agent.wait_state(worker["id"], "idle", timeout=120)
        paths = ways(agent, worker["id"], gateway)
        one = asyncio.run(single(paths, args.tokens, args.runs, agent.proc.pid,
                                 gateway.proc.pid))
        print(f"single stream: {json.dumps(one)}", flush=True)
        many = {}
        for way in paths:
            many[way.name] = asyncio.run(concurrent(way, args.tokens, args.clients))
            print(f"{args.clients} clients, {way.name}: {json.dumps(many[way.name])}",
                  flush=True)
    finally:
        gateway.stop()
        agent.stop()
    result: dict[str, Any] = {
        "single": one, f"clients_{args.clients}": many,
        "openai_vs_native_single": round(one["agent_openai"]["tok_s"]
                                         / one["native"]["tok_s"], 4),
        "gateway_vs_agent_single": round(one["gateway"]["tok_s"]
                                         / one["agent_openai"]["tok_s"], 4),
        "openai_vs_native_clients": round(many["agent_openai"]["tok_s"]
                                          / many["native"]["tok_s"], 4),
        "gateway_vs_agent_clients": round(many["gateway"]["tok_s"]
                                          / many["agent_openai"]["tok_s"], 4),
        "tokens": args.tokens, "runs": args.runs, "threads": args.threads,
        "slots": args.slots, "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    print(f"{'':14}{'single tok/s':>14}{'TTFT ms':>10}{'server CPU µs/tok':>19}"
          f"{f'{args.clients} clients tok/s':>20}{'503 retries':>13}")
    for name in ("native", "agent_openai", "gateway"):
        print(f"{name:14}{one[name]['tok_s']:>14}{one[name]['ttft_ms']:>10}"
              f"{one[name]['server_cpu_us_per_token']:>19}"
              f"{many[name]['tok_s']:>20}{many[name]['retries_503']:>13}")
    print(f"agent OpenAI / native: {result['openai_vs_native_single']} single, "
          f"{result['openai_vs_native_clients']} with {args.clients} clients (target ≥ 0.97)")
    print(f"gateway / agent OpenAI: {result['gateway_vs_agent_single']} single, "
          f"{result['gateway_vs_agent_clients']} with {args.clients} clients (target ≥ 0.95)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
