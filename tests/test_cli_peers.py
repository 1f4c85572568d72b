"""B11-B13, B44, B54: the flow against a scripted agent stand-in that misbehaves on purpose.

The one place a stand-in is right: it plays a peer that is old, broken, busy or stuck.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from rbee_agent import __version__
from tests.cli_support import RbeeEnv
from tests.support import free_port

Route = Callable[[BaseHTTPRequestHandler], None]


class StandIn:
    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Route] = {}
        self.log: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                path = self.path.split("?")[0]
                outer.log.append(f"{self.command} {path}")
                length = int(self.headers.get("content-length") or 0)
                self.body = self.rfile.read(length) if length else b""
                for (method, prefix), route in outer.routes.items():
                    if method == self.command and path.startswith(prefix):
                        route(self)
                        return
                send_json(self, 404, {"error": {"code": "NOT_FOUND", "message": path,
                                                "details": {}}})

            do_GET = do_POST = do_DELETE = _handle

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def healthy(self, version: str = __version__) -> None:
        self.routes[("GET", "/v1/health")] = lambda h: send_json(
            h, 200, {"status": "ok", "version": version, "api_version": "1"})
        self.routes[("GET", "/v1/workers")] = lambda h: send_json(h, 200, {"workers": [WORKER]})

    def close(self) -> None:
        self.server.shutdown()


WORKER: dict[str, Any] = {
    "id": "w1", "model_id": "smollm2-135m", "model_ref": "bundled:smollm2-135m",
    "backend": "cpu", "device": 0, "url": "http://127.0.0.1:1", "state": "idle",
    "slots_total": 1, "slots_available": 1, "pid": 1, "started_at": 0, "last_activity": 0,
}


def send_json(h: BaseHTTPRequestHandler, status: int, body: Any) -> None:
    data = json.dumps(body).encode() if not isinstance(body, bytes) else body
    h.send_response(status)
    h.send_header("content-type", "application/json")
    h.send_header("content-length", str(len(data)))
    h.end_headers()
    h.wfile.write(data)


def send_sse(h: BaseHTTPRequestHandler, frames: list[str], then_sleep: float = 0) -> None:
    h.send_response(200)
    h.send_header("content-type", "text/event-stream")
    h.send_header("transfer-encoding", "chunked")
    h.end_headers()
    for frame in frames:
        data = f"data: {frame}\n\n".encode()
        h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        h.wfile.flush()
    time.sleep(then_sleep)


@pytest.fixture
def stand_in() -> Iterator[StandIn]:
    s = StandIn()
    yield s
    s.close()


def use(rbee: RbeeEnv, stand_in: StandIn, **settings: Any) -> None:
    rbee.write_config(settings, nodes={"fake": {
        "transport": "direct", "agent_host": "127.0.0.1", "agent_port": stand_in.port,
        "api_key": "k"}})


def infer(rbee: RbeeEnv) -> Any:
    return rbee.run("infer", "--node", "fake", "--prompt", "Hi", "--max-tokens", "5")


def test_b11_version_mismatch_names_both_versions_and_the_fix(rbee: RbeeEnv,
                                                              stand_in: StandIn) -> None:
    stand_in.healthy(version="0.0.1")
    use(rbee, stand_in)
    r = infer(rbee)
    assert r.returncode == 1
    assert "runs rbee 0.0.1" in r.stderr and f"this rbee is {__version__}" in r.stderr
    assert "rbee nodes install fake" in r.stderr


@pytest.mark.parametrize("body", [b"not json at all", b'{"status": "ok"}', b"[1, 2]"])
def test_b13_malformed_health_is_an_error_not_a_traceback(rbee: RbeeEnv, stand_in: StandIn,
                                                          body: bytes) -> None:
    stand_in.routes[("GET", "/v1/health")] = lambda h: send_json(h, 200, body)
    use(rbee, stand_in)
    r = infer(rbee)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "wrong shape" in r.stderr or "cannot read" in r.stderr


def test_b13_error_body_of_the_wrong_shape(rbee: RbeeEnv, stand_in: StandIn) -> None:
    stand_in.routes[("GET", "/v1/health")] = lambda h: send_json(h, 500, b"<html>oops</html>")
    use(rbee, stand_in)
    r = infer(rbee)
    assert r.returncode == 1 and "HTTP 500" in r.stderr and "Traceback" not in r.stderr


def test_b13_malformed_stream_frame(rbee: RbeeEnv, stand_in: StandIn) -> None:
    stand_in.healthy()
    stand_in.routes[("POST", "/v1/workers/w1/inference")] = lambda h: send_sse(
        h, ['{"token": "a", "index": 0}', "{broken"])
    use(rbee, stand_in)
    r = infer(rbee)
    assert r.returncode == 1 and "not JSON" in r.stderr and "Traceback" not in r.stderr


def test_b12_unreachable_agent_is_retried_then_one_clear_message(rbee: RbeeEnv) -> None:
    port = free_port()
    rbee.write_config({"http_backoff_s": [0.0, 0.05, 0.05]}, nodes={"gone": {
        "transport": "direct", "agent_host": "127.0.0.1", "agent_port": port, "api_key": "k"}})
    r = rbee.run("infer", "--node", "gone", "--prompt", "Hi")
    assert r.returncode == 1
    assert f"Cannot reach the agent of node 'gone' at http://127.0.0.1:{port}" in r.stderr
    assert "rbee nodes start gone" in r.stderr
    assert r.stderr.count("error:") == 1


def test_b44_busy_worker_is_retried_then_suggestions(rbee: RbeeEnv, stand_in: StandIn) -> None:
    stand_in.healthy()
    busy = {"error": {"code": "ALL_SLOTS_BUSY", "message": "All 1 slot(s) of this worker are "
                      "busy", "details": {"slots_total": 1, "slots_busy": 1}}}
    stand_in.routes[("POST", "/v1/workers/w1/inference")] = lambda h: send_json(h, 503, busy)
    use(rbee, stand_in, busy_retry_s=[0.05, 0.1, 0.2])
    started = time.monotonic()
    r = infer(rbee)
    assert r.returncode == 1
    assert time.monotonic() - started >= 0.35
    for n in (1, 2, 3):
        assert f"attempt {n}/4" in r.stderr
    assert stand_in.log.count("POST /v1/workers/w1/inference") == 4
    assert "spawn another worker" in r.stderr


def test_b54_no_token_for_the_stall_time_cancels(rbee: RbeeEnv, stand_in: StandIn) -> None:
    stand_in.healthy()
    stand_in.routes[("POST", "/v1/workers/w1/inference")] = lambda h: send_sse(
        h, ['{"token": "Hello", "index": 0}'], then_sleep=3)
    stand_in.routes[("DELETE", "/v1/workers/w1/inference/")] = lambda h: send_json(h, 204, b"")
    use(rbee, stand_in, token_stall_s=0.5)
    started = time.monotonic()
    r = infer(rbee)
    assert r.returncode == 1
    assert time.monotonic() - started < 3
    assert "No token for 0.5 s" in r.stderr
    assert "got 1 of 5 tokens" in r.stderr
    assert any(line.startswith("DELETE /v1/workers/w1/inference/") for line in stand_in.log)
