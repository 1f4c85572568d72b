"""Operator-side benchmarks (issue 5), whole commands as a user runs them.

    .venv/bin/python bench/rbee_cli.py [--runs 5]

1. warm `rbee infer --max-tokens 8`, wall time with process start — target ≤ 1.0 s;
2. cold start (no agent running) to the first token, minus the raw model load time of
   llama-cpp-python in a fresh process — target ≤ 2 s;
3. tokens/s through an SSH port forward vs direct loopback — target ratio ≥ 0.95 (needs
   OpenSSH's sshd; skipped with a reason otherwise).
The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.cli_support import RbeeEnv, make_env  # noqa: E402
from tests.support import bundled_model_path  # noqa: E402

RAW_LOAD = """
import time, sys
t = time.perf_counter()
from llama_cpp import Llama
Llama(model_path=sys.argv[1], n_ctx=2048, verbose=False)
print(time.perf_counter() - t)
"""


def rbee_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "rbee_tui", *args]


def warm_infer(env: RbeeEnv, runs: int) -> dict[str, Any]:
    args = rbee_cmd("infer", "--prompt", "Hello", "--max-tokens", "8", "--temperature", "0")
    subprocess.run(args, env=env.env, capture_output=True, check=True)  # warm the worker
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(args, env=env.env, capture_output=True, check=True)
        times.append(time.perf_counter() - started)
    return {"warm_infer_s": round(statistics.median(times), 3),
            "warm_infer_min_s": round(min(times), 3)}


def cold_first_token(env: RbeeEnv, runs: int) -> dict[str, Any]:
    firsts, raws = [], []
    for _ in range(runs):
        env.stop_local_agent()
        out = subprocess.run([sys.executable, "-c", RAW_LOAD, str(bundled_model_path())],
                             capture_output=True, text=True, check=True)
        raws.append(float(out.stdout.strip().splitlines()[-1]))
        started = time.perf_counter()
        proc = subprocess.Popen(rbee_cmd("infer", "--prompt", "Hello", "--max-tokens", "8"),
                                env=env.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdout is not None
        proc.stdout.read(1)
        firsts.append(time.perf_counter() - started)
        proc.wait()
    first, raw = statistics.median(firsts), statistics.median(raws)
    return {"cold_first_token_s": round(first, 3), "raw_load_s": round(raw, 3),
            "cold_overhead_s": round(first - raw, 3)}


def ssh_forward(runs: int) -> dict[str, Any]:
    try:
        from bench.ssh_forward import measure
    except ImportError as exc:
        return {"ssh_forward": f"skipped: {exc}"}
    result: dict[str, Any] = measure(runs)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    env = make_env(Path(tempfile.mkdtemp(prefix="rbee-bench-op-")))
    try:
        results: dict[str, Any] = {}
        results.update(warm_infer(env, args.runs))
        results.update(cold_first_token(env, args.runs))
    finally:
        env.stop_local_agent()
    results.update(ssh_forward(args.runs))
    results["load_average"] = [round(x, 2) for x in os.getloadavg()]
    print(f"warm rbee infer --max-tokens 8 : {results['warm_infer_s']} s (median)")
    print(f"cold start to first token      : {results['cold_first_token_s']} s; raw load "
          f"{results['raw_load_s']} s; overhead {results['cold_overhead_s']} s")
    if "ssh_ratio" in results:
        print(f"through SSH forward vs direct  : {results['ssh_tok_s']} vs "
              f"{results['direct_tok_s']} tok/s (ratio {results['ssh_ratio']})")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
