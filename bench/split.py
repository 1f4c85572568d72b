"""A split worker vs one node (issue 15): load time and tokens/s, RPC direct and through SSH.

    .venv/bin/python bench/split.py [--runs 3] [--tokens 128] [--peer-layers 15]

Three workers of the bundled model, one after the other, on this machine: a single-node
worker; a split worker whose last `--peer-layers` layers run on a llama.cpp RPC server
process reached directly on loopback; the same split with the RPC traffic through rbee's
SSH layer (a real OpenSSH sshd on loopback, a local forward, as `rbee workers spawn --split`
holds it). Each split worker is loaded twice: the second load finds the weights in the RPC
server's tensor cache. Greedy generation, the same prompt; the text must match the single
node's. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.ssh_support import fast_settings, make_key, start_sshd  # noqa: E402
from tests.support import WorkerProc, start_worker_process  # noqa: E402
from tests.test_rpc_worker import start_rpc_server, wait_listening  # noqa: E402

PROMPT = "Once upon a time"


def _generate(worker: WorkerProc, tokens: int) -> tuple[float, str]:
    started = time.perf_counter()
    r = httpx.post(f"{worker.url}/v1/inference", headers=worker.headers, timeout=600,
                   json={"prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
                         "stream": False, "ignore_eos": True})
    r.raise_for_status()
    body = r.json()
    return body["total_tokens"] / (time.perf_counter() - started), body["text"]


def _run(tmp: Path, runs: int, tokens: int, *extra: str) -> dict[str, Any]:
    loads, speeds, text = [], [], ""
    for _ in range(2):  # the second load of a split worker finds the RPC tensor cache warm
        started = time.perf_counter()
        worker = start_worker_process(tmp, *extra)
        try:
            worker.wait_ready(300)
            loads.append(time.perf_counter() - started)
            _generate(worker, 8)  # warm-up
            for _ in range(runs):
                speed, text = _generate(worker, tokens)
                speeds.append(speed)
        finally:
            worker.stop()
    return {"load_s": [round(x, 3) for x in loads],
            "tok_s": round(statistics.median(speeds), 2), "text": text}


async def _forward(node: Any, port: int) -> tuple[Any, int]:
    from rbee_tui.ssh import check_connection, connect

    async for _ in check_connection(node, fast_settings(), accept_new_host_key=True):
        pass
    conn_cm = connect(node, fast_settings())
    conn = await conn_cm.__aenter__()
    return conn_cm, await conn.forward("127.0.0.1", port)


def measure(runs: int, tokens: int, peer_layers: int) -> dict[str, Any]:
    from rbee_tui.config import Node

    home = Path(tempfile.mkdtemp(prefix="rbee-bench-split-"))
    os.environ["RBEE_CONFIG"] = str(home / "config.toml")
    result: dict[str, Any] = {"single": _run(home, runs, tokens)}
    proc, port, log = start_rpc_server(home)
    sshd = None
    loop = asyncio.new_event_loop()
    try:
        wait_listening(proc, log)
        split = ("--rpc", f"127.0.0.1:{port}", "--gpu-layers", str(peer_layers))
        result["split_direct"] = _run(home, runs, tokens, *split)
        key = make_key(home / "id_ed25519")
        sshd = start_sshd(home / "sshd", [key])
        node = Node(name="bench", ssh_host="127.0.0.1", ssh_port=sshd.port,
                    ssh_user=getpass.getuser(), ssh_key=str(key), install_path=str(home))
        conn_cm, forwarded = loop.run_until_complete(_forward(node, port))
        threading.Thread(target=loop.run_forever, daemon=True).start()
        tunnel = ("--rpc", f"127.0.0.1:{forwarded}", "--gpu-layers", str(peer_layers))
        result["split_ssh"] = _run(home, runs, tokens, *tunnel)
        asyncio.run_coroutine_threadsafe(conn_cm.__aexit__(None, None, None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
    finally:
        proc.kill()
        proc.wait(10)
        if sshd is not None:
            sshd.stop()
    single = result["single"]
    for name in ("split_direct", "split_ssh"):
        result[name]["same_text"] = result[name].pop("text") == single["text"]
    single.pop("text")
    result["split_vs_single"] = round(result["split_direct"]["tok_s"] / single["tok_s"], 3)
    result["ssh_vs_direct"] = round(result["split_ssh"]["tok_s"]
                                    / result["split_direct"]["tok_s"], 3)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--peer-layers", type=int, default=15)
    args = p.parse_args()
    result = measure(args.runs, args.tokens, args.peer_layers)
    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    for name in ("single", "split_direct", "split_ssh"):
        r = result[name]
        print(f"{name:13} load {r['load_s'][0]:.2f} s (again {r['load_s'][1]:.2f} s), "
              f"{r['tok_s']} tok/s" + ("" if name == "single" else
                                       f", same text: {r['same_text']}"))
    print(f"split/single {result['split_vs_single']}, ssh/direct {result['ssh_vs_direct']}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
