"""The agent's OpenAI-compatible API with the official `openai` SDK, against a real agent and
worker on the bundled model (B180-B185, B189, B193)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.agent_support import AgentProc, start_agent
from tests.hub_server import Blob, TestHub
from tests.support import LONG_PROMPT, bundled_model_path

MODEL = "smollm2-135m"
HELLO = [{"role": "user", "content": "Say hello in five words."}]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 24},
                   "age": {"type": "integer"},
                   "city": {"type": "string", "enum": ["Paris", "Lima", "Oslo"]}},
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}


def sdk(agent: AgentProc, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{agent.url}/openai/v1", api_key=key or agent.key,
                         max_retries=0, timeout=120)


def worker_of(agent: AgentProc) -> dict[str, Any]:
    """The agent's one worker (an OpenAI request starts it if none runs yet)."""
    if not agent.get("/v1/workers").json()["workers"]:
        sdk(agent).completions.create(model=MODEL, prompt="Hi", max_tokens=1)
    workers = agent.get("/v1/workers").json()["workers"]
    assert len(workers) == 1, workers
    return dict(workers[0])


# ------------------------------------------------------------------ B180


def test_b180_models_in_openai_shape_beside_rbees_catalog(agent: AgentProc) -> None:
    client = sdk(agent)
    listed = client.models.list()
    assert [m.id for m in listed] == [MODEL]
    one = client.models.retrieve(MODEL)
    assert (one.id, one.object, one.owned_by) == (MODEL, "model", "rbee")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    native = agent.get("/v1/models").json()  # rbee's own route keeps rbee's shape
    assert [m["id"] for m in native["models"]] == [MODEL] and "data" not in native


# ------------------------------------------------------------------ B181, B182


def test_b181_streaming_chat_matches_the_reply_without_streaming(agent: AgentProc) -> None:
    client = sdk(agent)
    settings: dict[str, Any] = {"model": MODEL, "messages": HELLO, "max_tokens": 24,
                                "temperature": 0, "seed": 7}
    reply = client.chat.completions.create(**settings)
    stream = client.chat.completions.create(**settings, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert text and text == reply.choices[0].message.content  # greedy: the same tokens
    assert usage.completion_tokens == reply.usage.completion_tokens  # type: ignore[union-attr]
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert worker_of(agent)["state"] == "idle"


def test_b181_reply_has_usage_and_the_request_id(agent: AgentProc) -> None:
    raw = sdk(agent).chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "system", "content": "You answer briefly."}, *HELLO],
        max_tokens=12, extra_headers={"X-Request-Id": "abc123"})
    reply = raw.parse()
    assert raw.headers["x-request-id"] == "abc123" and reply.id == "chatcmpl-abc123"
    assert reply.object == "chat.completion" and reply.model == MODEL
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 12
    assert reply.usage.prompt_tokens > 5


def test_b182_text_completion_streamed_and_not(agent: AgentProc) -> None:
    client = sdk(agent)
    reply = client.completions.create(model=MODEL, prompt="The capital of France is",
                                      max_tokens=8, temperature=0)
    assert reply.object == "text_completion" and reply.choices[0].text
    assert reply.usage is not None and reply.usage.completion_tokens <= 8
    parts = list(client.completions.create(model=MODEL, prompt="The capital of France is",
                                           max_tokens=8, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == reply.choices[0].text
    assert parts[-1].choices[0].finish_reason == reply.choices[0].finish_reason


# ------------------------------------------------------------------ B183


def test_b183_json_schema_reply_validates(agent: AgentProc) -> None:
    client = sdk(agent)
    for seed in (1, 2, 3):
        reply = client.chat.completions.create(
            model=MODEL, max_tokens=200, temperature=0.9, seed=seed,
            messages=[{"role": "user", "content": "Describe a person."}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": "person", "schema": PERSON}})
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content or ""), PERSON)


def test_b183_json_object_reply_parses(agent: AgentProc) -> None:
    reply = sdk(agent).chat.completions.create(
        model=MODEL, max_tokens=200, temperature=0, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Return a JSON object with a name and an age."}])
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)


# ------------------------------------------------------------------ B184


def test_b184_errors_are_the_sdks_exceptions(agent: AgentProc) -> None:
    with pytest.raises(openai.AuthenticationError):
        sdk(agent, key="not-the-key").chat.completions.create(model=MODEL, messages=HELLO)
    with pytest.raises(openai.NotFoundError) as missing:
        sdk(agent).chat.completions.create(model="gpt-4o", messages=HELLO)
    assert missing.value.code == "model_not_found" and MODEL in missing.value.message
    with pytest.raises(openai.BadRequestError) as many:
        sdk(agent).chat.completions.create(model=MODEL, messages=HELLO, n=3)
    assert many.value.param == "n" and "one choice" in many.value.message
    with pytest.raises(openai.BadRequestError) as hot:
        sdk(agent).completions.create(model=MODEL, prompt="x", temperature=5)
    assert hot.value.param == "temperature"


def test_b184_error_body_is_exactly_openais_shape(agent: AgentProc) -> None:
    for path, body in (("/openai/v1/chat/completions", {"model": MODEL}),
                       ("/openai/v1/embeddings", {"model": MODEL, "input": "x"})):
        reply = agent.post(path, json=body)
        assert reply.status_code in (400, 404)
        assert set(reply.json()) == {"error"}
        assert set(reply.json()["error"]) == {"message", "type", "code", "param"}


# ------------------------------------------------------------------ B189


def freed_at_once(agent: AgentProc, worker_id: str) -> None:
    """1500 tokens take many seconds here; a request whose client left ends at once."""
    start = time.monotonic()
    while agent.get(f"/v1/workers/{worker_id}").json()["active_requests"]:
        assert time.monotonic() - start < 2.0, "the worker kept generating for a gone client"
        time.sleep(0.02)
    agent.wait_state(worker_id, "idle", timeout=2)


def test_b189_a_client_that_hangs_up_cancels_the_generation(agent: AgentProc) -> None:
    worker = worker_of(agent)
    stream = sdk(agent).completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=1500,
                                            temperature=0, stream=True)
    for seen, _ in enumerate(stream):
        if seen == 3:
            break
    stream.close()
    freed_at_once(agent, worker["id"])
    with pytest.raises(openai.APITimeoutError):  # not streaming: the client gives up
        sdk(agent).with_options(timeout=1.0).completions.create(
            model=MODEL, prompt=LONG_PROMPT, max_tokens=1500, temperature=0)
    freed_at_once(agent, worker["id"])


# ------------------------------------------------------------------ B185, B193


def test_b185_first_requests_start_one_worker_and_wait_for_it(tmp_path: Path) -> None:
    # B193: with no max_tokens, 150 does not fit a 160-token context beside the prompt;
    # the request gets the room the context has left instead of an error.
    agent = start_agent(tmp_path / "fresh", **{"worker-ctx-size": "160", "worker-slots": "2",
                                               "openai-default-max-tokens": "150"})
    try:
        assert agent.get("/v1/workers").json()["workers"] == []
        replies: list[Any] = []

        def ask() -> None:
            replies.append(sdk(agent).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Tell me about bees."}]))

        threads = [threading.Thread(target=ask) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert len(replies) == 2, agent.log()[-2000:]
        worker = worker_of(agent)  # one worker for both first requests
        assert worker["model_id"] == MODEL and worker["state"] == "idle"
        for reply in replies:
            assert reply.usage.prompt_tokens + reply.usage.completion_tokens <= 160
            assert reply.usage.completion_tokens > 0
        # A model reference works as well as a catalog name.
        file_ref = "file://" + agent.get("/v1/models").json()["models"][0]["local_path"]
        reply = sdk(agent).completions.create(model=file_ref, prompt="Hi", max_tokens=3)
        assert reply.model == file_ref and reply.usage is not None
    finally:
        agent.stop()


def test_b184_a_busy_worker_is_a_retryable_503(agent: AgentProc) -> None:
    """All slots busy (and no queue): 503 with Retry-After, which the SDK retries."""
    worker_of(agent)
    body = {"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 1500, "temperature": 0}
    with httpx.stream("POST", f"{agent.url}/openai/v1/completions", headers=agent.headers,
                      json={**body, "stream": True}, timeout=60) as long:
        lines = long.iter_lines()  # keep a reference: a collected generator closes it
        next(lines)  # a token arrived: the one slot is taken
        second = agent.post("/openai/v1/completions", json={**body, "max_tokens": 2})
    if second.status_code == 200:  # a worker with a queue (issue 13) serves it in turn
        return
    assert second.status_code == 503, second.text
    assert int(second.headers["retry-after"]) >= 1  # about when a slot frees up
    assert second.json()["error"]["type"] == "server_error"


def test_b185_an_hf_reference_is_downloaded_then_served(tmp_path: Path) -> None:
    with TestHub() as hub:
        hub.add_repo("acme/bees-GGUF", {"bees-Q4_1.gguf": Blob(bundled_model_path())})
        agent = start_agent(tmp_path / "hub", env={"HF_ENDPOINT": hub.url, "HF_TOKEN": "",
                                                   "HUGGING_FACE_HUB_TOKEN": ""},
                            **{"download-reserve-mb": "0"})
        try:
            reply = sdk(agent).chat.completions.create(
                model="hf:acme/bees-GGUF", messages=HELLO, max_tokens=4)
            assert reply.model == "hf:acme/bees-GGUF" and reply.choices[0].message.content
            catalog = [m["id"] for m in agent.get("/v1/models").json()["models"]]
            assert len(catalog) == 2 and MODEL in catalog  # the bundled one and the new one
            assert len(agent.get("/v1/workers").json()["workers"]) == 1
            again = sdk(agent).chat.completions.create(  # by its new catalog name: warm
                model=next(m for m in catalog if m != MODEL), messages=HELLO, max_tokens=4)
            assert again.choices[0].message.content
            assert len(agent.get("/v1/workers").json()["workers"]) == 1
        finally:
            agent.stop()
