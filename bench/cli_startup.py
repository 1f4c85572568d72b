"""How fast `rbee --help` and `rbee nodes list` answer (B151; target: under 0.25 s each).

    .venv/bin/python bench/cli_startup.py [--runs 20] [--source DIR]

Each command runs `--runs` times in a fresh process (after 2 warm-ups), in a throwaway
config with localhost only: `nodes list` once with the local agent stopped and once with it
running (started by the bench, stopped at the end). Wall time is from spawn to exit; CPU is
the child's user + system time, which a loaded machine inflates less than wall time. The
baseline is `python -c pass`. `--source DIR` runs the rbee found in DIR instead (a checkout of
another commit: `git archive COMMIT | tar -x -C DIR`), to compare before and after.

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 0.25


def timed(cmd: list[str], env: dict[str, str], runs: int, cwd: Path) -> dict[str, float]:
    walls, cpus = [], []
    for i in range(runs + 2):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if i >= 2:
            walls.append(wall)
            cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return {"wall_s": round(statistics.median(walls), 3),
            "wall_min_s": round(min(walls), 3),
            "cpu_s": round(statistics.median(cpus), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--source", type=Path, default=None,
                        help="run the rbee in this folder (another commit's files)")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="rbee-startup-"))
    env = {**os.environ, "RBEE_CONFIG": str(home / "config.toml")}
    env.pop("RBEE_AGENT_API_KEY", None)
    # `python -m` looks in the working folder first: the source given, else the installed rbee
    cwd = args.source.resolve() if args.source is not None else home
    rbee = [sys.executable, "-m", "rbee_tui"]
    results = {
        "python -c pass": timed([sys.executable, "-c", "pass"], env, args.runs, cwd),
        "rbee --help": timed([*rbee, "--help"], env, args.runs, cwd),
        "rbee nodes list (agent stopped)": timed([*rbee, "nodes", "list"], env, args.runs,
                                                 cwd),
    }
    subprocess.run([*rbee, "nodes", "start", "localhost"], env=env, cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        results["rbee nodes list (agent up)"] = timed([*rbee, "nodes", "list"], env,
                                                      args.runs, cwd)
    finally:
        subprocess.run([*rbee, "nodes", "stop", "localhost"], env=env, cwd=cwd, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"{'median of ' + str(args.runs):36} {'wall s':>8} {'min s':>8} {'cpu s':>8}")
    for name, figures in results.items():
        print(f"{name:36} {figures['wall_s']:8.3f} {figures['wall_min_s']:8.3f} "
              f"{figures['cpu_s']:8.3f}")
    load = os.getloadavg()[0]
    print(json.dumps({"runs": args.runs, "load_1min": round(load, 2), "target_s": TARGET_S,
                      **{k: v for k, v in results.items()}}))


if __name__ == "__main__":
    main()
