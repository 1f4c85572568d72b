"""B124: property-based fuzzing of every agent route — no request a client can send gets a 500.

Schemathesis generates requests (valid and invalid: path and query parameters with control
characters and odd lengths, bodies of the protocol models and not) from the OpenAPI schema
that `server.openapi_schema` builds from the app's own routes (the app serves no docs; B22).
Every reply must be the B39 error shape with a code whose HTTP status it carries, or a
success; a 500 (INTERNAL_ERROR) fails the run. Designed 5xx answers stay allowed: the hub
unreachable (DOWNLOAD_FAILED 502), a full node (INSUFFICIENT_RAM 507), a busy catalog (503).

Bounded: `FUZZ_EXAMPLES` per route (default 40, about 20 s here); set RBEE_FUZZ_EXAMPLES for a
longer run. The hub is a closed local port, so `hf:` references fail fast.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.python import asgi as schemathesis_asgi

from rbee_agent.catalog import Catalog
from rbee_agent.protocol import HTTP_STATUS, ErrorBody, ErrorCode
from rbee_agent.server import create_app, openapi_schema
from rbee_agent.settings import AgentSettings
from tests.support import bundled_model_path, free_port

KEY = "fuzz-key"
FUZZ_EXAMPLES = int(os.environ.get("RBEE_FUZZ_EXAMPLES", "40"))

_home = Path(tempfile.mkdtemp(prefix="rbee-fuzz-"))
atexit.register(shutil.rmtree, _home, ignore_errors=True)
os.environ.setdefault("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens
_settings = AgentSettings(
    api_key=KEY, data_dir=_home / "data", log_dir=_home / "logs", port=free_port(),
    download_attempts=1, download_connect_timeout_s=1, catalog_busy_timeout_s=0.5,
    start_timeout_s=5, stop_grace_s=1,
)
_settings.data_dir.mkdir(parents=True)
_catalog = Catalog(_settings.catalog_path, _settings.catalog_busy_timeout_s)
_catalog.register_file(bundled_model_path(), id="smollm2-135m")
app = create_app(_settings, _catalog)
schema = schemathesis.openapi.from_dict(openapi_schema(app))
schema.app = app
schema.config.generation.update(modes=list(schemathesis.GenerationMode))  # valid and not
# Boundary values (empty, over-long, control characters) besides random ones.
schema.config.phases.update(phases=["examples", "coverage", "fuzzing"])


SENT = {"requests": 0}


@pytest.fixture(scope="module", autouse=True)
def _stop_the_app() -> Iterator[None]:
    yield
    print(f"\nfuzz: {SENT['requests']} requests, none answered 500")
    schemathesis_asgi.shutdown_lifespans()  # stops the workers a fuzzed spawn may have begun
    _catalog.close()


def check_reply(status: int, body: Any, where: str) -> None:
    SENT["requests"] += 1
    assert status != 500, f"{where} answered 500: {body}"
    if status < 400:
        return
    if " /openai/" in where:  # B184: OpenAI's routes answer in OpenAI's error shape
        assert set(body["error"]) == {"message", "type", "code", "param"}, f"{where}: {body}"
        return
    error = ErrorBody.model_validate(body).error  # the one B39 shape
    assert error.code in ErrorCode.__members__, f"{where}: unknown code {error.code}"
    assert HTTP_STATUS[ErrorCode(error.code)] == status, f"{where}: {error.code} as {status}"


@schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
def test_b124_fuzzed_requests_never_get_a_500(case: Any) -> None:
    if case.query and "follow" in case.query:
        case.query["follow"] = "false"  # a followed log never ends by design
    response = case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    try:
        body = response.json()
    except ValueError:
        body = response.text
    check_reply(response.status_code, body, f"{case.method} {case.formatted_path}")


# Names and ids of any length (beyond file-name limits) and any characters (NUL, CR, LF,
# lone surrogates escaped), where a route turns them into paths, headers or URLs.
NAMES = st.integers(0, 400).flatmap(lambda n: st.text(min_size=n, max_size=n))
TARGETS = {
    "log of a worker": ("/v1/logs", "GET", lambda x: {"query": {"worker": x}}),
    "worker": ("/v1/workers/{worker_id}", "GET", lambda x: {"path_parameters": {"worker_id": x}}),
    "cancel": ("/v1/workers/{worker_id}/inference/{request_id}", "DELETE",
               lambda x: {"path_parameters": {"worker_id": "w1-0000", "request_id": x}}),
    "model": ("/v1/models/{model_id}", "DELETE", lambda x: {"path_parameters": {"model_id": x}}),
    "download": ("/v1/models/download/{job_id}", "GET",
                 lambda x: {"path_parameters": {"job_id": x}}),
}


@pytest.mark.parametrize("target", sorted(TARGETS))
@given(name=NAMES)
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_b124_hostile_names_never_get_a_500(target: str, name: str) -> None:
    path, method, where = TARGETS[target]
    case = schema.make_case(operation=schema[path][method], **where(name))
    response = case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    check_reply(response.status_code, response.json(), f"{method} {path} with {name[:40]!r}")
