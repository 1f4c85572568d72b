"""Whether this node's llama.cpp can offload to a GPU (B132), asked in a child process.

The agent itself never imports `llama_cpp`: loading libllama (and, in a GPU build, the CUDA
runtime) would cost the daemon memory for an answer it needs once. The child imports
`llama_cpp` first and nothing else, as workers do (docs/architecture.md, "Import order in
the worker").
"""

from __future__ import annotations

import functools
import subprocess
import sys

_PROBE = "import llama_cpp; print(bool(llama_cpp.llama_supports_gpu_offload()))"


@functools.cache
def gpu_offload(timeout_s: float = 60.0) -> bool | None:
    """True/False from llama.cpp itself; None when it cannot be asked (not installed)."""
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    answer = done.stdout.strip().splitlines()[-1:] if done.returncode == 0 else []
    return {"True": True, "False": False}.get(answer[0]) if answer else None
