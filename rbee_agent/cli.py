"""`rbee-agent serve`: run the node daemon until SIGTERM/SIGINT, then stop workers, exit 0.

Start-up touches nothing shared before it owns it (B130): it binds its port first (a taken
port ends the process with exit 1, naming the owner when it can be seen), then locks its data
dir (a second agent on the same data dir exits 1 naming the first one's pid), and only then
opens its log file and the catalog. A bad setting, config file or damaged catalog is one line
on stderr with a hint and exit 1; `--debug` shows tracebacks.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import logging.handlers
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from rbee_agent import __version__
from rbee_agent.loop import run as run_loop
from rbee_agent.protocol import RbeeError
from rbee_agent.settings import AgentSettings, add_setting_flags, load_settings
from rbee_agent.startup import DataDirLock, bind_listener

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
    serve.add_argument("--rebuild-catalog", action="store_true",
                       help="before serving, rebuild the model catalog from the models dir "
                       "(a damaged catalog file is kept as a backup)")
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


def _fail(err: RbeeError) -> int:
    print(f"rbee-agent: error: {err.message}" + (f"\nHint: {err.hint}" if err.hint else ""),
          file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides: dict[str, Any] = {
        key.removeprefix("set_"): value for key, value in vars(args).items()
        if key.startswith("set_") and value is not None
    }
    try:
        settings, config_path = load_settings(args.config, overrides, args.api_key_file)
        listener = bind_listener(settings.host, settings.port)
    except RbeeError as err:
        return _fail(err)
    try:
        with DataDirLock(settings.data_dir):
            setup_logging(settings, args.debug)
            log.info("settings from %s", config_path)
            catalog = _open_catalog(settings, args.rebuild_catalog)
            return run_loop(serve(settings, listener, catalog))
    except RbeeError as err:
        if args.debug:
            raise
        return _fail(err)
    finally:
        listener.close()


def _open_catalog(settings: AgentSettings, rebuild: bool) -> Any:
    from rbee_agent.catalog_repair import open_catalog, rebuild_catalog

    timeout = settings.catalog_busy_timeout_s
    if rebuild:
        ids = rebuild_catalog(settings.catalog_path, settings.models_path, timeout)
        log.info("catalog rebuilt from %s: %d model(s): %s", settings.models_path, len(ids),
                 ", ".join(ids) or "none")
    return open_catalog(settings.catalog_path, timeout)


async def serve(settings: AgentSettings, listener: socket.socket, catalog: Any) -> int:
    import uvicorn

    from rbee_agent.edge import fit_open_files, guarded_protocol
    from rbee_agent.server import create_app
    from rbee_agent.supervisor import Supervisor

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
    connections = fit_open_files(settings.max_connections)
    server = uvicorn.Server(uvicorn.Config(
        app, log_level="warning", access_log=False, timeout_graceful_shutdown=1,
        lifespan="on", http=guarded_protocol(settings.header_timeout_s, connections),
        timeout_keep_alive=max(1, round(settings.keep_alive_timeout_s)),
    ))
    try:
        await server.serve(sockets=[listener])
    finally:
        catalog.close()
    return 0 if server.started else 1
