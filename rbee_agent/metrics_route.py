"""`GET /metrics` on the agent (B190): Prometheus' text format, behind the agent's key
unless `metrics_public` is set on an agent that listens on loopback only (a local scraper
then needs no key; a key never travels in a scrape config by accident)."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request, Response

from rbee_agent.auth import check_bearer
from rbee_agent.metrics import CONTENT_TYPE, StreamMetrics, metrics_open
from rbee_agent.settings import AgentSettings

log = logging.getLogger("rbee.agent")


def metrics_router(metrics: StreamMetrics, settings: AgentSettings) -> APIRouter:
    router = APIRouter()
    public = metrics_open(settings.metrics_public, settings.host)
    if settings.metrics_public and not public:
        log.warning("metrics_public is ignored: the agent listens on %s, not loopback only",
                    settings.host)

    @router.get("/metrics")
    async def metrics_text(request: Request) -> Response:
        if not public:
            assert settings.api_key is not None
            check_bearer(request, settings.api_key)
        # A thread: collecting asks NVML, which blocks.
        return Response(await asyncio.to_thread(metrics.render), media_type=CONTENT_TYPE)

    return router
