"""B107: no input makes the worker answer 5xx. Property-based, against a real worker process.

Hypothesis draws requests for every route the worker has, mixing valid values with junk
(wrong types, out-of-range numbers, odd Unicode, bad grammars, bad ids, raw bytes) and fails
on any 5xx status or any stream that ends in a 5xx-class error. Derandomized and bounded, so
CI runs the same examples every time in bounded time.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import httpx
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from rbee_agent.protocol import HTTP_STATUS, ErrorCode
from tests.support import WorkerProc

FUZZ = settings(max_examples=50, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

junk = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                 st.text(max_size=20), st.lists(st.integers(), max_size=3),
                 st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
text = st.text(alphabet=st.characters(codec=None, exclude_categories=[]), max_size=60)
grammars = st.one_of(text, st.sampled_from([
    'root ::= "yes" | "no"', "root ::= (", 'root ::= root "a"', "root ::= ",
    'root ::= [^\\x00-\\U0010FFFF]', 'root ::= "\\x00"', 'foo ::= "a"', 'root ::= [a-z]+',
]))
roles = st.sampled_from(["system", "user", "assistant"])
valid_fields: dict[str, st.SearchStrategy[Any]] = {
    "max_tokens": st.integers(1, 4),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(0, 1000),
    "min_p": st.floats(0, 1),
    "repeat_penalty": st.floats(0.01, 2),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "seed": st.integers(0, 2**32 - 1),
    "stop": st.lists(text.filter(bool), max_size=3),
    "stream": st.booleans(),
    "grammar": grammars.filter(bool),
    "top_logprobs": st.integers(0, 20),
    "ignore_eos": st.booleans(),
}
prompts = st.one_of(
    st.fixed_dictionaries({"prompt": text}),
    st.fixed_dictionaries({"messages": st.lists(
        st.fixed_dictionaries({"role": roles, "content": text}), min_size=1, max_size=4)}),
)
valid_bodies = st.tuples(prompts, st.fixed_dictionaries({}, optional=valid_fields)).map(
    lambda parts: {**parts[0], "max_tokens": 2, **parts[1]})
junk_fields = ["prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "min_p",
               "repeat_penalty", "presence_penalty", "frequency_penalty", "seed", "stop",
               "stream", "grammar", "top_logprobs", "ignore_eos", "request_id", "extra"]
# Mostly valid requests, which run real generations, and as many with one field spoilt.
bodies = st.one_of(valid_bodies, st.tuples(valid_bodies, st.sampled_from(junk_fields), junk)
                   .map(lambda t: {**t[0], t[1]: t[2]}))
# Any header value an HTTP client can send: printable Latin-1, no spaces.
header_ids = st.one_of(st.none(), st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0xFF), min_size=1, max_size=40,
).map(lambda s: s.encode("latin-1")))


def assert_no_server_error(r: httpx.Response, what: str) -> None:
    assert r.status_code < 500, f"{what} -> {r.status_code}: {r.text[:500]}"
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        for line in r.text.splitlines():
            if line.startswith("data: {") and '"error"' in line:
                code = json.loads(line[6:])["error"]["code"]
                assert HTTP_STATUS.get(ErrorCode(code), 500) < 500, f"{what} -> {line}"


@FUZZ
@given(body=bodies, request_id=header_ids)
def test_b107_no_inference_body_makes_a_5xx(worker: WorkerProc, body: dict[str, Any],
                                            request_id: bytes | None) -> None:
    headers: dict[str, Any] = dict(worker.headers)
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    content = json.dumps(body).encode()  # lone surrogates become \\ud800 escapes, as on the wire
    r = httpx.post(f"{worker.url}/v1/inference", content=content, timeout=120,
                   headers={**headers, "content-type": "application/json"})
    event(f"status {r.status_code}")
    assert_no_server_error(r, f"POST /v1/inference {content[:300]!r}")


@FUZZ
@given(raw=st.binary(max_size=200), content_type=st.sampled_from(
    ["application/json", "text/plain", "application/x-www-form-urlencoded", ""]))
def test_b107_no_raw_body_makes_a_5xx(worker: WorkerProc, raw: bytes, content_type: str) -> None:
    r = httpx.post(f"{worker.url}/v1/inference", content=raw, timeout=60,
                   headers={**worker.headers, "content-type": content_type})
    assert_no_server_error(r, f"POST /v1/inference raw {raw[:100]!r}")


@FUZZ
@given(method=st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH"]),
       path=st.sampled_from(["/v1/health", "/v1/ready", "/v1/loading/progress",
                             "/v1/inference", "/v1/inference/{}", "/{}", "/v1/{}"]),
       part=text)
def test_b107_no_route_or_method_makes_a_5xx(worker: WorkerProc, method: str, path: str,
                                             part: str) -> None:
    url = worker.url + path.format(quote(part.encode("utf-8", "surrogatepass"), safe=""))
    r = httpx.request(method, url, headers=worker.headers, timeout=60)
    assert_no_server_error(r, f"{method} {url}")
