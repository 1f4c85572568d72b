"""Command line of the worker process: parse, check the model file, serve until told to stop.

Bad input (a missing or non-GGUF model, an unavailable backend) ends the process before any
port is opened, with exit code 1 and one line on stderr naming the file and the problem.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from rbee_agent.loop import run as run_loop
from rbee_agent.protocol import BACKENDS, RbeeError
from rbee_agent.worker.engine import DEFAULT_PREFILL_CHUNK
from rbee_agent.worker.scheduler import Reuse

API_KEY_ENV = "RBEE_WORKER_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rbee_agent.worker",
        description="Serve one GGUF model over HTTP with llama.cpp (an rbee worker).",
    )
    p.add_argument("--worker-id", required=True, help="id the agent knows this worker by")
    p.add_argument("--model", required=True, type=Path, help="path of the .gguf file")
    p.add_argument("--port", required=True, type=int, help="TCP port to listen on")
    p.add_argument("--api-key", default=None,
                   help=f"bearer key clients must send (or set {API_KEY_ENV})")
    p.add_argument("--callback-url", default=None, help="agent URL to POST readiness to")
    p.add_argument("--backend", default="cpu", choices=BACKENDS)
    p.add_argument("--device", default=0, type=int, help="GPU index for cuda/metal")
    p.add_argument("--ctx-size", default=2048, type=int, help="context window in tokens")
    p.add_argument("--threads", default=None, type=int, help="llama.cpp threads")
    p.add_argument("--slots", default=1, type=int,
                   help="requests generated at once, in one batch (one KV cache each)")
    p.add_argument("--queue-depth", default=64, type=int,
                   help="requests that may wait for a slot; more are refused with 503")
    p.add_argument("--queue-timeout", default=300.0, type=float,
                   help="seconds a request may wait in the queue")
    p.add_argument("--gpu-layers", default=None, type=int,
                   help="layers to put on the GPU (-1 = all, 0 = none; default: all on a "
                   "GPU backend)")
    p.add_argument("--tensor-split", default=None, type=_tensor_split,
                   help="share of the model per visible GPU, e.g. 3,1 (llama.cpp's layer split)")
    p.add_argument("--rpc", default=None, type=_endpoints,
                   help="llama.cpp RPC servers host:port[,host:port] whose devices take "
                   "--gpu-layers layers, before this node's own (a split worker, B202)")
    p.add_argument("--prefill-chunk", default=DEFAULT_PREFILL_CHUNK, type=int,
                   help="prompt tokens read per step beside the running streams")
    p.add_argument("--prefix-reuse", default=None, choices=[r.value for r in Reuse],
                   help="cached prompt cells a new request may reuse: any prefix, or whole "
                   "prefill chunks only (default: any on cpu, chunks on a GPU)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--drain-timeout", default=30.0, type=float,
                   help="seconds an active request may take to finish on shutdown")
    p.add_argument("--max-request-bytes", default=4 * 1024 * 1024, type=int)
    p.add_argument("--parent-pid", default=None, type=int,
                   help="exit when this process dies (default: our parent)")
    return p


def _tensor_split(text: str) -> tuple[float, ...]:
    try:
        shares = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers (e.g. 3,1)") from None
    if any(not share >= 0 for share in shares) or not any(shares):
        raise argparse.ArgumentTypeError(f"{text!r}: shares must be ≥ 0 and not all 0")
    return shares


def _endpoints(text: str) -> tuple[str, ...]:
    parts = tuple(part.strip() for part in text.split(",") if part.strip())
    for part in parts:
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise argparse.ArgumentTypeError(f"{part!r} is not host:port")
    if not parts:
        raise argparse.ArgumentTypeError("give at least one host:port")
    return parts


def _check_numbers(args: argparse.Namespace) -> str | None:
    if args.slots < 1 or args.ctx_size < 16 or not 0 < args.port < 65536:
        return "--slots must be ≥ 1, --ctx-size ≥ 16 and --port in 1..65535"
    if args.queue_depth < 0 or args.queue_timeout <= 0:
        return "--queue-depth must be ≥ 0 and --queue-timeout > 0"
    if args.gpu_layers is not None and args.gpu_layers < -1:
        return "--gpu-layers must be -1 (all), 0 (none) or a layer count"
    if not 16 <= args.prefill_chunk <= 4096:
        return "--prefill-chunk must be in 16..4096"
    return None


def _fail(message: str) -> int:
    print(f"rbee worker: error: {message}", file=sys.stderr, flush=True)
    return 1


def _check_backend(backend: str, tensor_split: tuple[float, ...] | None) -> None:
    from rbee_agent.worker import native

    if tensor_split is not None and len(tensor_split) > native.max_devices():
        raise RbeeError(
            "INVALID_REQUEST",
            f"--tensor-split has {len(tensor_split)} shares; this llama.cpp handles at most "
            f"{native.max_devices()} devices",
        )
    if backend == "cpu":
        return  # a split worker's RPC devices are checked when they are added
    if not native.supports_gpu_offload():
        raise RbeeError(
            "BACKEND_UNAVAILABLE",
            f"Backend {backend} is not available: this llama-cpp-python was built without GPU "
            "offload",
            hint="Use --backend cpu, or reinstall llama-cpp-python with CMAKE_ARGS for your GPU.",
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    api_key = args.api_key or os.environ.get(API_KEY_ENV)
    if not api_key:
        return _fail(f"no API key: pass --api-key or set {API_KEY_ENV}")
    problem = _check_numbers(args)
    if problem:
        return _fail(problem)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s worker {args.worker_id}: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from rbee_agent.worker.lifecycle import die_with_parent

    die_with_parent(args.parent_pid if args.parent_pid is not None else os.getppid())

    from rbee_agent.worker.engine import Engine, EngineConfig
    from rbee_agent.worker.service import WorkerSettings

    model = args.model.expanduser().resolve()
    try:
        _check_backend(args.backend, args.tensor_split)
        engine = Engine(EngineConfig(
            model_path=model, backend=args.backend, device=args.device,
            ctx_size=args.ctx_size, threads=args.threads, slots=args.slots,
            gpu_layers=args.gpu_layers, tensor_split=args.tensor_split,
            prefill_chunk=args.prefill_chunk, rpc=args.rpc or (),
            prefix_reuse=Reuse(args.prefix_reuse) if args.prefix_reuse else None,
        ))
    except RbeeError as err:
        return _fail(err.message)
    settings = WorkerSettings(
        worker_id=args.worker_id, model_path=model, port=args.port, api_key=api_key,
        host=args.host, callback_url=args.callback_url, backend=args.backend,
        device=args.device, ctx_size=args.ctx_size, threads=args.threads, slots=args.slots,
        queue_depth=args.queue_depth, queue_timeout_s=args.queue_timeout,
        drain_timeout_s=args.drain_timeout, max_request_bytes=args.max_request_bytes,
    )
    return run_loop(serve(settings, engine))


async def serve(settings: object, engine: object) -> int:
    import uvicorn

    from rbee_agent.worker.app import create_app
    from rbee_agent.worker.lifecycle import drain_on_signals
    from rbee_agent.worker.service import WorkerService, WorkerSettings

    assert isinstance(settings, WorkerSettings)
    service = WorkerService(settings, engine)  # type: ignore[arg-type]
    app = create_app(service, on_startup=lambda: drain_on_signals(service.request_shutdown))
    server = uvicorn.Server(uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level="warning",
        access_log=False, timeout_graceful_shutdown=5, lifespan="on",
    ))

    async def stop_when_asked() -> None:
        await service.exit_requested.wait()
        server.should_exit = True

    stopper = asyncio.create_task(stop_when_asked())
    await server.serve()
    stopper.cancel()
    if not server.started:
        return 1  # could not bind; uvicorn has said why on stderr
    return service.exit_code
