"""llama.cpp behind a thread boundary: load with layer progress, generate token by token.

Everything here is blocking and runs on threads the worker's server starts; ctypes releases
the GIL while llama.cpp computes, so the event loop stays responsive. Results leave through
an `emit` callable (the server hands them to its loop with `call_soon_threadsafe`).

One slot = one llama.cpp context. With `slots > 1` the model file is opened once per slot
with mmap, so the weights share the page cache and each slot generates truly in parallel
(on a GPU backend each slot holds its own copy of the offloaded weights).

The generation loop is our own (over `Llama.generate`) rather than `create_completion`:
it counts tokens exactly, checks for cancellation between tokens, and holds back only the
text that could still become a stop string.
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rbee_agent.gguf_meta import GgufMeta, read_gguf_meta
from rbee_agent.protocol import (
    DoneEvent,
    ErrorCode,
    FinishReason,
    InferenceRequest,
    RbeeError,
    TokenEvent,
)

log = logging.getLogger(__name__)

Emit = Callable[[TokenEvent | DoneEvent], None]


@dataclass(frozen=True)
class EngineConfig:
    model_path: Path
    backend: str = "cpu"
    device: int = 0
    ctx_size: int = 2048
    threads: int | None = None
    slots: int = 1


@dataclass
class Generation:
    """One request's handle, shared between the server (cancel) and the engine thread."""

    request_id: str
    cancel: threading.Event
    started: float
    produced: int = 0  # tokens sampled so far, written by the engine thread only


@contextlib.contextmanager
def _model_load_progress(on_fraction: Callable[[float], bool]) -> Iterator[None]:
    """Hook llama.cpp's load progress callback into `Llama(...)`.

    llama-cpp-python builds its model params inside `Llama.__init__` and offers no argument
    for the callback, so while we construct a model we wrap the params factory it calls.
    Only one load runs at a time in a worker (the caller holds the load lock).
    """
    import llama_cpp.llama_cpp as C

    @C.llama_progress_callback  # type: ignore[untyped-decorator]
    def _callback(progress: float, _user_data: Any) -> bool:
        return on_fraction(float(progress))

    original = C.llama_model_default_params

    def with_progress() -> Any:
        params = original()
        params.progress_callback = _callback
        return params

    C.llama_model_default_params = with_progress
    try:
        yield
    finally:
        C.llama_model_default_params = original


class _StopHoldback:
    """Streams text while holding back any tail that could still begin a stop string."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = stops
        self._held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string was hit)."""
        text = self._held + piece
        if not self._stops:
            self._held = ""
            return text, False
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._held = ""
            return text[: min(hits)], True
        keep = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(text)), keep, -1):
                if stop.startswith(text[-k:]):
                    keep = k
                    break
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.meta: GgufMeta = read_gguf_meta(config.model_path)
        self._llms: list[Any] = []
        self._chat_format: Any = None

    @property
    def layers_total(self) -> int:
        return max(self.meta.layers, 1)

    # ------------------------------------------------------------------ loading

    def load(self, on_layers: Callable[[int], None], should_abort: Callable[[], bool]) -> None:
        """Load one context per slot. Reports layers loaded; aborts when asked to.

        llama.cpp reports the fraction of tensor data loaded; we report it as that fraction
        of the GGUF's block count, which is what an operator reads as "layer 12 of 30".
        """
        from llama_cpp import Llama

        last = -1

        def on_fraction(fraction: float) -> bool:
            nonlocal last
            layers = min(self.layers_total, int(fraction * self.layers_total))
            if layers != last:
                last = layers
                on_layers(layers)
            return not should_abort()

        n_gpu_layers = 0 if self.config.backend == "cpu" else -1
        for slot in range(self.config.slots):
            if should_abort():
                raise RbeeError(ErrorCode.MODEL_LOAD_FAILED, "Loading was aborted by shutdown")
            try:
                with _model_load_progress(on_fraction if slot == 0 else (lambda _f: True)):
                    llm = Llama(
                        model_path=str(self.config.model_path),
                        n_ctx=self.config.ctx_size,
                        n_threads=self.config.threads,
                        n_threads_batch=self.config.threads,
                        n_gpu_layers=n_gpu_layers,
                        main_gpu=self.config.device,
                        use_mmap=True,
                        verbose=False,
                    )
            except (ValueError, RuntimeError, OSError) as exc:
                raise RbeeError(
                    ErrorCode.MODEL_LOAD_FAILED,
                    f"llama.cpp could not load {self.config.model_path}: {exc}",
                    hint="Check that the file is a complete GGUF model this llama.cpp supports.",
                    details={"path": str(self.config.model_path)},
                ) from None
            self._llms.append(llm)
        if last != self.layers_total:
            on_layers(self.layers_total)
        self._chat_format = self._make_chat_formatter(self._llms[0])

    def _make_chat_formatter(self, llm: Any) -> Any:
        """The model's own chat template, built the way llama-cpp-python builds it."""
        from llama_cpp import llama_chat_format

        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            return None
        eos_id, bos_id = llm.token_eos(), llm.token_bos()
        return llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=llm._model.token_get_text(eos_id) if eos_id != -1 else "",
            bos_token=llm._model.token_get_text(bos_id) if bos_id != -1 else "",
            stop_token_ids=[eos_id],
        )

    def close(self) -> None:
        for llm in self._llms:
            with contextlib.suppress(Exception):
                llm.close()
        self._llms.clear()

    # ------------------------------------------------------------------ prompts

    def prompt_tokens(self, slot: int, request: InferenceRequest) -> list[int]:
        """Tokenize a prompt or render chat messages with the model's template."""
        llm = self._llms[slot]
        if request.messages is not None:
            if self._chat_format is None:
                raise RbeeError(
                    ErrorCode.INVALID_REQUEST,
                    f"Model {self.config.model_path.name} has no chat template",
                    hint="Send a plain 'prompt' instead of 'messages'.",
                )
            rendered = self._chat_format(messages=[m.model_dump() for m in request.messages])
            tokens: list[int] = llm.tokenize(
                rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True
            )
        else:
            assert request.prompt is not None
            tokens = llm.tokenize(request.prompt.encode("utf-8"), add_bos=True, special=False)
        if request.grammar is not None:
            _check_grammar(llm, request.grammar)
        room = self.config.ctx_size - request.max_tokens
        if len(tokens) > room:
            raise RbeeError(
                ErrorCode.PROMPT_TOO_LONG,
                f"The prompt is {len(tokens)} tokens; with max_tokens {request.max_tokens} it "
                f"does not fit the context of {self.config.ctx_size} tokens",
                hint="Shorten the prompt, lower max_tokens, or start the worker with a larger "
                "--ctx-size.",
                details={
                    "prompt_tokens": len(tokens),
                    "max_tokens": request.max_tokens,
                    "ctx_size": self.config.ctx_size,
                },
            )
        return tokens

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        slot: int,
        tokens: list[int],
        request: InferenceRequest,
        generation: Generation,
        emit: Emit,
    ) -> None:
        """Blocking: stream tokens of one request through `emit`, ending with a DoneEvent."""
        import llama_cpp

        llm = self._llms[slot]
        vocab = llm._model.vocab
        llm.set_seed(request.seed if request.seed is not None else secrets.randbits(32))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        holdback = _StopHoldback(request.stop)
        index = 0
        produced = 0
        ttft_ms: float | None = None
        finish: FinishReason = "length"

        def send(text: str) -> None:
            nonlocal index, ttft_ms
            if not text:
                return
            if ttft_ms is None:
                ttft_ms = (time.perf_counter() - generation.started) * 1000
            emit(TokenEvent(token=text, index=index))
            index += 1

        for token in llm.generate(
            tokens, temp=request.temperature, top_p=request.top_p, top_k=request.top_k,
            min_p=request.min_p, repeat_penalty=request.repeat_penalty,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty, grammar=_grammar(request), reset=True,
        ):
            if generation.cancel.is_set():
                finish = "cancelled"
                break
            if llama_cpp.llama_token_is_eog(vocab, token):
                finish = "stop"
                break
            produced += 1
            generation.produced = produced
            text, hit_stop = holdback.feed(decoder.decode(llm.detokenize([token])))
            send(text)
            if hit_stop:
                finish = "stop"
                break
            if produced >= request.max_tokens:
                break
        if finish != "cancelled":
            send(holdback.flush() + decoder.decode(b"", final=True))
        emit(
            DoneEvent(
                total_tokens=produced,
                duration_ms=round((time.perf_counter() - generation.started) * 1000, 2),
                finish_reason=finish,
                request_id=generation.request_id,
                prompt_tokens=len(tokens),
                ttft_ms=round(ttft_ms, 2) if ttft_ms is not None else None,
            )
        )


def _grammar(request: InferenceRequest) -> Any:
    """The request's GBNF grammar for llama-cpp-python's sampler chain, or None."""
    if request.grammar is None:
        return None
    from llama_cpp.llama_grammar import LlamaGrammar

    return LlamaGrammar.from_string(request.grammar, verbose=False)


def _check_grammar(llm: Any, grammar: str) -> None:
    """Refuse a grammar llama.cpp cannot parse before the stream starts: a sampler built
    from one is NULL, which the chain would dereference."""
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, grammar.encode(), b"root")
    if not sampler:
        raise RbeeError(
            ErrorCode.INVALID_REQUEST,
            "The grammar is not valid GBNF (llama.cpp could not parse it)",
            hint="Check it with llama.cpp's grammar syntax; the worker log has the parser's "
            "message.",
        )
    llama_cpp.llama_sampler_free(sampler)
