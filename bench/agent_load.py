"""The agent under inference load (issue 10, B125): does it stay responsive, and cheap to refuse?

    .venv/bin/python bench/agent_load.py [--clients 100 300] [--seconds 20] [--tokens 8]

A real agent with one 1-slot worker (the bundled model). For each client count, that many
streaming clients loop for `--seconds`: each sends an 8-token request; a 503 (QUEUE_FULL or
ALL_SLOTS_BUSY) is counted and the client waits the `Retry-After` it was given, as the
openai SDK and rbee's own client do. Meanwhile a separate process (so the clients' own event
loop does not colour the figures) asks the agent for `/v1/health`, `/v1/workers` and
`/v1/models` every 20 ms and records each latency.

Printed per client count: requests served, 503s, errors (anything else, transport errors
included), served request time p50, and health / list latency p50 and p99 — the target is
p99 ≤ 50 ms for health and lists whatever the load. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.agent_support import AgentProc, start_agent  # noqa: E402

PROBE = r"""
import json, sys, time, httpx
url, key, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
paths = ["/v1/health", "/v1/workers", "/v1/models"]
seen = {p: [] for p in paths}
errors = 0
with httpx.Client(base_url=url, headers={"Authorization": "Bearer " + key}, timeout=30) as c:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for p in paths:
            t = time.perf_counter()
            try:
                ok = c.get(p).status_code == 200
            except httpx.HTTPError:
                ok = False
            seen[p].append((time.perf_counter() - t) * 1000)
            errors += not ok
        time.sleep(0.02)
print(json.dumps({"latency_ms": seen, "errors": errors}))
"""


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


async def client(http: httpx.AsyncClient, url: str, tokens: int, until: float,
                 tally: dict[str, Any]) -> None:
    body = {"prompt": "Count: 1, 2, 3,", "max_tokens": tokens, "temperature": 0}
    while time.monotonic() < until:
        started = time.perf_counter()
        try:
            async with http.stream("POST", url, json=body) as r:
                if r.status_code == 503:
                    await r.aread()
                    tally["busy"] += 1
                    wait = float(r.headers.get("retry-after", "1"))
                    await asyncio.sleep(min(wait, max(0.0, until - time.monotonic())))
                    continue
                if r.status_code != 200:
                    await r.aread()
                    tally["errors"] += 1
                    tally["codes"][str(r.status_code)] = tally["codes"].get(
                        str(r.status_code), 0) + 1
                    continue
                done = False
                async for line in r.aiter_lines():
                    done = done or line.startswith('data: {"done"')
                if done:
                    tally["served"] += 1
                    tally["served_ms"].append((time.perf_counter() - started) * 1000)
                else:
                    tally["errors"] += 1
        except httpx.HTTPError as exc:
            tally["errors"] += 1
            name = type(exc).__name__
            tally["codes"][name] = tally["codes"].get(name, 0) + 1
            await asyncio.sleep(0.5)


async def drive(agent: AgentProc, worker_id: str, clients: int, seconds: float,
                tokens: int) -> dict[str, Any]:
    tally: dict[str, Any] = {"served": 0, "busy": 0, "errors": 0, "codes": {},
                             "served_ms": []}
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients)
    url = f"{agent.url}/v1/workers/{worker_id}/inference"
    until = time.monotonic() + seconds
    async with httpx.AsyncClient(headers=agent.headers, limits=limits, timeout=120) as http:
        await asyncio.gather(*(client(http, url, tokens, until, tally)
                               for _ in range(clients)))
    return tally


def load(agent: AgentProc, worker_id: str, clients: int, seconds: float,
         tokens: int) -> dict[str, Any]:
    probe = subprocess.Popen([sys.executable, "-c", PROBE, agent.url, agent.key, str(seconds)],
                             stdout=subprocess.PIPE, text=True)
    tally = asyncio.run(drive(agent, worker_id, clients, seconds, tokens))
    out, _ = probe.communicate(timeout=120)
    probed = json.loads(out)
    lat = probed["latency_ms"]
    lists = lat["/v1/workers"] + lat["/v1/models"]
    return {
        "clients": clients, "seconds": seconds, "served": tally["served"],
        "busy_503": tally["busy"], "errors": tally["errors"], "error_kinds": tally["codes"],
        "served_p50_ms": pct(tally["served_ms"], 0.5),
        "health_p50_ms": pct(lat["/v1/health"], 0.5),
        "health_p99_ms": pct(lat["/v1/health"], 0.99),
        "lists_p50_ms": pct(lists, 0.5), "lists_p99_ms": pct(lists, 0.99),
        "probe_requests": sum(len(v) for v in lat.values()), "probe_errors": probed["errors"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--queue-depth", type=int, default=8,
                        help="the worker's queue (used when the worker knows --queue-depth)")
    args = parser.parse_args()
    agent = start_agent(Path(tempfile.mkdtemp(prefix="rbee-load-")),
                        **{"worker-queue-depth": str(args.queue_depth)})
    try:
        worker = agent.spawn(slots=1)
        info = agent.wait_state(worker["id"], "idle")
        results = []
        for clients in args.clients:
            result = load(agent, worker["id"], clients, args.seconds, args.tokens)
            results.append(result)
            print(f"{clients:4d} clients, {args.seconds:g} s: served {result['served']}, "
                  f"503 {result['busy_503']}, errors {result['errors']} "
                  f"{result['error_kinds'] or ''}; served p50 {result['served_p50_ms']} ms; "
                  f"health p50/p99 {result['health_p50_ms']}/{result['health_p99_ms']} ms; "
                  f"lists p50/p99 {result['lists_p50_ms']}/{result['lists_p99_ms']} ms")
        final = agent.get(f"/v1/workers/{worker['id']}").json()
        print(json.dumps({"queue_depth": info.get("queue_depth"), "tokens": args.tokens,
                          "worker_tokens_served": final["tokens_served"],
                          "results": results}))
    finally:
        agent.stop()


if __name__ == "__main__":
    main()
