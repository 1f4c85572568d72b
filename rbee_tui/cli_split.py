"""`rbee workers spawn --split` and `rbee infer --split` (B208): a model split over nodes.

Both hold the split's SSH tunnels in this process (docs/architecture.md, "Split models"):
`spawn` stays in the foreground until Ctrl-C or until the split breaks, `infer` ends the
split once its reply is done. Either way everything the split started is stopped on every
node before the command returns.
"""

from __future__ import annotations

import argparse

from rbee_agent.protocol import RbeeError, WorkerInfo
from rbee_tui.cli_commands import EXIT_OK, drive, inference_spec
from rbee_tui.cli_output import EventPrinter, print_json
from rbee_tui.config import Config
from rbee_tui.defaults import LOCALHOST
from rbee_tui.events import Finished
from rbee_tui.links import NodeLinks
from rbee_tui.ops.split import SplitSpec, SplitWorker, parse_nodes


def split_spec(args: argparse.Namespace) -> SplitSpec:
    from rbee_tui.cli import UsageError

    try:
        nodes = parse_nodes(args.split)
    except ValueError as exc:
        raise UsageError(f"--split: {exc}") from None
    if args.node not in (None, LOCALHOST, nodes[0]):
        raise UsageError("--split names the nodes (the head first); leave --node out")
    layers = getattr(args, "gpu_layers", None)
    if layers is not None and not str(layers).isdigit():
        raise UsageError("with --split, --gpu-layers is the number of layers on the other "
                         "nodes (default: in proportion to each node's free memory)")
    if getattr(args, "backend", "cpu") != "cpu":
        raise UsageError("with --split the head runs on the CPU in this version; the other "
                         "nodes serve --rpc-device")
    return SplitSpec(nodes, args.model, ctx_size=getattr(args, "ctx_size", None),
                     slots=getattr(args, "slots", None),
                     peer_layers=int(layers) if layers is not None else None,
                     device=args.rpc_device)


async def _start(split: SplitWorker, printer: EventPrinter) -> WorkerInfo:
    async for event in split.start():
        if not isinstance(event, WorkerInfo):
            printer(event)
    assert split.worker is not None
    return split.worker


async def cmd_spawn_split(args: argparse.Namespace, config: Config, links: NodeLinks,
                          printer: EventPrinter) -> int:
    split = SplitWorker(split_spec(args), config, links)
    try:
        worker = await _start(split, printer)
        printer(Finished(f"split {split.describe()} is {worker.state} at {worker.url}. This "
                         "command holds its SSH tunnels: Ctrl-C stops the split worker and "
                         "its RPC servers", worker.model_dump()))
        if args.json:
            print_json(worker.model_dump())
        failure = await split.watch()
        if failure is not None:
            raise failure
    finally:
        await split.close()
    printer(Finished(f"split worker {worker.id} was stopped on {split.spec.head}; its RPC "
                     "servers are stopped too"))
    return EXIT_OK


async def cmd_infer_split(args: argparse.Namespace, config: Config, links: NodeLinks,
                          printer: EventPrinter) -> int:
    from rbee_tui.orchestrator import stream_on, validate

    spec = split_spec(args)
    inference = inference_spec(args, spec.head)
    validate(inference, config)
    split = SplitWorker(spec, config, links)
    try:
        worker = await _start(split, printer)
        assert split.head is not None
        try:
            finished = await drive(stream_on(split.head, worker, inference, config.settings),
                                   printer)
        except RbeeError as err:
            raise await split.explain(err) from None
    finally:
        await split.close()
    if args.json:
        print_json({"nodes": list(spec.nodes), "model": args.model, **finished.data})
    return EXIT_OK
