"""The agent's FastAPI app: state, edge limits, error handlers and the routers of `routes/`.

Every route but `/v1/health` needs the agent's bearer key; the worker ready callback is the
one exception in kind, authenticated with the calling worker's own key (B27). There are no
docs routes in production (B22: nothing answers without a key); `openapi_schema` builds the
schema for tests (the fuzz suite) from the same routes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from rbee_agent import __version__
from rbee_agent.bundled import register_bundled
from rbee_agent.catalog import Catalog
from rbee_agent.edge import BodyLimit
from rbee_agent.http_errors import install_error_handlers
from rbee_agent.llama_probe import gpu_offload
from rbee_agent.metrics import AgentMetrics, RequestCounter, route_template
from rbee_agent.metrics_route import metrics_router
from rbee_agent.openai.routes import answer_route_errors, openai_router
from rbee_agent.openai.wire import ChatCompletionRequest, CompletionRequest
from rbee_agent.protocol import (
    DownloadRequest,
    RpcServerRequest,
    SpawnRequest,
    WorkerReadyCallback,
)
from rbee_agent.routes import health, logs, models, node, require_key, workers
from rbee_agent.routes import rpc as rpc_routes
from rbee_agent.settings import AgentSettings
from rbee_agent.supervisor import Supervisor

log = logging.getLogger("rbee.agent")


@dataclass
class AgentIdentity:
    """Which agent process answers (B132): the operator proves the agent it talks to is the
    one it started by its instance id, which no other process knows."""

    pid: int
    instance_id: str
    started_at: float
    gpu_offload: bool | None = None


def create_app(
    settings: AgentSettings,
    catalog: Catalog,
    on_startup: Callable[[Supervisor], None] | None = None,
) -> FastAPI:
    supervisor = Supervisor(settings, catalog)
    identity = AgentIdentity(os.getpid(), secrets.token_hex(16), time.time())

    async def probe_offload() -> None:
        identity.gpu_offload = await asyncio.to_thread(gpu_offload)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        settings.models_path.mkdir(parents=True, exist_ok=True)
        added = await asyncio.to_thread(register_bundled, catalog, settings.models_path)
        log.info("agent %s (pid %d) on %s; %d bundled model(s): %s", __version__,
                 identity.pid, settings.url, len(added), ", ".join(e.id for e in added)
                 or "none")
        supervisor.start()
        probe = asyncio.ensure_future(probe_offload())
        if on_startup is not None:
            on_startup(supervisor)
        try:
            yield
        finally:
            probe.cancel()
            await supervisor.shutdown()

    # No unauthenticated docs: every route but health needs the key (B22).
    app = FastAPI(title="rbee agent", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.supervisor = supervisor
    app.state.catalog = catalog
    app.state.settings = settings
    app.state.identity = identity
    app.state.metrics = AgentMetrics(supervisor)
    install_error_handlers(app)
    answer_route_errors(app)
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    app.add_middleware(RequestCounter, metrics=app.state.metrics, route_of=route_template)
    app.include_router(health.router)
    for area in (node.router, workers.router, models.router, logs.router,
                 openai_router(supervisor, settings)):
        app.include_router(area, dependencies=[Depends(require_key)])
    app.include_router(rpc_routes.router, dependencies=[Depends(require_key)])
    app.include_router(metrics_router(app.state.metrics, settings))
    return app


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI schema, with the bodies that routes parse themselves."""
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    _, defs = models_json_schema(
        [(m, "validation") for m in (SpawnRequest, DownloadRequest, WorkerReadyCallback,
                                     ChatCompletionRequest, CompletionRequest,
                                     RpcServerRequest)],
        ref_template="#/components/schemas/{model}",
    )
    schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
    return schema
