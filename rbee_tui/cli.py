"""`rbee` subcommands for scripts (B56, B60, B61): parse arguments, run an operation, print it.

Exit codes: 0 ok, 1 error, 2 usage, 130 interrupted. A user's mistake prints one message
and a hint, never a traceback (`--debug` shows it). `--json` on every listing.

This module imports nothing but the standard library at load time: `rbee --help` and a
usage error are answered before pydantic, httpx, Rich or Textual are loaded (B151). The
handlers (`cli_commands`) and the printer (`cli_output`) are imported once the arguments
are known to be good.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from typing import NoReturn

from rbee_gateway import serve as gateway
from rbee_tui.defaults import DEFAULT_MODEL, LOCALHOST

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    def __init__(self, message: str, usage: str = "") -> None:
        super().__init__(message)
        self.usage = usage


_INVALID_CHOICE = re.compile(r"invalid choice: '([^']*)' \(choose from (.*)\)")


class Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so main() owns every exit code, and that
    says which subcommand a typo probably meant (B150)."""

    def error(self, message: str) -> NoReturn:
        match = _INVALID_CHOICE.search(message)
        if match:
            choices = re.findall(r"'([^']*)'", match.group(2))
            close = difflib.get_close_matches(match.group(1), choices, n=1, cutoff=0.5)
            if close:
                message += f"; did you mean '{close[0]}'?"
        raise UsageError(f"{self.prog}: {message}", self.format_usage())


# ------------------------------------------------------------------------ parser


def _json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def _node(p: argparse.ArgumentParser, default: str | None = LOCALHOST) -> None:
    where = f"(default: {default})" if default else "(default: every node)"
    p.add_argument("--node", default=default, metavar="NAME", help=f"the node {where}")


def _accept(p: argparse.ArgumentParser) -> None:
    p.add_argument("--accept-new-host-key", action="store_true",
                   help="trust the node's SSH host key if rbee has not seen it before")


def build_parser() -> Parser:
    p = Parser(prog="rbee", description="Run local LLMs on every GPU machine you own. "
               "Without a command: the dashboard.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--ephemeral", action="store_true",
                   help="stop the local agent on exit if this run started it")
    sub = p.add_subparsers(dest="command", parser_class=Parser, metavar="COMMAND")
    _infer(sub)
    _nodes(sub)
    _workers(sub)
    _models(sub)
    logs = sub.add_parser("logs", help="agent or worker logs of a node")
    _node(logs)
    logs.add_argument("--worker", default=None, metavar="ID",
                      help="a worker's log instead of the agent's")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    logs.add_argument("--lines", "-n", type=int, default=100, metavar="N",
                      help="how many of the last lines to print first (default: 100)")
    logs.set_defaults(handler="logs")
    gateway.add_parser(sub)
    return p


def _split(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", default=None, metavar="HEAD,NODE[,…]",
                   help="split the model's layers over these nodes (llama.cpp RPC through "
                   "SSH); the first runs the worker. Stays in the foreground: Ctrl-C ends it")
    p.add_argument("--rpc-device", default="cpu", metavar="cpu|cudaN",
                   help="what each other node of --split serves (default: cpu)")


def _infer(sub: argparse._SubParsersAction[Parser]) -> None:
    infer = sub.add_parser("infer", help="run one prompt on a node")
    _node(infer)
    infer.add_argument("--model", default=DEFAULT_MODEL, metavar="REF",
                       help=f"a catalog name, hf:org/repo[/file.gguf] or "
                       f"file:///path.gguf (default: {DEFAULT_MODEL})")
    infer.add_argument("--prompt", required=True, help="the prompt ('-' reads stdin)")
    kind = infer.add_mutually_exclusive_group()
    kind.add_argument("--raw", action="store_true",
                      help="send the prompt as a plain completion, without the chat template")
    kind.add_argument("--chat", action="store_true",
                      help="send the prompt as a chat message (the default)")
    infer.add_argument("--max-tokens", type=int, default=100, metavar="N",
                       help="stop after N tokens (default: 100)")
    infer.add_argument("--temperature", type=float, default=0.7, metavar="T",
                       help="0 = greedy, up to 2 (default: 0.7)")
    infer.add_argument("--top-p", type=float, default=0.95, metavar="P",
                       help="nucleus sampling mass (default: 0.95)")
    infer.add_argument("--backend", default="cpu", metavar="NAME",
                       help="where a new worker runs: cpu, cuda or metal (default: cpu)")
    infer.add_argument("--device", type=int, default=0, metavar="N",
                       help="GPU number for a new worker (default: 0)")
    infer.add_argument("--seed", type=int, default=None, metavar="N",
                       help="sampling seed: the same seed and settings give the same text")
    infer.add_argument("--stop", action="append", default=[], metavar="TEXT",
                       help="stop when the reply contains TEXT (repeatable)")
    _split(infer)
    _json(infer)
    infer.set_defaults(handler="infer")


def _nodes(sub: argparse._SubParsersAction[Parser]) -> None:
    nodes = sub.add_parser("nodes", help="the node registry and each node's agent")
    acts = nodes.add_subparsers(dest="action", required=True, parser_class=Parser,
                                metavar="ACTION")
    add = acts.add_parser("add", help="add a node (its SSH connection is tested first)")
    add.add_argument("--name", required=True, help="a short name: gpu1, lab-a100, …")
    _node_fields(add, required_host=True)
    _accept(add)
    add.set_defaults(handler="nodes_add")
    listing = acts.add_parser("list", help="every node, as its agent answers now")
    _json(listing)
    listing.set_defaults(handler="nodes_list")
    edit = acts.add_parser("edit", help="change a node (a new SSH address is tested first)")
    edit.add_argument("name", help="the node")
    _node_fields(edit, required_host=False)
    _accept(edit)
    edit.set_defaults(handler="nodes_edit")
    remove = acts.add_parser("remove", aliases=["rm"], help="remove a node from the registry")
    remove.add_argument("name", help="the node")
    remove.add_argument("--yes", action="store_true", help="do not ask")
    remove.set_defaults(handler="nodes_remove")
    install = acts.add_parser("install", help="install or upgrade the agent over SSH")
    install.add_argument("name", help="the node")
    install.add_argument("--backend", default="cpu", choices=["cpu", "cuda"],
                         help="cuda: build llama.cpp with CUDA on the node (needs nvcc)")
    _accept(install)
    install.set_defaults(handler="nodes_install")
    for action, text in (("start", "start the agent"), ("stop", "stop the agent"),
                         ("restart", "restart the agent"),
                         ("check", "test SSH and the agent; show GPUs and GPU offload")):
        cmd = acts.add_parser(action, help=text)
        cmd.add_argument("name", help="the node")
        _accept(cmd)
        _json(cmd)
        cmd.set_defaults(handler=f"nodes_{action}")


def _node_fields(p: argparse.ArgumentParser, required_host: bool) -> None:
    p.add_argument("--ssh-host", required=required_host, metavar="HOST",
                   help="the node's host name or address")
    p.add_argument("--ssh-port", type=int, default=None, metavar="N",
                   help="its SSH port (default: 22)")
    p.add_argument("--ssh-user", default=None, metavar="USER",
                   help="the SSH user (default: yours)")
    p.add_argument("--ssh-key", default=None, metavar="FILE",
                   help="private key file (default: ssh-agent and ~/.ssh keys)")
    p.add_argument("--install-path", default=None, metavar="PATH",
                   help="where the agent lives on the node (default: ~/.local/share/rbee-agent)")
    p.add_argument("--agent-port", type=int, default=None, metavar="N",
                   help="the agent's port on the node (default: 9200)")
    p.add_argument("--direct", action="store_true",
                   help="reach the agent over direct HTTP instead of an SSH forward")


def _workers(sub: argparse._SubParsersAction[Parser]) -> None:
    workers = sub.add_parser("workers", help="the workers of the nodes")
    acts = workers.add_subparsers(dest="action", required=True, parser_class=Parser,
                                  metavar="ACTION")
    listing = acts.add_parser("list", help="workers of every node (or one), asked now")
    _node(listing, default=None)
    _json(listing)
    listing.set_defaults(handler="workers_list")
    spawn = acts.add_parser("spawn", help="start a worker (an idle one is handed back)")
    _node(spawn)
    spawn.add_argument("--model", required=True, metavar="REF",
                       help="a catalog name, hf:org/repo[/file.gguf] or file:///path.gguf")
    spawn.add_argument("--backend", default="cpu", metavar="NAME",
                       help="where it runs: cpu, cuda or metal (default: cpu)")
    spawn.add_argument("--device", type=int, default=None, metavar="N",
                       help="GPU number (default: the GPU with the most free memory that fits)")
    spawn.add_argument("--gpu-layers", default=None, metavar="N|all|auto",
                       help="layers on the GPU; auto: as many as fit, the rest on the CPU "
                       "(default: all)")
    spawn.add_argument("--ctx-size", type=int, default=None, metavar="TOKENS",
                       help="context per slot (default: the agent's, capped at the model's)")
    spawn.add_argument("--slots", type=int, default=None, metavar="N",
                       help="requests served at once (default: the agent's)")
    spawn.add_argument("--new", action="store_true",
                       help="start another worker even when one could be handed back")
    _split(spawn)
    _json(spawn)
    spawn.set_defaults(handler="workers_spawn")
    stop = acts.add_parser("stop", help="stop a worker (its running requests finish first)")
    _node(stop)
    stop.add_argument("--id", required=True, help="the worker's id (rbee workers list)")
    stop.set_defaults(handler="workers_stop")
    health = acts.add_parser("health", help="the agent and its workers' state")
    _node(health)
    _json(health)
    health.set_defaults(handler="workers_health")


def _models(sub: argparse._SubParsersAction[Parser]) -> None:
    models = sub.add_parser("models", help="the model catalog of a node")
    acts = models.add_subparsers(dest="action", required=True, parser_class=Parser,
                                 metavar="ACTION")
    listing = acts.add_parser("list", help="the models the node has")
    _node(listing)
    _json(listing)
    listing.set_defaults(handler="models_list")
    download = acts.add_parser("download", help="fetch a model onto the node")
    _node(download)
    download.add_argument("--model", required=True, metavar="REF",
                          help="hf:org/repo[/file.gguf][@revision]")
    _json(download)
    download.set_defaults(handler="models_download")
    remove = acts.add_parser("remove", aliases=["rm"], help="delete a model (file and entry)")
    _node(remove)
    remove.add_argument("--model", required=True, metavar="ID", help="its catalog name")
    remove.set_defaults(handler="models_remove")


# ------------------------------------------------------------------------ main


def _usage_error(error: UsageError) -> int:
    sys.stderr.write(error.usage)
    sys.stderr.write(f"error: {error}\n")
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except UsageError as exc:
        return _usage_error(exc)
    if args.command is None:
        from rbee_tui.cli_commands import run_dashboard

        return run_dashboard(args)
    from rbee_tui.cli_commands import run

    return run(args, UsageError)
