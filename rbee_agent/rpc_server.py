"""`python -m rbee_agent.rpc_server`: one llama.cpp RPC server, on loopback only (B200).

ggml-rpc has no authentication and no encryption, so the server binds 127.0.0.1 and nothing
else: the only way in is through the node's SSH (the operator's tunnel), never the network.
There is deliberately no `--host` option. The process dies with the agent that started it,
and llama.cpp serves until it is killed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

LOOPBACK = "127.0.0.1"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rbee_agent.rpc_server",
        description="Serve this node's CPU or one GPU to a split worker (llama.cpp RPC), "
                    "on 127.0.0.1 only.")
    p.add_argument("--port", required=True, type=int, help="TCP port on 127.0.0.1")
    p.add_argument("--device", default="cpu",
                   help="cpu, or cudaN for GPU N as llama.cpp numbers them")
    p.add_argument("--threads", default=1, type=int, help="CPU threads for a cpu device")
    p.add_argument("--cache-dir", default=None, type=Path,
                   help="tensor cache, so a reload does not resend the weights")
    p.add_argument("--parent-pid", default=None, type=int,
                   help="exit when this process dies (default: our parent)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.port < 65536 or args.threads < 1:
        print("rbee rpc server: error: --port must be in 1..65535 and --threads ≥ 1",
              file=sys.stderr, flush=True)
        return 1
    from rbee_agent.worker.lifecycle import die_with_parent

    die_with_parent(args.parent_pid if args.parent_pid is not None else os.getppid())
    from rbee_agent import rpc_native
    from rbee_agent.protocol import RbeeError

    if args.cache_dir is not None:
        args.cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        rpc_native.serve(f"{LOOPBACK}:{args.port}", args.cache_dir, args.threads, args.device)
    except RbeeError as err:
        print(f"rbee rpc server: error: {err.message}", file=sys.stderr, flush=True)
        return 1
    # llama.cpp returns only when it could not listen (it said why on stderr).
    print(f"rbee rpc server: error: could not serve on {LOOPBACK}:{args.port}",
          file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
