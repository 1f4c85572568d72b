"""The gateway's web server, as `rbee serve` and the dashboard's toggle both run it (B186,
B195): the listening socket made first (a taken port is one clear error), the URL clients
use, and uvicorn on the caller's event loop.

Only the standard library at import time; the web server is imported when one is built, so
an operator without the `gateway` extra gets a clear error instead of an ImportError.
"""

from __future__ import annotations

import contextlib
import socket
from typing import TYPE_CHECKING

from rbee_agent.protocol import ErrorCode, RbeeError

if TYPE_CHECKING:
    import uvicorn

    from rbee_gateway.app import Gateway

# How long the dashboard's stop waits for replies in flight before cutting them off.
IN_PROCESS_GRACE_S = 5.0


def listen(host: str, port: int, hint: str) -> socket.socket:
    """The listening socket, made before anything starts so a taken port is one clear error
    (naming its owner when the system shows it); `hint` says how to pick another port."""
    if not 1 <= port <= 65535:
        raise RbeeError(ErrorCode.INVALID_REQUEST, f"Port {port} is not a port",
                        hint="Use 1-65535, e.g. 8080.")
    from rbee_agent.startup import bind_listener

    try:
        return bind_listener(host, port)
    except RbeeError as err:
        err.hint = hint
        raise


def base_url(host: str, port: int) -> str:
    """What an OpenAI client takes as `base_url`."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/v1"


def require_web_server() -> None:
    """INVALID_CONFIG naming the missing package when the gateway's extra is not installed."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise RbeeError(ErrorCode.INVALID_CONFIG,
                        f"The gateway needs its web server ({exc.name} is missing)",
                        hint="Install it with: pip install 'rbee[gateway]'") from None


def web_server(gateway: Gateway, in_process: bool = False) -> uvicorn.Server:
    """uvicorn serving the gateway's app on the running event loop. `in_process`: inside
    another app (the dashboard), which keeps its signals and logging, and whose stop cuts
    replies still streaming after `IN_PROCESS_GRACE_S`."""
    import uvicorn

    from rbee_gateway.app import create_gateway_app

    config = uvicorn.Config(
        create_gateway_app(gateway), log_level="warning", access_log=False, loop="none",
        http="httptools", lifespan="on",
        log_config=None if in_process else uvicorn.config.LOGGING_CONFIG,
        timeout_graceful_shutdown=int(IN_PROCESS_GRACE_S) if in_process else None)
    server = uvicorn.Server(config)
    if in_process:
        # Signals belong to the host app: Ctrl+C and SIGTERM stop the dashboard, which
        # stops the gateway on its way out.
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign, assignment]
    return server
