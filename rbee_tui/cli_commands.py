"""What each `rbee` subcommand does: call an operation (`rbee_tui/ops`, the orchestrator)
and print its events with the one CLI printer. No flow logic lives here (principle 1).

Loaded by `cli.main` only once the arguments parsed, so `rbee --help` never pays for it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rbee_agent.protocol import ChatMessage, ErrorCode, RbeeError, WorkerInfo
from rbee_tui.cli_output import (
    EventPrinter,
    ago,
    escape,
    print_error,
    print_json,
    print_table,
    say,
)
from rbee_tui.config import (
    DEFAULT_INSTALL_PATH,
    Config,
    Node,
    load_config,
    validate_node_name,
)
from rbee_tui.events import Event, Finished
from rbee_tui.links import NodeLinks
from rbee_tui.ops import nodes as node_ops

if TYPE_CHECKING:
    from rbee_tui.orchestrator import InferenceSpec

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def run_dashboard(args: argparse.Namespace) -> int:
    from rbee_tui.app import run_app

    try:
        return run_app(load_config(), ephemeral=args.ephemeral)
    except RbeeError as err:
        print_error(err)
        return EXIT_ERROR


def run(args: argparse.Namespace, usage_error: type[Exception]) -> int:
    """Run one subcommand; every way it can end becomes an exit code (B56)."""
    printer = EventPrinter(quiet_tokens=getattr(args, "json", False))
    try:
        return asyncio.run(dispatch(args, printer))
    except KeyboardInterrupt:
        printer.close()
        say("[yellow]canceled[/]")
        return EXIT_INTERRUPTED
    except usage_error as exc:
        say(f"[bold red]error:[/] {escape(str(exc))}")
        return EXIT_USAGE
    except RbeeError as err:
        if args.debug:
            traceback.print_exc()
        print_error(err)
        return EXIT_ERROR
    except Exception as exc:  # a bug, not a user's mistake: still one line unless --debug
        if args.debug:
            raise
        print_error(RbeeError(ErrorCode.INTERNAL_ERROR, f"Internal error: {exc!r}",
                              hint="Run again with --debug and report the traceback."))
        return EXIT_ERROR


Handler = Callable[[argparse.Namespace, Config, NodeLinks, EventPrinter], Awaitable[int]]


async def dispatch(args: argparse.Namespace, printer: EventPrinter) -> int:
    config = load_config()
    links = NodeLinks(config, report=printer)
    handler: Handler = globals()[f"cmd_{args.handler}"]
    try:
        return await handler(args, config, links, printer)
    finally:
        printer.close()
        await links.aclose()
        if args.ephemeral or config.settings.ephemeral:
            links.stop_started_local()


async def drive(flow: AsyncIterator[Event], printer: EventPrinter) -> Finished:
    """Print a flow's events as they come; its Finished (every flow ends with one)."""
    finished: Finished | None = None
    async for event in flow:
        printer(event)
        if isinstance(event, Finished):
            finished = event
    assert finished is not None, "a flow ended without its Finished event"
    return finished


# ------------------------------------------------------------------------ infer


async def cmd_infer(args: argparse.Namespace, config: Config, links: NodeLinks,
                    printer: EventPrinter) -> int:
    from rbee_tui.orchestrator import run_inference

    if args.split:  # B208: spawn a split worker, infer, end the split
        from rbee_tui.cli_split import cmd_infer_split

        return await cmd_infer_split(args, config, links, printer)
    spec = inference_spec(args, args.node)
    finished = await drive(run_inference(spec, config, links.open), printer)
    if args.json:
        print_json({"node": args.node, "model": args.model, **finished.data})
    return EXIT_OK


def inference_spec(args: argparse.Namespace, node: str) -> InferenceSpec:
    from rbee_tui.orchestrator import InferenceSpec

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    return InferenceSpec(
        node=node, model_ref=args.model, max_tokens=args.max_tokens,
        temperature=args.temperature, top_p=args.top_p, backend=args.backend,
        device=args.device, seed=args.seed, stop=args.stop,
        prompt=prompt if args.raw else None,
        messages=None if args.raw else [ChatMessage(role="user", content=prompt)],
        plain_fallback=None if args.raw else prompt,
    )


# ------------------------------------------------------------------------ nodes


def _host(node: Node) -> str:
    if node.is_local:
        return "local"
    if node.transport == "direct":
        return f"http://{node.agent_host}:{node.agent_port}"
    user = f"{node.ssh_user}@" if node.ssh_user else ""
    return f"{user}{node.ssh_host}:{node.ssh_port}"


def _apply_fields(node: Node, args: argparse.Namespace) -> Node:
    changes: dict[str, Any] = {}
    for field in ("ssh_host", "ssh_port", "ssh_user", "ssh_key", "install_path", "agent_port"):
        value = getattr(args, field, None)
        if value is not None:
            changes[field] = value
    if changes.get("ssh_key"):
        changes["ssh_key"] = str(Path(changes["ssh_key"]).expanduser())
    if getattr(args, "direct", False):
        changes["transport"] = "direct"
    return node.model_copy(update=changes)


async def cmd_nodes_list(args: argparse.Namespace, config: Config, links: NodeLinks,
                         printer: EventPrinter) -> int:
    found = await node_ops.statuses(config, links)
    if args.json:
        print_json([{**s.node.model_dump(exclude={"api_key"}), "status": s.state,
                     "reason": s.reason, "agent_version": s.agent_version,
                     "answered_at": s.answered_at, "last_connected":
                     s.answered_at or s.node.last_connected} for s in found])
        return EXIT_OK
    print_table(
        ["NAME", "HOST", "STATUS", "AGENT", "ANSWERED", "INSTALL PATH", "NOTE"],
        ([s.node.name, _host(s.node), s.state, s.agent_version or s.node.agent_version,
          ago(s.answered_at) if s.answered_at else f"last {ago(s.node.last_connected)}",
          "-" if s.node.is_local else s.node.install_path, s.reason or ""]
         for s in found),
        empty="no nodes",
    )
    return EXIT_OK


async def cmd_nodes_add(args: argparse.Namespace, config: Config, links: NodeLinks,
                        printer: EventPrinter) -> int:
    name = validate_node_name(args.name)
    node = _apply_fields(Node(name=name, install_path=DEFAULT_INSTALL_PATH), args)
    await drive(node_ops.add(config, node, accept_new_host_key=args.accept_new_host_key),
                printer)
    return EXIT_OK


async def cmd_nodes_edit(args: argparse.Namespace, config: Config, links: NodeLinks,
                         printer: EventPrinter) -> int:
    from rbee_tui.cli import UsageError

    node = config.node(args.name)
    if node.is_local:
        raise RbeeError(ErrorCode.INVALID_REQUEST, "localhost needs no SSH settings",
                        hint="Pin its agent port with [settings] local_agent_port.")
    updated = _apply_fields(node, args)
    if updated == node:
        raise UsageError("nothing to change: give at least one --option")
    await drive(node_ops.edit(config, updated, accept_new_host_key=args.accept_new_host_key),
                printer)
    return EXIT_OK


async def cmd_nodes_remove(args: argparse.Namespace, config: Config, links: NodeLinks,
                           printer: EventPrinter) -> int:
    from rbee_tui.cli import UsageError

    node = config.node(args.name)
    if not args.yes and not node.is_local:
        if not sys.stdin.isatty():
            raise UsageError(f"removing '{node.name}' needs --yes when not at a terminal")
        question = f"Remove node '{node.name}' ({_host(node)})? [y/N] "
        answer = await asyncio.to_thread(input, question)
        if answer.strip().lower() not in ("y", "yes"):
            say("kept")
            return EXIT_OK
    printer(Finished(await asyncio.to_thread(node_ops.remove, config, node.name)))
    return EXIT_OK


async def cmd_nodes_install(args: argparse.Namespace, config: Config, links: NodeLinks,
                            printer: EventPrinter) -> int:
    await drive(node_ops.install(config, config.node(args.name),
                                 accept_new_host_key=args.accept_new_host_key,
                                 backend=args.backend), printer)
    return EXIT_OK


async def _agent_flow(flow: AsyncIterator[Event], args: argparse.Namespace,
                      printer: EventPrinter) -> int:
    finished = await drive(flow, printer)
    if args.json:
        print_json(finished.data)
    return EXIT_OK


async def cmd_nodes_start(args: argparse.Namespace, config: Config, links: NodeLinks,
                          printer: EventPrinter) -> int:
    return await _agent_flow(node_ops.start_agent(config, config.node(args.name)), args,
                             printer)


async def cmd_nodes_stop(args: argparse.Namespace, config: Config, links: NodeLinks,
                         printer: EventPrinter) -> int:
    return await _agent_flow(node_ops.stop_agent(config, config.node(args.name)), args,
                             printer)


async def cmd_nodes_restart(args: argparse.Namespace, config: Config, links: NodeLinks,
                            printer: EventPrinter) -> int:
    return await _agent_flow(node_ops.restart_agent(config, config.node(args.name)), args,
                             printer)


async def cmd_nodes_check(args: argparse.Namespace, config: Config, links: NodeLinks,
                          printer: EventPrinter) -> int:
    flow = node_ops.check(config, links, config.node(args.name),
                          accept_new_host_key=args.accept_new_host_key)
    return await _agent_flow(flow, args, printer)


# ------------------------------------------------------------------------ workers


async def cmd_workers_list(args: argparse.Namespace, config: Config, links: NodeLinks,
                           printer: EventPrinter) -> int:
    from rbee_tui.ops import workers as worker_ops

    names = [config.node(args.node).name] if args.node else config.names()
    answers = await worker_ops.list_all(links, names, config.settings.status_timeout_s)
    if args.node and answers[0].reason is not None:
        raise RbeeError(ErrorCode.AGENT_UNREACHABLE, answers[0].reason,
                        hint=f"Start its agent with: rbee nodes start {args.node}")
    for answer in answers:
        if answer.reason is not None:
            printer.warn(f"{answer.node}: {answer.reason}")
    if args.json:
        print_json([{"node": a.node, **w.model_dump()} for a in answers for w in a.workers])
        return EXIT_OK
    print_table(["NODE", "ID", "MODEL", "BACKEND", "STATE", "SLOTS FREE", "QUEUED", "TOKENS",
                 "RSS MB", "VRAM MB", "GPU LAYERS", "URL"],
                ([a.node, w.id, w.model_id + _split_note(a.node, w), f"{w.backend}:{w.device}",
                  w.state,
                  f"{w.slots_available}/{w.slots_total}", w.queued, w.tokens_served, w.rss_mb,
                  w.vram_mb, worker_ops.layers_on_gpu(w), w.url]
                 for a in answers for w in a.workers),
                empty="no workers")
    return EXIT_OK


def _split_note(node: str, worker: WorkerInfo) -> str:
    """A split worker's layers per node (B204), after its model in a listing."""
    if not worker.split:
        return ""
    return " (split: " + ", ".join(f"{p.node or node} {p.layers}" for p in worker.split) + ")"


async def cmd_workers_spawn(args: argparse.Namespace, config: Config, links: NodeLinks,
                            printer: EventPrinter) -> int:
    from rbee_tui.cli import UsageError
    from rbee_tui.ops import workers as worker_ops

    if args.split:  # B208: a split worker, held in the foreground
        from rbee_tui.cli_split import cmd_spawn_split

        return await cmd_spawn_split(args, config, links, printer)
    try:
        gpu_layers = worker_ops.parse_gpu_layers(args.gpu_layers or "")
    except ValueError as exc:
        raise UsageError(f"--gpu-layers: {exc}") from None
    spec = worker_ops.SpawnSpec(node=args.node, model_ref=args.model, backend=args.backend,
                                device=args.device, new=args.new, ctx_size=args.ctx_size,
                                slots=args.slots, gpu_layers=gpu_layers)
    worker_ops.validate_spawn(spec, config)
    client = await links.open(args.node)
    async with client:
        finished = await drive(worker_ops.spawn(client, spec, config.settings), printer)
    if args.json:
        print_json(finished.data)
    return EXIT_OK


async def cmd_workers_stop(args: argparse.Namespace, config: Config, links: NodeLinks,
                           printer: EventPrinter) -> int:
    from rbee_tui.ops import workers as worker_ops

    client = await links.open(args.node)
    async with client:
        await drive(worker_ops.stop(client, args.id, config.settings), printer)
    return EXIT_OK


async def cmd_workers_health(args: argparse.Namespace, config: Config, links: NodeLinks,
                             printer: EventPrinter) -> int:
    client = await links.open(args.node)
    async with client:
        health = await client.check_version()
        workers = await client.workers()
    if args.json:
        print_json({"agent": health.model_dump(), "workers": [w.model_dump() for w in workers]})
        return EXIT_OK
    say(f"agent {health.version} on {args.node}: ok")
    print_table(["ID", "MODEL", "STATE", "SLOTS FREE", "QUEUED", "IDLE FOR", "TOKENS"],
                ([w.id, w.model_id, w.state, f"{w.slots_available}/{w.slots_total}", w.queued,
                  ago(w.last_activity), w.tokens_served] for w in workers),
                empty="no workers")
    return EXIT_OK


# ------------------------------------------------------------------------ models, logs


async def cmd_models_list(args: argparse.Namespace, config: Config, links: NodeLinks,
                          printer: EventPrinter) -> int:
    client = await links.open(args.node)
    async with client:
        models = (await client.models()).models
    if args.json:
        print_json([m.model_dump() for m in models])
        return EXIT_OK
    print_table(["ID", "PROVIDER", "SIZE MB", "QUANT", "ARCH", "LAYERS", "CONTEXT"],
                ([m.id, m.provider, m.size_bytes // 1024 // 1024, m.quantization,
                  m.architecture, m.layers, m.context_length] for m in models),
                empty="no models")
    return EXIT_OK


async def cmd_models_download(args: argparse.Namespace, config: Config, links: NodeLinks,
                              printer: EventPrinter) -> int:
    from rbee_agent.model_refs import parse_model_ref
    from rbee_tui.ops import models as model_ops

    config.node(args.node)
    parse_model_ref(args.model)
    client = await links.open(args.node)
    async with client:
        finished = await drive(model_ops.download(client, args.model), printer)
    if args.json:
        print_json(finished.data)
    return EXIT_OK


async def cmd_models_remove(args: argparse.Namespace, config: Config, links: NodeLinks,
                            printer: EventPrinter) -> int:
    from rbee_tui.ops import models as model_ops

    client = await links.open(args.node)
    async with client:
        printer(Finished(await model_ops.remove(client, args.model)))
    return EXIT_OK


async def cmd_logs(args: argparse.Namespace, config: Config, links: NodeLinks,
                   printer: EventPrinter) -> int:
    from rbee_tui.cli import UsageError

    if args.lines < 0:
        raise UsageError("--lines must be 0 or more")
    client = await links.open(args.node)
    async with client:
        if not args.follow:
            for line in (await client.logs(args.worker, args.lines)).lines:
                sys.stdout.write(line + "\n")
            return EXIT_OK
        async for entry in client.follow_logs(args.worker, args.lines):
            sys.stdout.write(entry.line + "\n")
            sys.stdout.flush()
    return EXIT_OK


async def cmd_serve(args: argparse.Namespace, config: Config, links: NodeLinks,
                    printer: EventPrinter) -> int:
    from rbee_gateway.serve import serve

    return await serve(args, config, links)
