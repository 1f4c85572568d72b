"""B109: a worker process loads llama.cpp before anything that loads numpy, and never gguf.

With a CUDA build of llama.cpp, a process that had loaded numpy first died with SIGSEGV while
loading a model (docs/architecture.md, "Import order in the worker"). This runs a real worker
under `python -X importtime`, which logs each module as its import completes, until the model
is loaded and a request has been served, so every import the worker makes is in the log.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from tests.support import REPO, WorkerProc, bundled_model_path, free_port


def imported_modules(stderr: str) -> list[str]:
    """Module names in the order their imports completed."""
    return [line.rsplit("|", 1)[1].strip() for line in stderr.splitlines()
            if line.startswith("import time:") and "|" in line
            and not line.rstrip().endswith("imported package")]


def test_b109_llama_cpp_is_loaded_before_numpy_and_gguf_never(tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "worker.log"
    args = [sys.executable, "-X", "importtime", "-m", "rbee_agent.worker", "--worker-id", "w",
            "--model", str(bundled_model_path()), "--port", str(port), "--api-key", "k"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    worker = WorkerProc(proc, port, "k", log_path, args)
    try:
        worker.wait_ready()
        r = httpx.post(f"{worker.url}/v1/inference", headers=worker.headers, timeout=60,
                       json={"messages": [{"role": "user", "content": "Hi"}],
                             "max_tokens": 2, "stream": False, "top_logprobs": 1})
        assert r.status_code == 200
    finally:
        worker.stop()
    modules = imported_modules(worker.log())
    assert "llama_cpp.llama_cpp" in modules and "rbee_agent.worker.engine" in modules
    numpy = [i for i, m in enumerate(modules) if m.split(".")[0] == "numpy"]
    assert numpy, "llama-cpp-python imports numpy; the log should show it"
    assert modules.index("llama_cpp.llama_cpp") < min(numpy), (
        "numpy was imported before llama.cpp: " + ", ".join(modules[: min(numpy) + 1][-15:]))
    assert not [m for m in modules if m.split(".")[0] == "gguf"]
