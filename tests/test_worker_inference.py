"""B39, B22, B43, B47: a real worker process streaming real tokens over HTTP."""

from __future__ import annotations

import httpx
import pytest

from tests.support import LONG_PROMPT, WorkerProc, sse_events


def infer(worker: WorkerProc, **body: object) -> httpx.Response:
    return httpx.post(f"{worker.url}/v1/inference", json=body, headers=worker.headers, timeout=60)


def stream_events(worker: WorkerProc, **body: object) -> tuple[httpx.Response, list[dict]]:
    with httpx.stream("POST", f"{worker.url}/v1/inference", json=body,
                      headers=worker.headers, timeout=60) as r:
        assert r.status_code == 200, r.read()
        return r, sse_events(r)


def text_of(events: list[dict]) -> str:
    return "".join(e["token"] for e in events if "token" in e)


def test_b43_sse_framing_indexes_and_done_frame(worker: WorkerProc) -> None:
    r, events = stream_events(worker, prompt="Once upon a time", max_tokens=16, temperature=0)
    assert r.headers["content-type"].startswith("text/event-stream")
    tokens, done = events[:-1], events[-1]
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    assert all(set(t) == {"token", "index"} and t["token"] for t in tokens)
    assert done["done"] is True
    assert done["total_tokens"] == 16 and done["finish_reason"] == "length"
    assert done["duration_ms"] > 0
    assert done["request_id"] == r.headers["x-request-id"]
    assert len(tokens) <= 16 and text_of(events).strip()


def test_b43_state_goes_idle_busy_idle(worker: WorkerProc) -> None:
    def state() -> str:
        return httpx.get(f"{worker.url}/v1/health").json()["state"]

    assert state() == "idle"
    with httpx.stream("POST", f"{worker.url}/v1/inference", headers=worker.headers, timeout=60,
                      json={"prompt": LONG_PROMPT, "max_tokens": 60, "temperature": 0}) as r:
        lines = r.iter_lines()
        next(lines)
        assert state() == "busy"
        for _ in lines:
            pass
    assert state() == "idle"


def test_b43_chat_messages_apply_the_models_template(worker: WorkerProc) -> None:
    _, chat = stream_events(worker, messages=[{"role": "user", "content": "Hi"}],
                            max_tokens=8, temperature=0)
    _, plain = stream_events(worker, prompt="Hi", max_tokens=8, temperature=0)
    # SmolLM2's template adds a system turn and <|im_start|> markers around "Hi".
    assert chat[-1]["prompt_tokens"] >= 20 > plain[-1]["prompt_tokens"]
    assert text_of(chat) != text_of(plain)


def test_b43_multi_turn_history_is_sent_to_the_model(worker: WorkerProc) -> None:
    history = [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Nice to meet you, Ada."},
        {"role": "user", "content": "What is my name?"},
    ]
    _, events = stream_events(worker, messages=history, max_tokens=4, temperature=0)
    _, last_only = stream_events(worker, messages=history[-1:], max_tokens=4, temperature=0)
    # Both earlier turns reach the model: each adds its text plus the template's markers.
    assert events[-1]["prompt_tokens"] >= last_only[-1]["prompt_tokens"] + 20


def test_b43_non_stream_returns_one_json_body(worker: WorkerProc) -> None:
    r = infer(worker, prompt="The capital of France is", max_tokens=8, temperature=0,
              stream=False)
    assert r.status_code == 200
    body = r.json()
    assert body["total_tokens"] == 8 and body["finish_reason"] == "length"
    assert "Paris" in body["text"]
    assert body["request_id"] == r.headers["x-request-id"]


def test_b43_client_request_id_is_used(worker: WorkerProc) -> None:
    r = httpx.post(f"{worker.url}/v1/inference", headers={**worker.headers,
                   "X-Request-Id": "my-req-1"}, json={"prompt": "Hi", "max_tokens": 2,
                   "stream": False}, timeout=60)
    assert r.headers["x-request-id"] == "my-req-1" and r.json()["request_id"] == "my-req-1"


def test_b43_stop_string_ends_generation_and_is_not_emitted(worker: WorkerProc) -> None:
    _, free = stream_events(worker, prompt="Once upon a time", max_tokens=30, temperature=0)
    full = text_of(free)
    stop = full.strip().split()[3]  # a word the model will produce
    _, events = stream_events(worker, prompt="Once upon a time", max_tokens=30, temperature=0,
                              stop=[stop])
    text = text_of(events)
    assert events[-1]["finish_reason"] == "stop"
    assert stop not in text
    assert full.startswith(text) and full[len(text):].startswith(stop)


def test_b47_same_seed_and_temperature_zero_give_same_tokens(worker: WorkerProc) -> None:
    body = {"prompt": "Once upon a time, in a hive", "max_tokens": 24, "temperature": 0,
            "seed": 7}
    first = [e.get("token") for e in stream_events(worker, **body)[1][:-1]]
    second = [e.get("token") for e in stream_events(worker, **body)[1][:-1]]
    assert first == second and len(first) > 5


def test_b47_same_seed_at_temperature_gives_same_text(worker: WorkerProc) -> None:
    body = {"prompt": "Name a colour:", "max_tokens": 24, "temperature": 1.2, "seed": 1234}
    runs = {text_of(stream_events(worker, **body)[1]) for _ in range(2)}
    assert len(runs) == 1
    others = {text_of(stream_events(worker, **{**body, "seed": s})[1]) for s in (1, 2, 3)}
    assert len(others | runs) > 1, "seed has no effect on sampling"


# ---------------------------------------------------------------- B39: one error shape


def assert_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "Hi", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "Hi", "temperature": 3}, "temperature"),
        ({"prompt": "Hi", "top_p": 0}, "top_p"),
        ({"prompt": "Hi", "messages": [{"role": "user", "content": "x"}]}, "prompt"),
        ({}, "prompt"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
        ({"prompt": "Hi", "unknown": 1}, "unknown"),
    ],
)
def test_b39_invalid_body_gets_a_400_naming_the_field(
    worker: WorkerProc, body: dict, field: str
) -> None:
    err = assert_error(infer(worker, **body), 400, "INVALID_REQUEST")
    assert field in err["message"]
    assert infer(worker, prompt="Hi", max_tokens=2, stream=False).status_code == 200


def test_b39_malformed_json_is_a_clear_400(worker: WorkerProc) -> None:
    r = httpx.post(f"{worker.url}/v1/inference", content=b'{"prompt": "Hi",',
                   headers={**worker.headers, "content-type": "application/json"})
    err = assert_error(r, 400, "INVALID_REQUEST")
    assert "not valid JSON" in err["message"]
    assert infer(worker, prompt="Hi", max_tokens=2, stream=False).status_code == 200


def test_b39_ten_megabyte_prompt_is_refused_and_worker_keeps_serving(worker: WorkerProc) -> None:
    err = assert_error(infer(worker, prompt="bee " * 2_500_000), 413, "REQUEST_TOO_LARGE")
    assert err["details"]["limit"] == 4 * 1024 * 1024
    assert infer(worker, prompt="Hi", max_tokens=2, stream=False).status_code == 200


def test_b39_prompt_longer_than_context_is_refused(worker: WorkerProc) -> None:
    err = assert_error(infer(worker, prompt="bee " * 3000, max_tokens=10), 400,
                       "PROMPT_TOO_LONG")
    assert err["details"]["ctx_size"] == 2048
    assert err["details"]["prompt_tokens"] > 2048 - 10


def test_b39_unknown_route_and_wrong_method(worker: WorkerProc) -> None:
    assert_error(httpx.get(f"{worker.url}/v1/nope", headers=worker.headers), 404, "NOT_FOUND")
    assert_error(httpx.get(f"{worker.url}/v1/inference", headers=worker.headers), 405,
                 "METHOD_NOT_ALLOWED")


# ---------------------------------------------------------------- B22 auth


def test_b22_health_needs_no_key(worker: WorkerProc) -> None:
    body = httpx.get(f"{worker.url}/v1/health").json()
    assert body["status"] == "ok" and body["api_version"] == "1" and body["version"]


@pytest.mark.parametrize("path", ["/v1/ready", "/v1/loading/progress"])
def test_b22_missing_and_wrong_key_are_refused(worker: WorkerProc, path: str) -> None:
    assert_error(httpx.get(f"{worker.url}{path}"), 401, "MISSING_API_KEY")
    assert_error(httpx.get(f"{worker.url}{path}", headers={"Authorization": "Bearer nope"}),
                 401, "INVALID_API_KEY")


def test_b22_inference_shutdown_and_cancel_need_the_key(worker: WorkerProc) -> None:
    assert_error(httpx.post(f"{worker.url}/v1/inference", json={"prompt": "x"}), 401,
                 "MISSING_API_KEY")
    assert_error(httpx.post(f"{worker.url}/v1/admin/shutdown"), 401, "MISSING_API_KEY")
    assert_error(httpx.delete(f"{worker.url}/v1/inference/abc"), 401, "MISSING_API_KEY")
    assert httpx.get(f"{worker.url}/v1/health").json()["state"] == "idle"


def test_b22_key_never_appears_in_the_log(worker: WorkerProc) -> None:
    httpx.get(f"{worker.url}/v1/ready", headers={"Authorization": "Bearer wrong-key-xyz"})
    infer(worker, prompt="Hi", max_tokens=2, stream=False)
    log = worker.log()
    assert "ready in" in log
    assert worker.key not in log and "wrong-key-xyz" not in log
