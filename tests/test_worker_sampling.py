"""B101 sampling in llama.cpp, B106 cheap checks first, B107 ids and empty prompts: a real
worker over HTTP."""

from __future__ import annotations

import json
import math

import httpx
import pytest

from tests.support import LONG_PROMPT, WorkerProc, sse_data, sse_events


def events_of(worker: WorkerProc, **body: object) -> list[dict]:
    with httpx.stream("POST", f"{worker.url}/v1/inference", json=body,
                      headers=worker.headers, timeout=60) as r:
        assert r.status_code == 200, r.read()
        return sse_events(r)


def text_of(events: list[dict]) -> str:
    return "".join(e["token"] for e in events if "token" in e)


def error_of(r: httpx.Response, status: int = 400, code: str = "INVALID_REQUEST") -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code, error
    return dict(error)


def post(worker: WorkerProc, body: object, **headers: str) -> httpx.Response:
    return httpx.post(f"{worker.url}/v1/inference", json=body, timeout=60,
                      headers={**worker.headers, **headers})


def test_b101_grammar_constrains_the_output(worker: WorkerProc) -> None:
    for seed in (1, 2, 3):
        events = events_of(worker, prompt="Is the sky green? Answer:", max_tokens=8,
                           temperature=1.0, seed=seed, grammar='root ::= "yes" | "no"')
        assert text_of(events) in ("yes", "no")
        assert events[-1]["finish_reason"] == "stop"


def test_b101_a_grammar_that_allows_nothing_ends_the_reply_and_the_worker_lives(
    worker: WorkerProc,
) -> None:
    events = events_of(worker, prompt="x", max_tokens=8, grammar='root ::= [^\\x00-\\U0010FFFF]')
    assert events[-1]["finish_reason"] == "stop" and events[-1]["total_tokens"] == 0
    # Complete grammar while the end of text is forbidden: nothing is left to sample.
    events = events_of(worker, prompt="x", max_tokens=8, grammar='root ::= "a"',
                       ignore_eos=True)
    assert text_of(events) == "a" and events[-1]["finish_reason"] == "stop"
    assert post(worker, {"prompt": "Hi", "max_tokens": 2, "stream": False}).status_code == 200


def test_b101_bad_grammar_is_a_400_before_anything_runs(worker: WorkerProc) -> None:
    for grammar in ("root ::= (", 'foo ::= "a"', 'root ::= root "a"'):
        error = error_of(post(worker, {"prompt": "x", "grammar": grammar}))
        assert "grammar" in error["message"] and error["details"]["hint"]


def test_b101_top_logprobs_come_with_every_token(worker: WorkerProc) -> None:
    events = events_of(worker, prompt="The capital of France is", max_tokens=5,
                       temperature=0, top_logprobs=3)
    tokens = [e for e in events if "index" in e]
    assert len(tokens) == 5 and events[-1]["total_tokens"] == 5
    for event in tokens:
        top = event["top_logprobs"]
        assert len(top) == 3 and all(set(t) == {"token", "logprob"} for t in top)
        values = [t["logprob"] for t in top]
        assert values == sorted(values, reverse=True) and values[0] <= 0
        assert sum(math.exp(v) for v in values) <= 1.0001
        # Greedy picks the most likely token.
        assert event["logprob"] == pytest.approx(values[0], abs=1e-4)
    plain = events_of(worker, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert all("logprob" not in e for e in plain)
    assert text_of(plain) == text_of(events)


def test_b101_ignore_eos_generates_exactly_max_tokens(worker: WorkerProc) -> None:
    chat = [{"role": "user", "content": "Say hi."}]
    short = events_of(worker, messages=chat, max_tokens=200, temperature=0)
    assert short[-1]["finish_reason"] == "stop" and short[-1]["total_tokens"] < 200
    full = events_of(worker, messages=chat, max_tokens=200, temperature=0, ignore_eos=True)
    assert full[-1]["finish_reason"] == "length" and full[-1]["total_tokens"] == 200


@pytest.mark.parametrize("setting", [{"repeat_penalty": 1.5}, {"frequency_penalty": 2.0},
                                     {"presence_penalty": 2.0}])
def test_b101_penalties_reach_the_sampler(worker: WorkerProc, setting: dict) -> None:
    body = {"prompt": "Once upon a time, there was a", "max_tokens": 32, "temperature": 0}
    plain = text_of(events_of(worker, **body))
    assert text_of(events_of(worker, **body, **setting)) != plain


def test_b101_top_k_one_is_greedy_whatever_the_temperature(worker: WorkerProc) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 12}
    greedy = text_of(events_of(worker, **body, temperature=0))
    assert text_of(events_of(worker, **body, temperature=1.5, top_k=1, seed=5)) == greedy


@pytest.mark.parametrize(("body", "field"), [
    ({"top_k": -1}, "top_k"), ({"top_k": 1001}, "top_k"), ({"min_p": 1.5}, "min_p"),
    ({"repeat_penalty": 0}, "repeat_penalty"), ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"), ({"top_logprobs": 21}, "top_logprobs"),
    ({"grammar": ""}, "grammar"), ({"grammar": "x" * 70_000}, "grammar"),
    ({"request_id": "has space"}, "request_id"), ({"request_id": "a/b"}, "request_id"),
    ({"request_id": "tab\there"}, "request_id"), ({"request_id": "x" * 129}, "request_id"),
])
def test_b101_b107_out_of_bounds_settings_are_a_400_naming_the_field(
    worker: WorkerProc, body: dict, field: str
) -> None:
    assert field in error_of(post(worker, {"prompt": "Hi", **body}))["message"]


def test_b107_empty_prompt_is_a_400_not_a_crash(worker: WorkerProc) -> None:
    for stream in (False, True):
        error = error_of(post(worker, {"prompt": "", "stream": stream}))
        assert "prompt" in error["message"] and "empty" in error["message"]


def test_b107_request_ids_that_cannot_be_a_header_are_a_400(worker: WorkerProc) -> None:
    raw = b'{"prompt": "Hi", "max_tokens": 1, "request_id": "a\\ud800b"}'
    r = httpx.post(f"{worker.url}/v1/inference", content=raw,
                   headers={**worker.headers, "content-type": "application/json"})
    error_of(r)
    for bad in ("caf\u00e9".encode("latin-1"), b"a b", b"x" * 129):
        r = httpx.post(f"{worker.url}/v1/inference", json={"prompt": "Hi"},
                       headers={**worker.headers, "X-Request-Id": bad})  # type: ignore[dict-item]
        assert "X-Request-Id" in error_of(r)["message"]
    ok = post(worker, {"prompt": "Hi", "max_tokens": 1, "stream": False,
                       "request_id": "my.id:1"})
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "my.id:1"


def test_b106_huge_chat_is_refused_by_the_schema_at_once(worker: WorkerProc) -> None:
    chat = [{"role": "user", "content": "hi"}] * 20_000
    error = error_of(post(worker, {"messages": chat, "stream": False}))
    assert "messages" in error["message"]
    big = [{"role": "user", "content": "x" * 1_000_001}]
    assert "messages.0.content" in error_of(post(worker, {"messages": big}))["message"]


def test_b106_prompt_far_too_long_is_refused_without_tokenizing(worker: WorkerProc) -> None:
    error = error_of(post(worker, {"prompt": "bee " * 900_000}), 400, "PROMPT_TOO_LONG")
    assert error["details"]["estimated"] is True and "at least" in error["message"]
    exact = error_of(post(worker, {"prompt": "bee " * 3000}), 400, "PROMPT_TOO_LONG")
    assert exact["details"]["estimated"] is False


def test_b106_too_long_prompt_never_takes_a_queue_place(worker: WorkerProc) -> None:
    body = {"prompt": LONG_PROMPT, "max_tokens": 1500, "temperature": 0}
    with httpx.stream("POST", f"{worker.url}/v1/inference", json=body,
                      headers=worker.headers, timeout=60) as r:
        rid = r.headers["x-request-id"]
        frames = sse_data(r)
        next(frames)
        error_of(post(worker, {"prompt": "bee " * 3000}), 400, "PROMPT_TOO_LONG")
        health = httpx.get(f"{worker.url}/v1/health").json()
        assert health["queued"] == 0 and health["slots_busy"] == 1
        httpx.delete(f"{worker.url}/v1/inference/{rid}", headers=worker.headers)
        assert json.loads([f for f in frames if f != "[DONE]"][-1])["finish_reason"] == \
            "cancelled"
