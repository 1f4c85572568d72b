"""The agent's HTTP routes, one router per area (B20-B39), thin: parse, call, reply.

Routers get what they work with through `Depends` from `app.state` (no module globals):
`SupervisorDep`, `CatalogDep`, `SettingsDep`. Every router but `health` is mounted behind
`require_key`; a test walks the route table, so a new route without auth fails it.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from rbee_agent.auth import check_bearer
from rbee_agent.catalog import Catalog
from rbee_agent.settings import AgentSettings
from rbee_agent.supervisor import Supervisor


def _supervisor(request: Request) -> Supervisor:
    supervisor: Supervisor = request.app.state.supervisor
    return supervisor


def _catalog(request: Request) -> Catalog:
    catalog: Catalog = request.app.state.catalog
    return catalog


def _settings(request: Request) -> AgentSettings:
    settings: AgentSettings = request.app.state.settings
    return settings


SupervisorDep = Annotated[Supervisor, Depends(_supervisor)]
CatalogDep = Annotated[Catalog, Depends(_catalog)]
SettingsDep = Annotated[AgentSettings, Depends(_settings)]


def require_key(request: Request, settings: SettingsDep) -> None:
    """B22: the agent's bearer key, compared in constant time."""
    assert settings.api_key is not None
    check_bearer(request, settings.api_key)


def json_body(model: Any) -> dict[str, Any]:
    """`openapi_extra` that documents a body the route parses itself (`parse_body`), so the
    schema a test generates from the app (the fuzz suite) knows what to send."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}
