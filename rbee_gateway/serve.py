"""`rbee serve`: start the gateway and print where it is and its key (B186, B187).

`rbee_tui/cli.py` registers the subcommand with `add_parser`, and `cli_commands` runs it
with `serve`. Like the CLI's parser, this module loads only the standard library (B151); the
web server and everything else is imported when the command runs, so the rest of rbee never
needs them.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rbee_tui.config import Config
    from rbee_tui.links import NodeLinks

EXIT_OK = 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    serve = sub.add_parser("serve", help="one OpenAI-compatible endpoint for every node")
    serve.add_argument("--host", default=None, metavar="ADDRESS",
                       help="address to listen on (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=None, metavar="N",
                       help="port (default: 8080)")
    serve.add_argument("--api-key-file", type=Path, default=None, metavar="FILE",
                       help="file holding the key clients must send (default: one generated "
                       "into the config folder)")
    serve.set_defaults(handler="serve")


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, made before anything starts so a taken port is one clear error
    (naming its owner when the system shows it)."""
    from rbee_agent.protocol import RbeeError
    from rbee_agent.startup import bind_listener

    try:
        return bind_listener(host, port)
    except RbeeError as err:
        err.hint = "Pick another port with --port, or stop what uses this one."
        raise


async def serve(args: argparse.Namespace, config: Config, links: NodeLinks) -> int:
    from rbee_agent.protocol import ErrorCode, RbeeError

    try:
        import uvicorn

        from rbee_agent.metrics import is_loopback
        from rbee_gateway.app import Gateway, create_gateway_app
    except ImportError as exc:
        raise RbeeError(ErrorCode.INVALID_CONFIG,
                        f"rbee serve needs the gateway's web server ({exc.name} is missing)",
                        hint="Install it with: pip install 'rbee[gateway]'") from None
    from rbee_gateway.keys import load_or_create_key
    from rbee_gateway.routing import Fleet

    settings = config.settings
    host = args.host or settings.gateway_host
    port = args.port or settings.gateway_port
    if not 1 <= port <= 65535:
        raise RbeeError(ErrorCode.INVALID_REQUEST, f"--port {port} is not a port",
                        hint="Use 1-65535, e.g. --port 8080.")
    key, key_path = load_or_create_key(args.api_key_file)
    sock = _bind(host, port)
    gateway = Gateway(Fleet(config, links), key, host)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{sock.getsockname()[1]}/v1"
    print(f"rbee gateway: {url}", flush=True)
    print(f"API key: {key}", flush=True)
    err = sys.stderr
    print(f"  (key file {key_path}; nodes: {', '.join(config.names())})", file=err)
    print(f"  OpenAI SDK: OpenAI(base_url=\"{url}\", api_key=\"<the key>\")", file=err)
    if not is_loopback(host):
        print(f"  warning: listening on {host}: anyone who can reach this port and has the "
              "key can use every node; traffic is not encrypted", file=err)
    print("  Ctrl+C stops it", file=err, flush=True)
    server = uvicorn.Server(uvicorn.Config(
        create_gateway_app(gateway), log_level="warning", access_log=False,
        loop="none", http="httptools", lifespan="on"))
    await server.serve(sockets=[sock])
    return EXIT_OK
