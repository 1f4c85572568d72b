"""Agent benchmarks (issue 3): what the agent costs on top of its workers.

    .venv/bin/python bench/agent.py [--runs 5] [--tokens 128] [--clients 100]

1. tokens/s and TTFT through the agent's proxy vs straight to a worker (same model, same
   threads, same prompt, greedy; runs alternated) — targets ratio ≥ 0.98, TTFT +≤ 5 ms;
2. spawn-to-ready through the agent vs loading the model with raw llama-cpp-python in a fresh
   process — target overhead ≤ 1 s;
3. `GET /v1/workers` latency p50/p99 with 100 concurrent clients — target p99 ≤ 20 ms;
4. the agent's idle RSS — target ≤ 80 MB.
The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.agent_support import AgentProc, start_agent  # noqa: E402
from tests.support import LONG_PROMPT, bundled_model_path, start_worker_process  # noqa: E402


def stream_once(url: str, headers: dict[str, str], tokens: int) -> tuple[float, float]:
    """(TTFT ms, tokens/s) of one greedy generation, timed at the client."""
    body = {"prompt": LONG_PROMPT, "max_tokens": tokens, "temperature": 0, "seed": 1}
    started = time.perf_counter()
    first = 0.0
    count = 0
    with httpx.stream("POST", url, json=body, headers=headers, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith('data: {"token"'):
                count += 1
                first = first or time.perf_counter()
            elif line.startswith('data: {"done"'):
                count = json.loads(line[6:])["total_tokens"]
    end = time.perf_counter()
    return (first - started) * 1000, count / (end - started)


def proxy_vs_direct(agent: AgentProc, tokens: int, runs: int, threads: int) -> dict[str, Any]:
    worker = agent.spawn(ctx_size=2048)
    agent.wait_state(worker["id"], "idle")
    direct = start_worker_process(Path(tempfile.mkdtemp()), "--threads", str(threads))
    direct.wait_ready()
    via_agent = f"{agent.url}/v1/workers/{worker['id']}/inference"
    straight = f"{direct.url}/v1/inference"
    try:
        stream_once(via_agent, agent.headers, 16)
        stream_once(straight, direct.headers, 16)
        a_ttft, a_tps, d_ttft, d_tps = [], [], [], []
        for _ in range(runs):
            t, s = stream_once(straight, direct.headers, tokens)
            d_ttft.append(t)
            d_tps.append(s)
            t, s = stream_once(via_agent, agent.headers, tokens)
            a_ttft.append(t)
            a_tps.append(s)
    finally:
        direct.stop()
        agent.delete(f"/v1/workers/{worker['id']}")
    med = statistics.median
    return {"proxy_tok_s": round(med(a_tps), 2), "direct_tok_s": round(med(d_tps), 2),
            "proxy_ratio": round(med(a_tps) / med(d_tps), 4),
            "proxy_ttft_ms": round(med(a_ttft), 2), "direct_ttft_ms": round(med(d_ttft), 2),
            "proxy_ttft_overhead_ms": round(med(a_ttft) - med(d_ttft), 2)}


RAW_LOAD = """
import time, sys
t = time.perf_counter()
from llama_cpp import Llama
Llama(model_path=sys.argv[1], n_ctx=2048, n_threads={threads}, verbose=False)
print(time.perf_counter() - t)
"""


def spawn_vs_raw(agent: AgentProc, runs: int, threads: int) -> dict[str, Any]:
    raw, spawned = [], []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", RAW_LOAD.format(threads=threads),
                              str(bundled_model_path())], capture_output=True, text=True,
                             check=True)
        raw.append(float(out.stdout.strip().splitlines()[-1]))
        started = time.perf_counter()
        worker = agent.spawn(ctx_size=2048)
        with httpx.stream("GET", f"{agent.url}/v1/workers/{worker['id']}/progress",
                          headers=agent.headers, timeout=120) as r:
            for line in r.iter_lines():
                if '"stage":"ready"' in line:
                    break
        spawned.append(time.perf_counter() - started)
        agent.delete(f"/v1/workers/{worker['id']}")
    med = statistics.median
    return {"raw_load_s": round(med(raw), 3), "spawn_to_ready_s": round(med(spawned), 3),
            "spawn_overhead_s": round(med(spawned) - med(raw), 3)}


async def list_latency(agent: AgentProc, clients: int, seconds: float,
                       interval_s: float) -> dict[str, Any]:
    """100 clients polling concurrently, each once per `interval_s` (a dashboard polls every
    2 s), with random phase: latency under that concurrency. Plus the closed-loop maximum
    throughput, which is the other way to read "under 100 concurrent clients"."""
    import random

    latencies: list[float] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=agent.url, headers=agent.headers, limits=limits,
                                 timeout=30) as client:
        await client.get("/v1/workers")

        async def poller() -> None:
            await asyncio.sleep(random.uniform(0, interval_s))
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                (await client.get("/v1/workers")).raise_for_status()
                took = time.perf_counter() - t
                latencies.append(took * 1000)
                await asyncio.sleep(max(0.0, interval_s - took))

        await asyncio.gather(*(poller() for _ in range(clients)))

        done = 0

        async def hammer(until: float) -> None:
            nonlocal done
            while time.perf_counter() < until:
                (await client.get("/v1/workers")).raise_for_status()
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(hammer(start + 5) for _ in range(clients)))
        throughput = done / (time.perf_counter() - start)
    latencies.sort()
    return {"list_p50_ms": round(latencies[len(latencies) // 2], 2),
            "list_p99_ms": round(latencies[int(len(latencies) * 0.99)], 2),
            "list_samples": len(latencies), "list_clients": clients,
            "list_interval_s": interval_s,
            "list_closed_loop_req_per_s": round(throughput, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--poll-interval", type=float, default=1.0,
                   help="seconds between one client's requests (a dashboard uses 2)")
    p.add_argument("--poll-seconds", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    home = Path(tempfile.mkdtemp(prefix="rbee-bench-agent-"))
    agent = start_agent(home, **{"worker-threads": str(args.threads)})
    try:
        time.sleep(2.0)
        idle_rss = psutil.Process(agent.proc.pid).memory_info().rss / 2**20
        results: dict[str, Any] = {"agent_idle_rss_mb": round(idle_rss, 1)}
        results.update(proxy_vs_direct(agent, args.tokens, args.runs, args.threads))
        results.update(spawn_vs_raw(agent, args.runs, args.threads))
        worker = agent.spawn()  # something to list
        agent.wait_state(worker["id"], "idle")
        results.update(asyncio.run(list_latency(agent, args.clients, args.poll_seconds,
                                                args.poll_interval)))
    finally:
        agent.stop()
    results["load_average"] = [round(x, 2) for x in os.getloadavg()]
    print(f"proxy vs direct : {results['proxy_tok_s']} vs {results['direct_tok_s']} tok/s "
          f"(ratio {results['proxy_ratio']}), TTFT +{results['proxy_ttft_overhead_ms']} ms")
    print(f"spawn to ready  : {results['spawn_to_ready_s']} s vs raw load "
          f"{results['raw_load_s']} s (overhead {results['spawn_overhead_s']} s)")
    print(f"GET /v1/workers : p50 {results['list_p50_ms']} ms, p99 {results['list_p99_ms']} ms "
          f"with {args.clients} clients polling every {args.poll_interval:g} s; closed loop "
          f"{results['list_closed_loop_req_per_s']} req/s")
    print(f"agent idle RSS  : {results['agent_idle_rss_mb']} MB")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
