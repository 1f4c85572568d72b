"""`rbee` subcommands for scripts (B56, B60, B61): parse arguments, run a flow, print it.

Exit codes: 0 ok, 1 error, 2 usage, 130 interrupted. A user's mistake prints one message
and a hint, never a traceback (`--debug` shows it). `--json` on every listing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

from rich.markup import escape

from rbee_agent.model_refs import parse_model_ref
from rbee_agent.protocol import ChatMessage, ErrorCode, RbeeError
from rbee_gateway import serve as gateway
from rbee_tui import local_agent
from rbee_tui.cli_output import (
    EventPrinter,
    ago,
    err_console,
    print_error,
    print_json,
    print_table,
)
from rbee_tui.config import (
    DEFAULT_INSTALL_PATH,
    LOCALHOST,
    Config,
    Node,
    load_config,
    save_config,
    validate_node_name,
)
from rbee_tui.events import Event, Finished
from rbee_tui.links import NodeLinks
from rbee_tui.orchestrator import InferenceSpec, run_inference

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEFAULT_MODEL = "smollm2-135m"


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so main() owns every exit code."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


# ------------------------------------------------------------------------ parser


def build_parser() -> Parser:
    p = Parser(prog="rbee", description="Run local LLMs on every GPU machine you own.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--ephemeral", action="store_true",
                   help="stop the local agent on exit if this run started it")
    sub = p.add_subparsers(dest="command", parser_class=Parser)

    infer = sub.add_parser("infer", help="run one prompt on a node")
    infer.add_argument("--node", default=LOCALHOST)
    infer.add_argument("--model", default=DEFAULT_MODEL, help="model reference (B36)")
    infer.add_argument("--prompt", required=True, help="the prompt ('-' reads stdin)")
    infer.add_argument("--chat", action="store_true",
                       help="send the prompt as a chat message (the model's template applies)")
    infer.add_argument("--max-tokens", type=int, default=100)
    infer.add_argument("--temperature", type=float, default=0.7)
    infer.add_argument("--top-p", type=float, default=0.95)
    infer.add_argument("--backend", default="cpu")
    infer.add_argument("--device", type=int, default=0)
    infer.add_argument("--seed", type=int, default=None)
    infer.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    infer.add_argument("--json", action="store_true", help="print one JSON object")

    nodes = sub.add_parser("nodes", help="the node registry").add_subparsers(
        dest="action", required=True, parser_class=Parser)
    add = nodes.add_parser("add", help="add a node (tests SSH first)")
    add.add_argument("--name", required=True)
    _node_fields(add, required_host=True)
    add.add_argument("--accept-new-host-key", action="store_true")
    nodes.add_parser("list", help="list nodes").add_argument("--json", action="store_true")
    edit = nodes.add_parser("edit", help="change a node")
    edit.add_argument("name")
    _node_fields(edit, required_host=False)
    edit.add_argument("--accept-new-host-key", action="store_true")
    remove = nodes.add_parser("remove", help="remove a node")
    remove.add_argument("name")
    remove.add_argument("--yes", action="store_true", help="do not ask")
    for action, text in (("install", "install or upgrade the agent over SSH"),
                         ("start", "start the agent"), ("stop", "stop the agent"),
                         ("restart", "restart the agent"),
                         ("check", "test SSH and the agent")):
        cmd = nodes.add_parser(action, help=text)
        cmd.add_argument("name")
        cmd.add_argument("--accept-new-host-key", action="store_true")
        cmd.add_argument("--json", action="store_true")

    workers = sub.add_parser("workers", help="workers on a node").add_subparsers(
        dest="action", required=True, parser_class=Parser)
    wl = workers.add_parser("list")
    wl.add_argument("--node", default=None, help="one node (default: every node)")
    wl.add_argument("--json", action="store_true")
    ws = workers.add_parser("spawn")
    ws.add_argument("--node", default=LOCALHOST)
    ws.add_argument("--model", required=True)
    ws.add_argument("--backend", default="cpu")
    ws.add_argument("--device", type=int, default=0)
    ws.add_argument("--json", action="store_true")
    wst = workers.add_parser("stop")
    wst.add_argument("--node", default=LOCALHOST)
    wst.add_argument("--id", required=True)
    wh = workers.add_parser("health")
    wh.add_argument("--node", default=LOCALHOST)
    wh.add_argument("--json", action="store_true")

    models = sub.add_parser("models", help="the model catalog of a node").add_subparsers(
        dest="action", required=True, parser_class=Parser)
    ml = models.add_parser("list")
    ml.add_argument("--node", default=LOCALHOST)
    ml.add_argument("--json", action="store_true")
    md = models.add_parser("download")
    md.add_argument("--node", default=LOCALHOST)
    md.add_argument("--model", required=True, help="hf:org/repo[/file.gguf][@revision]")
    md.add_argument("--json", action="store_true")
    mr = models.add_parser("rm")
    mr.add_argument("--node", default=LOCALHOST)
    mr.add_argument("--model", required=True, help="catalog id")

    logs = sub.add_parser("logs", help="agent or worker logs of a node")
    logs.add_argument("--node", default=LOCALHOST)
    logs.add_argument("--worker", default=None)
    logs.add_argument("--follow", "-f", action="store_true")
    logs.add_argument("--lines", "-n", type=int, default=100)

    gateway.add_parser(sub)
    return p


def _node_fields(p: argparse.ArgumentParser, required_host: bool) -> None:
    p.add_argument("--ssh-host", required=required_host)
    p.add_argument("--ssh-port", type=int, default=None)
    p.add_argument("--ssh-user", default=None)
    p.add_argument("--ssh-key", default=None, help="private key file (default: agent/keys)")
    p.add_argument("--install-path", default=None)
    p.add_argument("--agent-port", type=int, default=None)
    p.add_argument("--direct", action="store_true",
                   help="reach the agent over direct HTTP instead of an SSH forward")


# ------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except UsageError as exc:
        err_console.print(escape(parser.format_usage().rstrip()))
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}")
        return EXIT_USAGE
    try:
        if args.command is None:
            from rbee_tui.app import run_app

            return run_app(load_config(), ephemeral=args.ephemeral)
        return asyncio.run(dispatch(args))
    except KeyboardInterrupt:
        err_console.print("[yellow]canceled[/]")
        return EXIT_INTERRUPTED
    except UsageError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}")
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


async def dispatch(args: argparse.Namespace) -> int:
    config = load_config()
    links = NodeLinks(config)
    try:
        handler = HANDLERS[(args.command, getattr(args, "action", None))]
        return await handler(args, config, links)
    finally:
        await links.aclose()
        if args.ephemeral or config.settings.ephemeral:
            links.stop_started_local()


async def drive(flow: AsyncIterator[Event], printer: EventPrinter) -> Finished | None:
    try:
        async for event in flow:
            printer(event)
    finally:
        printer.close()
    return printer.finished


# ------------------------------------------------------------------------ infer


async def cmd_infer(args: argparse.Namespace, config: Config, links: NodeLinks) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    spec = InferenceSpec(
        node=args.node, model_ref=args.model, max_tokens=args.max_tokens,
        temperature=args.temperature, top_p=args.top_p, backend=args.backend,
        device=args.device, seed=args.seed, stop=args.stop,
        prompt=None if args.chat else prompt,
        messages=[ChatMessage(role="user", content=prompt)] if args.chat else None,
    )
    printer = EventPrinter(quiet_tokens=args.json)
    finished = await drive(run_inference(spec, config, links.open), printer)
    if args.json and finished is not None:
        print_json({"node": args.node, "model": args.model, **finished.data})
    return EXIT_OK


# ------------------------------------------------------------------------ nodes


async def cmd_nodes_list(args: argparse.Namespace, config: Config, links: NodeLinks) -> int:
    nodes = config.all_nodes()
    if args.json:
        print_json([n.model_dump(exclude={"api_key"}) for n in nodes])
        return EXIT_OK
    print_table(
        ["NAME", "HOST", "STATUS", "AGENT", "LAST CONNECTED", "INSTALL PATH"],
        ([n.name, _host(n), n.status, n.agent_version, ago(n.last_connected),
          "-" if n.is_local else n.install_path] for n in nodes),
        empty="no nodes",
    )
    return EXIT_OK


def _host(node: Node) -> str:
    if node.is_local:
        return "local"
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


async def cmd_nodes_add(args: argparse.Namespace, config: Config, links: NodeLinks) -> int:
    name = validate_node_name(args.name)
    if name == LOCALHOST or name in config.nodes:
        raise RbeeError(
            ErrorCode.NODE_EXISTS,
            f"A node named '{name}' is already in the registry",
            hint=f"Change it with 'rbee nodes edit {name} …' or remove it with "
            f"'rbee nodes remove {name}'.",
        )
    node = _apply_fields(Node(name=name, install_path=DEFAULT_INSTALL_PATH), args)
    node = await _check_and_stamp(node, config, args.accept_new_host_key)
    config.nodes[name] = node
    path = save_config(config)
    err_console.print(f"[green]✓[/] node '{name}' saved to {path}")
    return EXIT_OK


async def _check_and_stamp(node: Node, config: Config, accept: bool) -> Node:
    """B01: only a node that answered is saved, with its status and last-connected time."""
    from rbee_tui import ssh

    finished = await drive(
        ssh.check_connection(node, config.settings, accept_new_host_key=accept), EventPrinter()
    )
    data = finished.data if finished else {}
    return node.model_copy(update={
        "status": "agent up" if data.get("agent_version") else "reachable",
        "agent_version": data.get("agent_version") or node.agent_version,
        "last_connected": time.time(),
    })


async def cmd_nodes_edit(args: argparse.Namespace, config: Config, links: NodeLinks) -> int:
    node = config.node(args.name)
    if node.is_local:
        raise RbeeError(ErrorCode.INVALID_REQUEST, "localhost needs no SSH settings",
                        hint="Change its agent port with [settings] local_agent_port.")
    updated = _apply_fields(node, args)
    if updated == node:
        raise UsageError("nothing to change: give at least one --option")
    reachable = {"ssh_host", "ssh_port", "ssh_user", "ssh_key"}
    if any(getattr(updated, f) != getattr(node, f) for f in reachable):
        updated = await _check_and_stamp(updated, config, args.accept_new_host_key)
    config.nodes[node.name] = updated
    save_config(config)
    err_console.print(f"[green]✓[/] node '{node.name}' updated")
    return EXIT_OK


async def cmd_nodes_remove(args: argparse.Namespace, config: Config, links: NodeLinks) -> int:
    node = config.node(args.name)
    if node.is_local:
        raise RbeeError(ErrorCode.INVALID_REQUEST, "localhost is always a node; it cannot be "
                        "removed", hint="Stop its agent with: rbee nodes stop localhost")
    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError(f"removing '{node.name}' needs --yes when not at a terminal")
        question = f"Remove node '{node.name}' ({_host(node)})? [y/N] "
        answer = await asyncio.to_thread(input, question)
        if answer.strip().lower() not in ("y", "yes"):
            err_console.print("kept")
            return EXIT_OK
    del config.nodes[node.name]
    save_config(config)
    err_console.print(f"[green]✓[/] node '{node.name}' removed (its agent keeps running; "
                      f"stop it first with 'rbee nodes stop {node.name}' if you want)")
    return EXIT_OK


async def cmd_nodes_install(args: argparse.Namespace, config: Config, links: NodeLinks) -> int:
    from rbee_tui import ssh

    node = config.node(args.name)
    if node.is_local:
        raise RbeeError(ErrorCode.INVALID_REQUEST,
                        "localhost runs the agent from this installation; nothing to install",
                        hint="Start it with: rbee nodes start localhost")
    finished = await drive(ssh.install_agent(node, config.settings, api_key=node.api_key,
                                             accept_new_host_key=args.accept_new_host_key),
                           EventPrinter())
    data = finished.data if finished else {}
    config.nodes[node.name] = node.model_copy(update={
        "api_key": data.get("api_key", node.api_key), "status": "agent up",
        "agent_version": data.get("agent_version"), "last_connected": time.time(),
    })
    save_config(config)
    return EXIT_OK


async def cmd_nodes_start(args: argparse.Namespace, config: Config, links: NodeLinks) -> int:
    node = config.node(args.name)
    if node.is_local:
        agent = await local_agent.find_or_start_async(config.settings)
        state = "started" if agent.started_here else "already running"
        err_console.print(f"[green]✓[/] local agent {state} at {agent.url}")
        return EXIT_OK
    from rbee_tui import ssh

    await drive(ssh.start_agent(node, config.settings), EventPrinter())
    return EXIT_OK


async def cmd_nodes_stop(args: argparse.Namespace, config: Config, links: NodeLinks) -> int:
    node = config.node(args.name)
    if node.is_local:
        pid = await asyncio.to_thread(local_agent.stop_recorded)
        err_console.print(f"[green]✓[/] local agent (pid {pid}) stopped")
        return EXIT_OK
    from rbee_tui import ssh

    await drive(ssh.stop_agent(node, config.settings), EventPrinter())
    return EXIT_OK


async def cmd_nodes_restart(args: argparse.Namespace, config: Config, links: NodeLinks) -> int:
    node = config.node(args.name)
    if node.is_local:
        if local_agent.recorded_pid() is not None:
            await asyncio.to_thread(local_agent.stop_recorded)
        return await cmd_nodes_start(args, config, links)
    from rbee_tui import ssh

    await drive(ssh.restart_agent(node, config.settings), EventPrinter())
    return EXIT_OK


async def cmd_nodes_check(args: argparse.Namespace, config: Config, links: NodeLinks) -> int:
    node = config.node(args.name)
    result: dict[str, Any] = {"node": node.name}
    if not node.is_local and node.transport == "ssh":
        node = await _check_and_stamp(node, config, args.accept_new_host_key)
    client = await links.open(node.name)
    async with client:
        health = await client.check_version()
        info = await client.node_info()
    result.update(agent_version=health.version, hostname=info.hostname,
                  ram_available_mb=info.ram_available_mb, gpus=len(info.gpus),
                  backends=info.backends)
    if not node.is_local:
        config.nodes[node.name] = node.model_copy(update={
            "status": "agent up", "agent_version": health.version,
            "last_connected": time.time()})
        save_config(config)
    if args.json:
        print_json(result)
    else:
        err_console.print(f"[green]✓[/] {node.name}: agent {health.version} on "
                          f"{info.hostname}, {info.ram_available_mb} MB RAM free, "
                          f"backends {', '.join(info.backends)}, {len(info.gpus)} GPU(s)")
    return EXIT_OK


# ------------------------------------------------------------------------ workers


async def cmd_workers_list(args: argparse.Namespace, config: Config, links: NodeLinks) -> int:
    names = [config.node(args.node).name] if args.node else config.names()
    rows: list[dict[str, Any]] = []
    for name in names:
        try:
            client = await links.open(name)
        except RbeeError as err:
            if args.node:
                raise
            err_console.print(f"[yellow]![/] {name}: {escape(err.message)}")
            continue
        async with client:
            rows += [{"node": name, **w.model_dump()} for w in await client.workers()]
    if args.json:
        print_json(rows)
        return EXIT_OK
    print_table(["NODE", "ID", "MODEL", "BACKEND", "STATE", "SLOTS", "TOKENS", "RSS MB", "URL"],
                ([r["node"], r["id"], r["model_id"], f"{r['backend']}:{r['device']}",
                  r["state"], f"{r['slots_available']}/{r['slots_total']}",
                  r["tokens_served"], r["rss_mb"], r["url"]] for r in rows),
                empty="no workers")
    return EXIT_OK


async def cmd_workers_spawn(args: argparse.Namespace, config: Config, links: NodeLinks) -> int:
    spec = InferenceSpec(node=args.node, model_ref=args.model, backend=args.backend,
                         device=args.device, prompt="-")
    from rbee_tui.orchestrator import spawn_flow, validate

    validate(spec, config)
    client = await links.open(args.node)
    async with client:
        finished = await drive(spawn_flow(client, spec, config.settings), EventPrinter())
    if args.json and finished is not None:
        print_json(finished.data)
    return EXIT_OK


async def cmd_workers_stop(args: argparse.Namespace, config: Config, links: NodeLinks) -> int:
    client = await links.open(args.node)
    async with client:
        info = await client.stop_worker(args.id)
    err_console.print(f"[green]✓[/] worker {info.id} ({info.model_id}) stopped")
    return EXIT_OK


async def cmd_workers_health(args: argparse.Namespace, config: Config, links: NodeLinks) -> int:
    client = await links.open(args.node)
    async with client:
        health = await client.check_version()
        workers = await client.workers()
    if args.json:
        print_json({"agent": health.model_dump(), "workers": [w.model_dump() for w in workers]})
        return EXIT_OK
    err_console.print(f"agent {health.version} on {args.node}: ok")
    print_table(["ID", "MODEL", "STATE", "SLOTS FREE", "IDLE FOR", "TOKENS"],
                ([w.id, w.model_id, w.state, f"{w.slots_available}/{w.slots_total}",
                  ago(w.last_activity), w.tokens_served] for w in workers),
                empty="no workers")
    return EXIT_OK


# ------------------------------------------------------------------------ models, logs


async def cmd_models_list(args: argparse.Namespace, config: Config, links: NodeLinks) -> int:
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


async def cmd_models_download(args: argparse.Namespace, config: Config, links: NodeLinks
                              ) -> int:
    from rbee_tui.orchestrator import download_flow

    config.node(args.node)
    parse_model_ref(args.model)
    client = await links.open(args.node)
    async with client:
        finished = await drive(download_flow(client, args.model), EventPrinter())
    if args.json and finished is not None:
        print_json(finished.data)
    return EXIT_OK


async def cmd_models_rm(args: argparse.Namespace, config: Config, links: NodeLinks) -> int:
    client = await links.open(args.node)
    async with client:
        await client.delete_model(args.model)
    err_console.print(f"[green]✓[/] model {args.model} removed from {args.node}")
    return EXIT_OK


async def cmd_logs(args: argparse.Namespace, config: Config, links: NodeLinks) -> int:
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


Handler = Callable[[argparse.Namespace, Config, NodeLinks], Awaitable[int]]
HANDLERS: dict[tuple[str, str | None], Handler] = {
    ("infer", None): cmd_infer,
    ("nodes", "list"): cmd_nodes_list,
    ("nodes", "add"): cmd_nodes_add,
    ("nodes", "edit"): cmd_nodes_edit,
    ("nodes", "remove"): cmd_nodes_remove,
    ("nodes", "install"): cmd_nodes_install,
    ("nodes", "start"): cmd_nodes_start,
    ("nodes", "stop"): cmd_nodes_stop,
    ("nodes", "restart"): cmd_nodes_restart,
    ("nodes", "check"): cmd_nodes_check,
    ("workers", "list"): cmd_workers_list,
    ("workers", "spawn"): cmd_workers_spawn,
    ("workers", "stop"): cmd_workers_stop,
    ("workers", "health"): cmd_workers_health,
    ("models", "list"): cmd_models_list,
    ("models", "download"): cmd_models_download,
    ("models", "rm"): cmd_models_rm,
    ("logs", None): cmd_logs,
    ("serve", None): gateway.cmd_serve,
}
