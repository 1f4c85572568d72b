"""OpenAI requests into rbee's InferenceRequest, and a worker's token stream back into
OpenAI's replies (B181-B183).

The worker speaks rbee's protocol: `{"token", "index"}` per piece of text, then one
`{"done": true, …}`, then `[DONE]`. A stream becomes `chat.completion.chunk` (or
`text_completion`) chunks, one per token frame and written as soon as it arrives; a
non-streaming request is the same stream collected into one `chat.completion`. Chunk bytes
are put together from a precomputed head, so a token costs one small `json.dumps`.

Every chunk that carries text has `"finish_reason":null`; only the last one names the reason.
The role rides on the first text chunk instead of an empty chunk of its own (clients
accumulate deltas, so both read the same), which lets a relay tell text chunks apart by that
one marker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import ValidationError

from rbee_agent.openai.errors import from_rbee_body
from rbee_agent.openai.grammar import grammar_for
from rbee_agent.openai.wire import ChatCompletionRequest, CompletionRequest, Message, _Request
from rbee_agent.protocol import ChatMessage, ErrorCode, InferenceRequest, RbeeError

Kind = Literal["chat", "text"]
OPENAI_DEFAULT_TEMPERATURE = 1.0
OPENAI_DEFAULT_TOP_P = 1.0
_SEED_SPACE = 2**32

# Fields that would change the answer and that rbee cannot honour: refused, never ignored.
_UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "tools": ((None, []), "tool calling"),
    "functions": ((None, []), "function calling"),
    "tool_choice": ((None, "none", "auto"), "tool calling"),
    "function_call": ((None, "none", "auto"), "function calling"),
    "logit_bias": ((None, {}), "logit_bias"),
    "audio": ((None,), "audio output"),
    "prediction": ((None,), "predicted outputs"),
    "modalities": ((None, ["text"]), "modalities other than text"),
}


def invalid(message: str, param: str | None, hint: str | None = None) -> RbeeError:
    return RbeeError(ErrorCode.INVALID_REQUEST, message, hint=hint,
                     details={"param": param} if param else {})


R = TypeVar("R", bound=_Request)


def parse(model: type[R], raw: bytes) -> R:
    """The body as `model`, or a 400 naming the first bad field in `param`."""
    if not raw.strip():
        raise invalid("The request body is empty; send a JSON object", None)
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            raise invalid(f"The request body is not valid JSON: {first.get('msg', '')}",
                          None) from None
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise invalid(f"Invalid request: {where or 'body'}: {first.get('msg', '')}",
                      where or None) from None


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Shape:
    """How the reply is written: which object, for which model name, with what extras."""

    kind: Kind
    request_id: str
    completion_id: str
    created: int
    model: str
    stream: bool
    include_usage: bool
    logprobs: bool


def _check_supported(body: _Request) -> None:
    extra = body.model_extra or {}
    for name, (harmless, what) in _UNSUPPORTED.items():
        if name in extra and extra[name] not in harmless:
            raise invalid(f"{what} is not supported by rbee", name,
                          hint=f"Leave '{name}' out of the request.")
    if body.n not in (None, 1):
        raise invalid(f"n={body.n}: rbee returns one choice per request", "n",
                      hint="Send n=1 (or leave it out) and make several requests instead.")


def _message(index: int, message: Message) -> ChatMessage:
    param = f"messages.{index}"
    role = {"system": "system", "developer": "system", "user": "user",
            "assistant": "assistant"}.get(message.role)
    if role is None:
        raise invalid(f"Message {index} has role '{message.role}'; rbee supports system, "
                      "developer, user and assistant messages", f"{param}.role",
                      hint="Tool and function messages need tool calling, which rbee does "
                      "not do.")
    if isinstance(message.content, str):
        return ChatMessage(role=role, content=message.content)
    if message.content is None:
        raise invalid(f"Message {index} has no content", f"{param}.content")
    texts: list[str] = []
    for j, part in enumerate(message.content):
        if part.type != "text" or part.text is None:
            raise invalid(f"Message {index} has a content part of type '{part.type}'; rbee "
                          "models take text only", f"{param}.content.{j}",
                          hint="Send text parts ({\"type\": \"text\", \"text\": …}).")
        texts.append(part.text)
    return ChatMessage(role=role, content="\n".join(texts))


def _seed(seed: int | None) -> int | None:
    """OpenAI seeds are any integer; llama.cpp's are 32-bit. -1 means random (llama.cpp)."""
    if seed is None or seed == -1:
        return None
    return seed % _SEED_SPACE


def _stop(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else stop


def _sampling(body: _Request, max_tokens: int, top_logprobs: int | None,
              grammar: str | None) -> dict[str, Any]:
    values: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": OPENAI_DEFAULT_TEMPERATURE if body.temperature is None
        else body.temperature,
        "top_p": OPENAI_DEFAULT_TOP_P if body.top_p is None else body.top_p,
        "seed": _seed(body.seed),
        "stop": _stop(body.stop),
        "stream": True,
        "grammar": grammar,
        "top_logprobs": top_logprobs,
    }
    for name in ("presence_penalty", "frequency_penalty", "top_k", "min_p", "repeat_penalty"):
        value = getattr(body, name)
        if value is not None:
            values[name] = value
    return values


def _inference(values: dict[str, Any]) -> InferenceRequest:
    try:
        return InferenceRequest.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or None
        raise invalid(f"Invalid request: {where or 'body'}: {first.get('msg', '')}",
                      where) from None


def chat_inference(body: ChatCompletionRequest, default_max_tokens: int) -> InferenceRequest:
    _check_supported(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise invalid("top_logprobs needs logprobs set to true", "top_logprobs")
    max_tokens = body.max_completion_tokens or body.max_tokens or default_max_tokens
    top = (body.top_logprobs or 0) if body.logprobs else None
    values = _sampling(body, max_tokens, top, grammar_for(body.response_format))
    values["messages"] = [_message(i, m).model_dump() for i, m in enumerate(body.messages)]
    return _inference(values)


def completion_inference(body: CompletionRequest, default_max_tokens: int) -> InferenceRequest:
    _check_supported(body)
    if body.best_of not in (None, 1):
        raise invalid(f"best_of={body.best_of}: rbee returns one choice per request",
                      "best_of")
    if body.echo:
        raise invalid("echo is not supported by rbee", "echo")
    if body.suffix:
        raise invalid("suffix (fill-in-the-middle) is not supported by rbee", "suffix")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise invalid(f"{len(prompts)} prompts: rbee completes one prompt per request",
                      "prompt", hint="Send one prompt string per request.")
    values = _sampling(body, body.max_tokens or default_max_tokens, body.logprobs,
                       grammar_for(body.response_format))
    values["prompt"] = prompts[0]
    return _inference(values)


# --------------------------------------------------------------------------- replies


def _events(batch: bytes) -> list[dict[str, Any] | None]:
    """The JSON events of a batch of whole SSE frames; None stands for `[DONE]`."""
    events: list[dict[str, Any] | None] = []
    for frame in batch.split(b"\n\n"):
        if not frame.startswith(b"data: "):
            continue
        data = frame[6:]
        events.append(None if data == b"[DONE]" else json.loads(data))
    return events


def _stream_error(event: dict[str, Any]) -> RbeeError:
    return from_rbee_body(json.dumps(event).encode(), 500)


def _finish_reason(done: dict[str, Any]) -> str:
    reason = str(done.get("finish_reason", "stop"))
    if reason in ("stop", "length"):
        return reason
    raise RbeeError(ErrorCode.GENERATION_FAILED,
                    f"The worker ended the generation early ({reason}); it may be shutting "
                    "down", hint="Send the request again.")


def _usage(done: dict[str, Any]) -> dict[str, int]:
    prompt = int(done.get("prompt_tokens", 0))
    completion = int(done.get("total_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _alternatives(value: Any) -> list[tuple[str, float]]:
    if isinstance(value, dict):
        return [(str(k), float(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [(str(a["token"]), float(a["logprob"])) for a in value if isinstance(a, dict)]
    return []


@dataclass
class _Logprobs:
    """Token log-probabilities as the worker gives them, in either OpenAI layout."""

    chat: list[dict[str, Any]] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top: list[dict[str, float]] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)

    def add(self, event: dict[str, Any], offset: int) -> None:
        token, logprob = str(event["token"]), float(event["logprob"])
        alternatives = _alternatives(event.get("top_logprobs"))
        self.chat.append({
            "token": token, "logprob": logprob, "bytes": list(token.encode()),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                             for t, lp in alternatives]})
        self.tokens.append(token)
        self.token_logprobs.append(logprob)
        self.top.append(dict(alternatives))
        self.offsets.append(offset)

    def body(self, kind: Kind) -> dict[str, Any]:
        if kind == "chat":
            return {"content": self.chat}
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top, "text_offset": self.offsets}


class StreamTranslator:
    """A worker's frames, batch by batch, as OpenAI's SSE chunks (the same batching)."""

    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        self._head = json.dumps({
            "id": shape.completion_id,
            "object": "chat.completion.chunk" if shape.kind == "chat" else "text_completion",
            "created": shape.created, "model": shape.model,
        }, separators=(",", ":")).encode()[:-1]
        self._role_sent = False
        self._offset = 0

    def _chunk(self, text: str | None, logprobs: dict[str, Any] | None,
               finish_reason: str | None) -> bytes:
        choice: dict[str, Any]
        if self.shape.kind == "chat":
            delta: dict[str, Any] = {}
            if not self._role_sent:
                delta["role"] = "assistant"
                self._role_sent = True
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice["logprobs"] = logprobs
        choice["finish_reason"] = finish_reason
        return (b"data: " + self._head + b',"choices":['
                + json.dumps(choice, separators=(",", ":")).encode() + b"]}\n\n")

    def _token(self, event: dict[str, Any]) -> bytes:
        text = str(event["token"])
        logprobs = None
        if self.shape.logprobs and "logprob" in event:
            lp = _Logprobs()
            lp.add(event, self._offset)
            logprobs = lp.body(self.shape.kind)
        self._offset += len(text)
        return self._chunk(text, logprobs, None)

    def _done(self, event: dict[str, Any]) -> bytes:
        out = self._chunk("" if self.shape.kind == "chat" and not self._role_sent else None,
                          None, _finish_reason(event))
        if self.shape.include_usage:
            out += (b"data: " + self._head + b',"choices":[],"usage":'
                    + json.dumps(_usage(event), separators=(",", ":")).encode() + b"}\n\n")
        return out

    def translate(self, batch: bytes) -> bytes:
        out: list[bytes] = []
        for event in _events(batch):
            if event is None:
                out.append(b"data: [DONE]\n\n")
            elif "token" in event:
                out.append(self._token(event))
            elif event.get("done"):
                out.append(self._done(event))
            elif "error" in event:
                raise _stream_error(event)
            elif "queued" in event:  # waiting for a slot: a comment keeps the line alive
                out.append(f": queued, {int(event['queued'])} ahead\n\n".encode())
        return b"".join(out)


class ReplyCollector:
    """A worker's frames collected into one non-streaming OpenAI reply."""

    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        self._parts: list[str] = []
        self._offset = 0
        self._logprobs = _Logprobs() if shape.logprobs else None
        self.done: dict[str, Any] | None = None

    def feed(self, batch: bytes) -> None:
        for event in _events(batch):
            if event is None:
                continue
            if "token" in event:
                text = str(event["token"])
                if self._logprobs is not None and "logprob" in event:
                    self._logprobs.add(event, self._offset)
                self._parts.append(text)
                self._offset += len(text)
            elif event.get("done"):
                self.done = event
            elif "error" in event:
                raise _stream_error(event)

    def body(self) -> dict[str, Any]:
        if self.done is None:
            raise RbeeError(ErrorCode.GENERATION_FAILED,
                            "The worker's stream ended without its final frame")
        text = "".join(self._parts)
        # None when the worker reported none: an engine without log-probabilities
        logprobs = (self._logprobs.body(self.shape.kind)
                    if self._logprobs is not None and self._logprobs.tokens else None)
        choice: dict[str, Any] = {"index": 0}
        if self.shape.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = logprobs
        choice["finish_reason"] = _finish_reason(self.done)
        return {
            "id": self.shape.completion_id,
            "object": "chat.completion" if self.shape.kind == "chat" else "text_completion",
            "created": self.shape.created, "model": self.shape.model,
            "choices": [choice], "usage": _usage(self.done),
        }
