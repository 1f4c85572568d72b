"""B11-B13, B44, B54, B142-B148: the flow against a scripted agent stand-in that misbehaves
on purpose.

The one place a stand-in is right: it plays a peer that is old, broken, busy or stuck.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
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
    # B142: each failed try is shown the way SSH shows its tries
    assert "✗ attempt 1/3: Cannot reach the agent" in r.stderr
    assert "retrying in 0.05 s" in r.stderr and "attempt 2/3" in r.stderr


def test_b44_busy_worker_is_retried_then_suggestions(rbee: RbeeEnv, stand_in: StandIn) -> None:
    stand_in.healthy()
    busy = {"error": {"code": "ALL_SLOTS_BUSY", "message": "All 1 slot(s) of this worker are "
                      "busy", "details": {"slots_total": 1, "slots_busy": 1}}}
    stand_in.routes[("POST", "/v1/workers/w1/inference")] = lambda h: send_json(h, 503, busy)
    use(rbee, stand_in, queue_full_retry={"attempts": 4, "backoff_s": [0.05, 0.1, 0.2]})
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


# ------------------------------------------------------------------ B144, B146-B148


def done_frame(tokens: int, reason: str = "length") -> str:
    return json.dumps({"done": True, "total_tokens": tokens, "duration_ms": 1.0,
                       "finish_reason": reason, "request_id": "r"})


def record_inference(stand_in: StandIn, frames: list[str]) -> list[dict[str, Any]]:
    bodies: list[dict[str, Any]] = []

    def answer(h: BaseHTTPRequestHandler) -> None:
        bodies.append(json.loads(h.body))  # type: ignore[attr-defined]
        send_sse(h, frames)

    stand_in.routes[("POST", "/v1/workers/w1/inference")] = answer
    return bodies


def test_b144_an_empty_reply_is_never_a_silent_success(rbee: RbeeEnv, stand_in: StandIn
                                                       ) -> None:
    stand_in.healthy()
    record_inference(stand_in, [done_frame(0, "stop"), "[DONE]"])
    use(rbee, stand_in)
    r = infer(rbee)
    assert r.returncode == 1 and "The model answered nothing" in r.stderr
    assert r.stdout == ""


def test_b144_the_prompt_is_a_chat_message_unless_raw(rbee: RbeeEnv, stand_in: StandIn
                                                      ) -> None:
    stand_in.healthy()
    bodies = record_inference(stand_in, ['{"token": "Hi", "index": 0}', done_frame(1),
                                         "[DONE]"])
    use(rbee, stand_in)
    assert infer(rbee).returncode == 0
    assert bodies[0]["messages"] == [{"role": "user", "content": "Hi"}]
    assert "prompt" not in bodies[0]
    raw = rbee.run("infer", "--node", "fake", "--prompt", "Hi", "--raw")
    assert raw.returncode == 0 and bodies[1]["prompt"] == "Hi" and "messages" not in bodies[1]


def test_b144_a_model_without_chat_template_gets_the_plain_prompt(rbee: RbeeEnv,
                                                                 stand_in: StandIn) -> None:
    stand_in.healthy()
    bodies: list[dict[str, Any]] = []

    def answer(h: BaseHTTPRequestHandler) -> None:
        bodies.append(json.loads(h.body))  # type: ignore[attr-defined]
        if "messages" in bodies[-1]:
            send_json(h, 400, {"error": {"code": "INVALID_REQUEST", "message":
                                         "Model m.gguf has no chat template", "details": {}}})
        else:
            send_sse(h, ['{"token": "ok", "index": 0}', done_frame(1), "[DONE]"])

    stand_in.routes[("POST", "/v1/workers/w1/inference")] = answer
    use(rbee, stand_in)
    r = infer(rbee)
    assert r.returncode == 0, r.stderr
    assert "no chat template: sending the prompt as a plain completion" in r.stderr
    assert [("messages" in b, b.get("prompt")) for b in bodies] == [(True, None), (False, "Hi")]


def test_b144_a_reply_cut_off_by_a_stop_is_a_failure_with_the_partial_saved(
        rbee: RbeeEnv, stand_in: StandIn) -> None:
    stand_in.healthy()
    record_inference(stand_in, ['{"token": "Hel", "index": 0}', '{"token": "lo", "index": 1}',
                                done_frame(2, "cancelled"), "[DONE]"])
    use(rbee, stand_in)
    r = infer(rbee)
    assert r.returncode == 1
    assert "finish reason 'cancelled'" in r.stderr and "got 2 of 5 tokens" in r.stderr
    saved = re.search(r"partial text saved to (\S+)", r.stderr)
    assert saved and Path(saved.group(1)).read_text() == "Hello" == r.stdout
    assert "rbee logs --node fake --worker w1" in r.stderr


def test_b146_spawn_says_when_it_handed_back_an_existing_worker(rbee: RbeeEnv,
                                                                stand_in: StandIn) -> None:
    stand_in.healthy()
    stand_in.routes[("GET", "/v1/models")] = lambda h: send_json(h, 200, {"models": [MODEL]})
    sent: list[dict[str, Any]] = []

    def spawn(h: BaseHTTPRequestHandler) -> None:
        sent.append(json.loads(h.body))  # type: ignore[attr-defined]
        send_json(h, 200, {"worker": WORKER, "reused": True})

    stand_in.routes[("POST", "/v1/workers")] = spawn
    use(rbee, stand_in)
    r = rbee.run("workers", "spawn", "--node", "fake", "--model", "smollm2-135m")
    assert r.returncode == 0, r.stderr
    assert "handed back the existing idle worker w1" in r.stderr
    assert sent[0]["new"] is False
    assert rbee.run("workers", "spawn", "--node", "fake", "--model", "smollm2-135m",
                    "--new").returncode == 0
    assert sent[1]["new"] is True
    typo = rbee.run("workers", "spawn", "--node", "fake", "--model", "smollm2-135")
    assert typo.returncode == 1 and "did you mean smollm2-135m?" in typo.stderr
    assert len(sent) == 2, "nothing is spawned for a model the node does not have"


def test_b146_a_newer_node_says_to_upgrade_this_machine(rbee: RbeeEnv, stand_in: StandIn
                                                        ) -> None:
    stand_in.healthy(version="99.0.0")
    use(rbee, stand_in)
    r = infer(rbee)
    assert r.returncode == 1 and "upgrade rbee on this machine to 99.0.0" in r.stderr
    assert "Upgrade the node" not in r.stderr


def test_b147_workers_stop_waits_while_the_agent_drains(rbee: RbeeEnv, stand_in: StandIn
                                                        ) -> None:
    stand_in.healthy()

    def slow_stop(h: BaseHTTPRequestHandler) -> None:
        time.sleep(1.0)  # the agent drains the worker before it answers
        send_json(h, 200, {**WORKER, "state": "stopping"})

    stand_in.routes[("DELETE", "/v1/workers/w1")] = slow_stop
    use(rbee, stand_in, http_timeout_s=0.3, worker_stop_timeout_s=10)
    r = rbee.run("workers", "stop", "--node", "fake", "--id", "w1")
    assert r.returncode == 0, r.stderr
    assert "running requests finish first (up to 10 s)" in r.stderr
    assert "worker w1 (smollm2-135m) stopped" in r.stderr and "Timeout" not in r.stderr


def test_b148_a_busy_worker_queues_the_request_and_shows_its_place(rbee: RbeeEnv,
                                                                   stand_in: StandIn) -> None:
    stand_in.healthy()
    busy = {**WORKER, "state": "busy", "slots_available": 0, "queued": 1}
    stand_in.routes[("GET", "/v1/workers")] = lambda h: send_json(h, 200, {"workers": [busy]})
    record_inference(stand_in, ['{"queued": 2}', '{"queued": 1}', '{"queued": 0}',
                                '{"token": "ok", "index": 0}', done_frame(1), "[DONE]"])
    use(rbee, stand_in)
    r = infer(rbee)
    assert r.returncode == 0, r.stderr
    assert "worker w1 is busy: joining its queue (1 waiting)" in r.stderr
    for n in (2, 1, 0):
        assert f"queued, {n} ahead" in r.stderr
    assert "POST /v1/workers" not in stand_in.log, "no second copy for a short queue"


def test_b148_a_long_queue_gets_another_copy_when_the_node_has_room(rbee: RbeeEnv,
                                                                    stand_in: StandIn) -> None:
    stand_in.healthy()
    busy = {**WORKER, "state": "busy", "slots_available": 0, "queued": 6}
    stand_in.routes[("GET", "/v1/workers")] = lambda h: send_json(h, 200, {"workers": [busy]})
    stand_in.routes[("GET", "/v1/models")] = lambda h: send_json(h, 200, {"models": [MODEL]})
    sent: list[dict[str, Any]] = []

    def refuse(h: BaseHTTPRequestHandler) -> None:
        sent.append(json.loads(h.body))  # type: ignore[attr-defined]
        send_json(h, 507, {"error": {"code": "INSUFFICIENT_RAM", "message": "needs 900 MB, "
                                     "300 MB free", "details": {}}})

    record_inference(stand_in, ['{"token": "ok", "index": 0}', done_frame(1), "[DONE]"])
    stand_in.routes[("POST", "/v1/workers")] = refuse  # after: routes match by prefix
    use(rbee, stand_in, spawn_when_queued=4)
    r = infer(rbee)
    assert r.returncode == 0, r.stderr
    assert sent == [{"model_ref": "smollm2-135m", "backend": "cpu", "device": 0, "new": True}]
    assert "no room for another worker" in r.stderr and "joining the queue of w1" in r.stderr


def test_b148_a_full_queue_is_retried_after_the_time_the_worker_asks(rbee: RbeeEnv,
                                                                     stand_in: StandIn) -> None:
    stand_in.healthy()
    full = {"error": {"code": "QUEUE_FULL", "message": "The queue of worker w1 is full",
                      "details": {"retry_after_s": 0.1}}}
    stand_in.routes[("POST", "/v1/workers/w1/inference")] = lambda h: send_json(h, 503, full)
    use(rbee, stand_in, queue_full_retry={"attempts": 3, "backoff_s": [5]})
    started = time.monotonic()
    r = infer(rbee)
    assert r.returncode == 1 and time.monotonic() - started < 5
    assert "attempt 1/3: The queue of worker w1 is full; retrying in 0.1 s" in r.stderr
    assert stand_in.log.count("POST /v1/workers/w1/inference") == 3
    assert "rbee workers spawn --new" in r.stderr


def test_b142_download_retries_and_resumes_are_shown(rbee: RbeeEnv, stand_in: StandIn
                                                     ) -> None:
    stand_in.healthy()
    job = {"job_id": "j1", "model_ref": "hf:o/r", "reference": "hf:o/r/m.gguf",
           "stage": "downloading", "files": ["m.gguf"], "bytes_total": 100,
           "bytes_downloaded": 0, "progress_url": "/v1/models/download/j1/progress"}
    stand_in.routes[("POST", "/v1/models/download")] = lambda h: send_json(h, 202, job)
    note = "attempt 2/6: connection reset, resuming at 41.2 MB in 0.4 s"
    frames = [json.dumps({"stage": "downloading", "job_id": "j1", "model_ref": "hf:o/r",
                          "bytes_downloaded": 40, "bytes_total": 100}),
              json.dumps({"stage": "downloading", "job_id": "j1", "model_ref": "hf:o/r",
                          "bytes_downloaded": 41, "bytes_total": 100, "attempt": 2,
                          "note": note}),
              json.dumps({"stage": "complete", "job_id": "j1", "model_ref": "hf:o/r",
                          "bytes_downloaded": 100, "bytes_total": 100, "model_id": "m",
                          "local_path": "/m/m.gguf"}), "[DONE]"]
    stand_in.routes[("GET", "/v1/models/download/j1/progress")] = lambda h: send_sse(h, frames)
    use(rbee, stand_in)
    r = rbee.run("models", "download", "--node", "fake", "--model", "hf:o/r")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count(note) == 1 and "m downloaded to /m/m.gguf" in r.stderr


MODEL: dict[str, Any] = {
    "id": "smollm2-135m", "provider": "bundled", "reference": "bundled:smollm2-135m",
    "local_path": "/m/s.gguf", "size_bytes": 1, "quantization": "Q4_1",
    "architecture": "llama", "layers": 30, "context_length": 8192, "added_at": 0,
}
