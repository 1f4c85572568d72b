"""Download benchmark (issue 4): rbee's model download vs curl, from the loopback test hub.

    .venv/bin/python bench/download.py [--runs 7]

The test hub (tests/hub_server.py, in its own process) serves the bundled GGUF model (98 MB)
with sendfile; both sides fetch the same resolve URL, follow the hub's 302 to its CDN path,
and write the file into the same folder on the same disk. Runs alternate A B C A B C …,
after one warm-up of each; medians are reported.

  A) rbee: `provision.fetch_file`, the agent's transfer path, in-process on uvloop as in the
     agent: stream to `.partial` through the writer thread (sha256 on the fly, fdatasync
     every 32 MB), check size and sha256, fsync, rename. Timed from the call to its return.
  B) curl: `curl -sSL -o FILE URL`; timed by curl's own `time_total` (process start-up not
     counted, which is the harder comparison for rbee); the wall time is reported too.
  D) curl, then `sha256sum` of the file (for information): the same work as A — rbee checks
     every byte against the hub's LFS sha256, which plain curl does not.
  C) the agent end to end (for information): `POST /v1/models/download` to a real agent on
     the hub, timed until the progress stream says `complete`; on top of A this includes the
     hub listing, the HEAD, the disk check, the catalog entry (GGUF header) and HTTP/SSE.

MB is MiB, as everywhere in rbee. Target: rbee_mb_s / curl_mb_s ≥ 0.9.
The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rbee_agent.hub import HubClient  # noqa: E402
from rbee_agent.loop import run as run_loop  # noqa: E402
from rbee_agent.provision import PlannedFile, fetch_file  # noqa: E402
from rbee_agent.settings import AgentSettings  # noqa: E402
from tests.agent_support import AgentProc, start_agent  # noqa: E402
from tests.hub_server import Blob  # noqa: E402
from tests.support import bundled_model_path  # noqa: E402

MB = 1024 * 1024
REPO_ID = "bench/SmolLM2-GGUF"
FILE = "SmolLM2-Q4_1.gguf"
TARGET = 0.9


class Hub:
    """The test hub in a process of its own, so it shares no interpreter with rbee."""

    def __init__(self, blob: Blob) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.hub_server", REPO_ID, f"{FILE}={blob.path}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        assert self.url.startswith("http://"), self.url

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


def rbee_once(hub: Hub, blob: Blob, folder: Path) -> float:
    settings = AgentSettings(api_key="bench", data_dir=folder / "data", log_dir=folder / "logs")
    dest = folder / FILE
    dest.unlink(missing_ok=True)

    async def fetch() -> float:
        client = HubClient.from_env(settings, {"HF_ENDPOINT": hub.url})
        planned = PlannedFile(path=FILE, url=client.file_url(REPO_ID, "main", FILE),
                              size=blob.size, sha256=blob.sha256, dest=dest)
        try:
            started = time.perf_counter()
            await fetch_file(client, planned, settings, lambda *_: None, lambda *_: None,
                             f"hf:{REPO_ID}")
            return time.perf_counter() - started
        finally:
            await client.aclose()

    took = run_loop(fetch())
    assert dest.stat().st_size == blob.size
    return took


def curl_once(hub: Hub, blob: Blob, folder: Path) -> tuple[float, float]:
    dest = folder / FILE
    dest.unlink(missing_ok=True)
    url = f"{hub.url}/{REPO_ID}/resolve/main/{FILE}"
    started = time.perf_counter()
    out = subprocess.run(["curl", "-sSL", "-o", str(dest), "-w", "%{time_total}", url],
                         check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    assert dest.stat().st_size == blob.size
    return float(out.stdout), wall


def sha256sum_once(blob: Blob, folder: Path) -> float:
    started = time.perf_counter()
    out = subprocess.run(["sha256sum", str(folder / FILE)], check=True, capture_output=True,
                         text=True)
    assert out.stdout.split()[0] == blob.sha256
    return time.perf_counter() - started


def agent_once(agent: AgentProc) -> float:
    ref = f"hf:{REPO_ID}/{FILE}"
    started = time.perf_counter()
    r = agent.post("/v1/models/download", json={"model_ref": ref})
    assert r.status_code == 202, r.text
    job = r.json()["job_id"]
    final: dict[str, Any] = {}
    with httpx.stream("GET", f"{agent.url}/v1/models/download/{job}/progress",
                      headers=agent.headers, timeout=60) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                final = json.loads(line[6:])
    took = time.perf_counter() - started
    assert final.get("stage") == "complete", final
    assert agent.delete(f"/v1/models/{final['model_id']}").status_code == 200
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    blob = Blob(bundled_model_path())
    size_mb = blob.size / MB
    hub = Hub(blob)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        agent = start_agent(folder / "agent", env={"HF_ENDPOINT": hub.url},
                            **{"download-reserve-mb": "0"})
        try:
            rbee_once(hub, blob, folder)  # warm-ups
            curl_once(hub, blob, folder)
            agent_once(agent)
            rbee_s, curl_s, curl_wall_s, verified_s, agent_s = [], [], [], [], []
            for _ in range(args.runs):
                rbee_s.append(rbee_once(hub, blob, folder))
                total, wall = curl_once(hub, blob, folder)
                curl_s.append(total)
                curl_wall_s.append(wall)
                verified_s.append(wall + sha256sum_once(blob, folder))
                agent_s.append(agent_once(agent))
        finally:
            agent.stop()
            hub.close()

    def rate(times: list[float]) -> float:
        return round(size_mb / statistics.median(times), 1)

    result = {
        "file_mb": round(size_mb, 1),
        "runs": args.runs,
        "rbee_mb_s": rate(rbee_s),
        "curl_mb_s": rate(curl_s),
        "ratio": round(rate(rbee_s) / rate(curl_s), 3),
        "curl_wall_mb_s": rate(curl_wall_s),
        "curl_then_sha256sum_mb_s": rate(verified_s),
        "ratio_vs_curl_then_sha256sum": round(rate(rbee_s) / rate(verified_s), 3),
        "agent_end_to_end_mb_s": rate(agent_s),
        "target_ratio": TARGET,
    }
    print(f"{'':<28}{'median s':>10}{'MB/s':>10}")
    for name, times in (("rbee fetch_file", rbee_s), ("curl (time_total)", curl_s),
                        ("curl (wall, with start-up)", curl_wall_s),
                        ("curl, then sha256sum", verified_s),
                        ("agent POST → complete", agent_s)):
        print(f"{name:<28}{statistics.median(times):>10.3f}{rate(times):>10.1f}")
    print(f"ratio rbee/curl: {result['ratio']:.3f} (target ≥ {TARGET}); "
          f"rbee/(curl, then sha256sum): {result['ratio_vs_curl_then_sha256sum']:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
