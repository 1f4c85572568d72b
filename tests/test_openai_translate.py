"""OpenAI requests into InferenceRequest and worker frames into OpenAI replies, without a
model (B181-B184, B194). The same paths run against a real worker in test_openai_agent.py."""

from __future__ import annotations

import json
from typing import Any

import pytest

from rbee_agent.openai.errors import error_headers, openai_error, openai_status
from rbee_agent.openai.grammar import grammar_for
from rbee_agent.openai.translate import (
    ReplyCollector,
    Shape,
    StreamTranslator,
    chat_inference,
    completion_inference,
    parse,
)
from rbee_agent.openai.wire import ChatCompletionRequest, CompletionRequest, ResponseFormat
from rbee_agent.protocol import ErrorCode, RbeeError


def chat(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse(ChatCompletionRequest, json.dumps(body).encode())


def refused(call: Any) -> RbeeError:
    with pytest.raises(RbeeError) as caught:
        call()
    assert caught.value.code == ErrorCode.INVALID_REQUEST
    return caught.value


def frame(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


def chunks(out: bytes) -> list[dict[str, Any] | str]:
    found: list[dict[str, Any] | str] = []
    for part in out.split(b"\n\n"):
        if part.startswith(b"data: "):
            data = part[6:].decode()
            found.append(data if data == "[DONE]" else json.loads(data))
        elif part:
            found.append(part.decode())
    return found


def shape(kind: str = "chat", **fields: Any) -> Shape:
    values: dict[str, Any] = {"kind": kind, "request_id": "r1", "completion_id": "chatcmpl-r1",
                              "created": 7, "model": "m", "stream": True,
                              "include_usage": False, "logprobs": False}
    values.update(fields)
    return Shape(**values)


TOKENS = [frame({"token": "Hel", "index": 0}), frame({"token": "lo", "index": 1})]
DONE = frame({"done": True, "total_tokens": 2, "prompt_tokens": 5, "duration_ms": 1.0,
              "finish_reason": "stop", "request_id": "r1"})


# ------------------------------------------------------------------ requests (B181, B182)


def test_b181_chat_fields_map_to_the_inference_request() -> None:
    body = chat(messages=[{"role": "developer", "content": "be brief"},
                          {"role": "user", "content": [{"type": "text", "text": "a"},
                                                       {"type": "text", "text": "b"}]},
                          {"role": "assistant", "content": "ok"}],
                max_tokens=9, max_completion_tokens=12, stop="END", seed=2**40 + 3,
                presence_penalty=0.5, frequency_penalty=-0.5, top_k=5, min_p=0.1,
                user="someone", store=False)
    request = chat_inference(body, 1024)
    assert [m.model_dump() for m in request.messages or []] == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": "ok"}]
    assert request.max_tokens == 12  # max_completion_tokens wins over the old name
    assert request.stop == ["END"] and request.seed == 3  # OpenAI seeds are 64-bit
    assert (request.presence_penalty, request.frequency_penalty) == (0.5, -0.5)
    assert (request.top_k, request.min_p, request.stream) == (5, 0.1, True)


def test_b181_openai_defaults_apply_when_fields_are_left_out() -> None:
    request = chat_inference(chat(seed=-1), 1024)
    assert (request.temperature, request.top_p, request.max_tokens) == (1.0, 1.0, 1024)
    assert request.seed is None and request.grammar is None and request.top_logprobs is None


def test_b182_completion_takes_one_prompt() -> None:
    body = parse(CompletionRequest, b'{"model": "m", "prompt": ["Once"], "max_tokens": 4}')
    request = completion_inference(body, 1024)
    assert (request.prompt, request.messages, request.max_tokens) == ("Once", None, 4)
    two = parse(CompletionRequest, b'{"model": "m", "prompt": ["a", "b"]}')
    assert refused(lambda: completion_inference(two, 1024)).details["param"] == "prompt"
    echo = parse(CompletionRequest, b'{"model": "m", "prompt": "a", "echo": true}')
    assert refused(lambda: completion_inference(echo, 1024)).details["param"] == "echo"


# ------------------------------------------------------------------ refusals (B184)


@pytest.mark.parametrize(("fields", "param"), [
    ({"n": 2}, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"logit_bias": {"42": 3}}, "logit_bias"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "messages.0.content.0"),
])
def test_b184_what_rbee_cannot_honour_is_refused_by_name(fields: dict[str, Any],
                                                         param: str) -> None:
    err = refused(lambda: chat_inference(chat(**fields), 1024))
    assert err.details["param"] == param
    assert openai_status(err) == 400


def test_b184_harmless_defaults_of_unsupported_fields_pass() -> None:
    chat_inference(chat(n=1, tools=[], tool_choice="none", logit_bias={},
                        modalities=["text"]), 1024)


def test_b184_a_bad_field_is_named_in_param() -> None:
    err = refused(lambda: parse(ChatCompletionRequest,
                                b'{"model": "m", "messages": []}'))
    assert err.details["param"] == "messages"
    err = refused(lambda: parse(ChatCompletionRequest,
                                b'{"model": "m", "messages": [{"role": "user", "content": "x"}]'
                                b', "temperature": 3}'))
    assert err.details["param"] == "temperature"
    assert "not valid JSON" in refused(lambda: parse(ChatCompletionRequest, b"{nope")).message


def test_b184_errors_have_openai_shape_and_retry_after() -> None:
    missing = RbeeError(ErrorCode.MODEL_NOT_FOUND, "No model 'x'", hint="List them",
                        details={"param": "model"})
    assert openai_error(missing) == {"error": {
        "message": "No model 'x'. List them", "type": "invalid_request_error",
        "code": "model_not_found", "param": "model"}}
    assert openai_status(RbeeError(ErrorCode.INVALID_MODEL_REF, "bad")) == 404
    full = RbeeError(ErrorCode.QUEUE_FULL, "full", details={"retry_after_s": 2.4})
    assert openai_status(full) == 503 and error_headers(full) == {"Retry-After": "2"}
    assert openai_error(full)["error"]["type"] == "server_error"
    assert error_headers(RbeeError(ErrorCode.INVALID_REQUEST, "x")) == {}


# ------------------------------------------------------------------ grammar (B183)


def test_b183_response_format_becomes_a_grammar() -> None:
    assert grammar_for(None) is None
    assert grammar_for(ResponseFormat(type="text")) is None
    any_json = grammar_for(ResponseFormat(type="json_object"))
    assert any_json is not None and "root" in any_json and "object" in any_json
    schema = {"type": "object", "properties": {"age": {"type": "integer"}},
              "required": ["age"]}
    fmt = ResponseFormat.model_validate({"type": "json_schema",
                                         "json_schema": {"name": "p", "schema": schema}})
    enforced = grammar_for(fmt)
    assert enforced is not None and '"\\"age\\""' in enforced
    request = chat_inference(chat(response_format=fmt.model_dump(by_alias=True)), 64)
    assert request.grammar == enforced


def test_b183_a_schema_that_cannot_be_enforced_is_a_400() -> None:
    fmt = ResponseFormat.model_validate({"type": "json_schema", "json_schema": {
        "name": "p", "schema": {"$ref": "#/definitions/missing"}}})
    err = refused(lambda: grammar_for(fmt))
    assert err.details["param"] == "response_format.json_schema.schema"
    err = refused(lambda: grammar_for(ResponseFormat(type="json_schema")))
    assert err.details["param"] == "response_format.json_schema"
    bounded = ResponseFormat.model_validate({"type": "json_schema", "json_schema": {
        "name": "p", "schema": {"type": "object", "properties": {
            "tags": {"type": "array", "items": {"type": "integer", "maximum": 9}}}}}})
    err = refused(lambda: grammar_for(bounded))
    assert err.details["keyword"] == "maximum" and "/properties/tags/items" in err.message


# ------------------------------------------------------------------ replies (B181, B182)


def test_b181_stream_chunks_role_first_reason_last_then_usage() -> None:
    translator = StreamTranslator(shape(include_usage=True))
    out = b"".join(translator.translate(b) for b in [*TOKENS, DONE, frame("[DONE]")])
    got = chunks(out)
    assert got[-1] == "[DONE]"
    first, second, last, usage = got[:4]
    assert isinstance(first, dict) and isinstance(second, dict)
    assert first["object"] == "chat.completion.chunk" and first["id"] == "chatcmpl-r1"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "Hel"}
    assert second["choices"][0]["delta"] == {"content": "lo"}
    assert first["choices"][0]["finish_reason"] is None
    assert isinstance(last, dict) and last["choices"][0] == {
        "index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert isinstance(usage, dict) and usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


def test_b181_no_usage_chunk_unless_asked_and_a_queue_wait_is_a_comment() -> None:
    translator = StreamTranslator(shape())
    out = translator.translate(frame({"queued": 3}) + DONE + frame("[DONE]"))
    got = chunks(out)
    assert got[0] == ": queued, 3 ahead"
    assert isinstance(got[1], dict) and got[1]["choices"][0]["delta"] == {
        "role": "assistant", "content": ""}  # nothing generated: the role still comes
    assert got[2] == "[DONE]" and len(got) == 3


def test_b181_a_worker_error_mid_stream_is_raised() -> None:
    translator = StreamTranslator(shape())
    error = frame({"error": {"code": "WORKER_CRASHED", "message": "gone", "details": {}}})
    with pytest.raises(RbeeError) as caught:
        translator.translate(TOKENS[0] + error)
    assert caught.value.code == "WORKER_CRASHED"


def test_b182_text_completion_reply_collected() -> None:
    collector = ReplyCollector(shape("text", completion_id="cmpl-r1", stream=False))
    for batch in [*TOKENS, DONE, frame("[DONE]")]:
        collector.feed(batch)
    assert collector.body() == {
        "id": "cmpl-r1", "object": "text_completion", "created": 7, "model": "m",
        "choices": [{"index": 0, "text": "Hello", "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}


# ------------------------------------------------------------------ logprobs (B194)


def test_b194_logprobs_follow_the_worker_and_are_null_without_them() -> None:
    with_lp = frame({"token": "Hi", "index": 0, "logprob": -0.25,
                     "top_logprobs": [{"token": "Hi", "logprob": -0.25},
                                      {"token": "Yo", "logprob": -1.5}]})
    translator = StreamTranslator(shape(logprobs=True))
    got = chunks(translator.translate(with_lp + TOKENS[1]))
    assert isinstance(got[0], dict) and isinstance(got[1], dict)
    assert got[0]["choices"][0]["logprobs"] == {"content": [{
        "token": "Hi", "logprob": -0.25, "bytes": [72, 105],
        "top_logprobs": [{"token": "Hi", "logprob": -0.25, "bytes": [72, 105]},
                         {"token": "Yo", "logprob": -1.5, "bytes": [89, 111]}]}]}
    assert got[1]["choices"][0]["logprobs"] is None  # this frame carried none
    text = ReplyCollector(shape("text", stream=False, logprobs=True))
    for batch in (with_lp, DONE):
        text.feed(batch)
    assert text.body()["choices"][0]["logprobs"] == {
        "tokens": ["Hi"], "token_logprobs": [-0.25],
        "top_logprobs": [{"Hi": -0.25, "Yo": -1.5}], "text_offset": [0]}
    plain = ReplyCollector(shape(stream=False, logprobs=True))
    for batch in (*TOKENS, DONE):
        plain.feed(batch)
    assert plain.body()["choices"][0]["logprobs"] is None


def test_b194_logprobs_request_top_logprobs_from_the_worker() -> None:
    assert chat_inference(chat(logprobs=True, top_logprobs=3), 64).top_logprobs == 3
    assert chat_inference(chat(logprobs=True), 64).top_logprobs == 0
    body = parse(CompletionRequest, b'{"model": "m", "prompt": "a", "logprobs": 2}')
    assert completion_inference(body, 64).top_logprobs == 2
