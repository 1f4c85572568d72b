"""`rbee-agent serve`: run the node daemon until SIGTERM/SIGINT, then stop workers, exit 0.

A bad setting or config file ends the process before it binds, with one line on stderr
naming the problem (exit 1); `--debug` shows tracebacks.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import logging.handlers
import signal
import sys
from pathlib import Path
from typing import Any

from rbee_agent import __version__
from rbee_agent.loop import run as run_loop
from rbee_agent.protocol import RbeeError
from rbee_agent.settings import AgentSettings, add_setting_flags, load_settings

log = logging.getLogger("rbee.agent")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rbee-agent",
                                     description="rbee's node daemon: runs model workers.")
    parser.add_argument("--version", action="version", version=f"rbee-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the agent HTTP daemon")
    serve.add_argument("--config", type=Path, default=None,
                       help="settings file (default: <XDG config>/rbee/agent.toml)")
    serve.add_argument("--api-key-file", type=Path, default=None,
                       help="file holding the bearer key (else $RBEE_AGENT_API_KEY, else the "
                       "config file's api_key, generated on first start)")
    serve.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    add_setting_flags(serve)
    return parser


def setup_logging(settings: AgentSettings, debug: bool) -> None:
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    to_file = logging.handlers.RotatingFileHandler(
        settings.log_dir / "agent.log", maxBytes=settings.log_max_bytes,
        backupCount=settings.log_backups, encoding="utf-8",
    )
    to_stderr = logging.StreamHandler(sys.stderr)
    root = logging.getLogger("rbee")
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for handler in (to_file, to_stderr):
        handler.setFormatter(fmt)
        root.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides: dict[str, Any] = {
        key.removeprefix("set_"): value for key, value in vars(args).items()
        if key.startswith("set_") and value is not None
    }
    try:
        settings, config_path = load_settings(args.config, overrides, args.api_key_file)
    except RbeeError as err:
        print(f"rbee-agent: error: {err.message}" + (f"\nHint: {err.hint}" if err.hint else ""),
              file=sys.stderr)
        return 1
    setup_logging(settings, args.debug)
    log.info("settings from %s", config_path)
    return run_loop(serve(settings))


async def serve(settings: AgentSettings) -> int:
    import uvicorn

    from rbee_agent.catalog import Catalog
    from rbee_agent.server import create_app
    from rbee_agent.supervisor import Supervisor

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    catalog = Catalog(settings.catalog_path)
    server: uvicorn.Server | None = None
    stopping: set[asyncio.Task[None]] = set()

    async def drain_then_exit(supervisor: Supervisor) -> None:
        # Workers first (their streams end as they drain), then the HTTP server.
        await supervisor.shutdown()
        assert server is not None
        server.should_exit = True

    def install_signals(supervisor: Supervisor) -> None:
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if stopping:
                return
            log.info("signal received: stopping workers, then exiting")
            stopping.add(asyncio.ensure_future(drain_then_exit(supervisor)))

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)

    app = create_app(settings, catalog, on_startup=install_signals)
    server = uvicorn.Server(uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level="warning", access_log=False,
        timeout_graceful_shutdown=1, lifespan="on",
    ))
    try:
        await server.serve()
    finally:
        catalog.close()
    return 0 if server.started else 1
