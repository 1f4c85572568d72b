"""Tokens/s through an SSH local port forward vs direct loopback (issue 5, B10).

    .venv/bin/python bench/ssh_forward.py [--runs 5] [--tokens 128]

A real OpenSSH sshd on loopback, a real agent with the bundled model, rbee's own SSH layer
forwarding a local port to it; the same greedy generation alternated between the forward and
the agent's own port. Used by bench/rbee_cli.py too. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.agent import stream_once  # noqa: E402
from tests.agent_support import start_agent  # noqa: E402
from tests.ssh_support import fast_settings, make_key, start_sshd  # noqa: E402


async def _forwarded_port(node: Any, settings: Any, agent_port: int) -> tuple[Any, int]:
    from rbee_tui.ssh import check_connection, connect

    async for _ in check_connection(node, settings, accept_new_host_key=True):
        pass
    conn_cm = connect(node, settings)
    conn = await conn_cm.__aenter__()
    return conn_cm, await conn.forward("127.0.0.1", agent_port)


def measure(runs: int, tokens: int = 128) -> dict[str, Any]:
    if shutil.which("sshd") is None and not Path("/usr/sbin/sshd").exists():
        return {"ssh_forward": "skipped: OpenSSH sshd is not installed"}
    from rbee_tui.config import Node

    home = Path(tempfile.mkdtemp(prefix="rbee-bench-ssh-"))
    os.environ["RBEE_CONFIG"] = str(home / "config.toml")
    key = make_key(home / "id_ed25519")
    sshd = start_sshd(home / "sshd", [key])
    agent = start_agent(home / "agent", **{"worker-threads": "2"})
    loop = asyncio.new_event_loop()
    try:
        worker = agent.spawn()
        agent.wait_state(worker["id"], "idle")
        node = Node(name="bench", ssh_host="127.0.0.1", ssh_port=sshd.port,
                    ssh_user=getpass.getuser(), ssh_key=str(key), install_path=str(home))
        conn_cm, port = loop.run_until_complete(
            _forwarded_port(node, fast_settings(), agent.port))
        # The forward lives on this loop: run it in a thread while we stream synchronously.
        import threading

        threading.Thread(target=loop.run_forever, daemon=True).start()
        path = f"/v1/workers/{worker['id']}/inference"
        direct = f"{agent.url}{path}"
        forwarded = f"http://127.0.0.1:{port}{path}"
        stream_once(direct, agent.headers, 16)
        stream_once(forwarded, agent.headers, 16)
        d_tps, f_tps, d_ttft, f_ttft = [], [], [], []
        for _ in range(runs):
            t, s = stream_once(direct, agent.headers, tokens)
            d_ttft.append(t)
            d_tps.append(s)
            t, s = stream_once(forwarded, agent.headers, tokens)
            f_ttft.append(t)
            f_tps.append(s)
        asyncio.run_coroutine_threadsafe(conn_cm.__aexit__(None, None, None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
    finally:
        agent.stop()
        sshd.stop()
    med = statistics.median
    return {"ssh_tok_s": round(med(f_tps), 2), "direct_tok_s": round(med(d_tps), 2),
            "ssh_ratio": round(med(f_tps) / med(d_tps), 4),
            "ssh_ttft_ms": round(med(f_ttft), 2), "direct_ttft_ms": round(med(d_ttft), 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--tokens", type=int, default=128)
    args = p.parse_args()
    result = measure(args.runs, args.tokens)
    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    if "ssh_ratio" in result:
        print(f"through SSH forward: {result['ssh_tok_s']} tok/s; direct {result['direct_tok_s']}"
              f" tok/s; ratio {result['ssh_ratio']}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
