"""`python -m rbee_agent.worker`: serve one GGUF model over HTTP (B40).

llama.cpp is loaded first, before anything that could load numpy: with a CUDA build, a
process that loaded numpy's C++ runtime first crashed while loading a model
(docs/architecture.md, "Import order in the worker"; tests/test_worker_import_order.py).
"""

try:
    import llama_cpp.llama_cpp  # noqa: F401  (first, on purpose)
except ImportError as exc:  # pragma: no cover - a node without llama-cpp-python
    raise SystemExit(f"rbee worker: error: llama-cpp-python is not installed: {exc}") from None

from rbee_agent.worker.main import main

raise SystemExit(main())
