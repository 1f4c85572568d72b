"""The worker's model: loaded once, one context for every slot, prompts made into tokens.

`load` opens the GGUF file with llama.cpp (layer progress through llama.cpp's own progress
callback), creates one context with a sequence per slot and starts the engine thread
(scheduler.py), which runs every generation. `prepare` turns a request into prompt tokens
and checks it, on any thread, so a request is refused before it takes a slot or a queue
place (B106); `submit` hands an admitted job to the engine thread.

Memory: one copy of the weights whatever the slot count, plus a KV cache of `ctx_size`
cells per slot.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rbee_agent.gguf_meta import GgufMeta, read_gguf_meta
from rbee_agent.protocol import ErrorCode, InferenceRequest, RbeeError
from rbee_agent.worker import native
from rbee_agent.worker.sampling import check_grammar
from rbee_agent.worker.scheduler import Job, Reuse, Scheduler, Sink
from rbee_agent.worker.stops import StopHoldback

log = logging.getLogger(__name__)

# The stop-string hold-back lives in stops.py; the old name stays for its tests.
_StopHoldback = StopHoldback

DEFAULT_PREFILL_CHUNK = 256


def default_threads() -> int:
    """Half the logical CPUs (llama-cpp-python's own default, which workers always had): the
    physical cores on an SMT machine, and a core left for the HTTP side on a small node.
    llama.cpp's CPU threads wait for each other at every step of a decode; on a node whose
    cores are all taken, two threads on two cores can be many times slower than one."""
    return max(1, (os.cpu_count() or 2) // 2)


@dataclass(frozen=True)
class EngineConfig:
    model_path: Path
    backend: str = "cpu"
    device: int = 0
    ctx_size: int = 2048  # per slot
    threads: int | None = None
    slots: int = 1
    gpu_layers: int | None = None  # None: every layer on a GPU backend, none on cpu
    tensor_split: tuple[float, ...] | None = None
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    prefix_reuse: Reuse | None = None  # None: any prefix on the CPU, whole chunks on a GPU
    rpc: tuple[str, ...] = ()  # llama.cpp RPC servers (host:port) that take gpu_layers (B202)


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.meta: GgufMeta = read_gguf_meta(config.model_path)
        self.model: native.Model | None = None
        self.ctx: native.Context | None = None
        self.scheduler: Scheduler | None = None
        self._chat_format: Any = None

    @property
    def layers_total(self) -> int:
        return max(self.meta.layers, 1)

    @property
    def gpu_layers(self) -> int:
        """Layers llama.cpp was asked to offload, as a count of `layers_total` (0 on cpu)."""
        requested = self.config.gpu_layers
        if (self.config.backend == "cpu" and not self.config.rpc) or requested == 0:
            return 0
        if requested is None or requested < 0:
            return self.layers_total
        return min(requested, self.layers_total)

    @property
    def prefix_reuse(self) -> Reuse:
        """Any cached prefix on the CPU backend, whose kernels give each token of a batch the
        same result whatever else is in it; whole prompt chunks elsewhere (B47, B102)."""
        if self.config.prefix_reuse is not None:
            return self.config.prefix_reuse
        return Reuse.ANY if self.config.backend == "cpu" else Reuse.CHUNKS

    @property
    def threads(self) -> int:
        return self.config.threads or default_threads()

    # ------------------------------------------------------------------ loading

    def load(self, on_layers: Callable[[int], None], should_abort: Callable[[], bool]) -> None:
        """Load the model and create the context. Reports layers loaded; aborts when asked.

        llama.cpp reports the fraction of tensor data loaded; we report it as that fraction
        of the GGUF's block count, which is what an operator reads as "layer 12 of 30".
        """
        last = -1

        def on_fraction(fraction: float) -> bool:
            nonlocal last
            layers = min(self.layers_total, int(fraction * self.layers_total))
            if layers != last:
                last = layers
                on_layers(layers)
            return not should_abort()

        cfg = self.config
        placement = native.Placement(
            gpu_layers=-1 if self.gpu_layers >= self.layers_total else self.gpu_layers,
            main_gpu=cfg.device, tensor_split=cfg.tensor_split,
        )
        try:
            if cfg.rpc:
                native.add_rpc_servers(cfg.rpc)
            self.model = native.Model(cfg.model_path, placement, on_fraction)
        except native.LoadAborted:
            raise RbeeError(ErrorCode.MODEL_LOAD_FAILED,
                            "Loading was aborted by shutdown") from None
        except (ValueError, OSError) as exc:
            raise RbeeError(
                ErrorCode.MODEL_LOAD_FAILED,
                f"llama.cpp could not load {cfg.model_path}: {exc}",
                hint="Check that the file is a complete GGUF model this llama.cpp supports.",
                details={"path": str(cfg.model_path)},
            ) from None
        if last != self.layers_total:
            on_layers(self.layers_total)
        try:
            self.ctx = native.Context(self.model, cfg.slots, cfg.ctx_size,
                                      cfg.prefill_chunk + cfg.slots, self.threads)
        except ValueError as exc:
            raise RbeeError(
                ErrorCode.MODEL_LOAD_FAILED,
                f"llama.cpp could not create a context of {cfg.slots} × {cfg.ctx_size} tokens "
                f"for {cfg.model_path.name}: {exc}",
                hint="Lower --ctx-size or --slots.",
            ) from None
        self._chat_format = self._make_chat_formatter(self.model)
        log.info("context: %d slot(s) × %d tokens, %d thread(s), prefill chunk %d, "
                 "prefix reuse: %s", cfg.slots, self.ctx.ctx_per_seq, self.threads,
                 cfg.prefill_chunk, self.prefix_reuse)

    def start(self, sink: Sink) -> None:
        """Start the engine thread; `sink` receives its events (on that thread)."""
        assert self.model is not None and self.ctx is not None
        self.scheduler = Scheduler(self.model, self.ctx, self.config.prefill_chunk, sink,
                                   self.prefix_reuse)
        self.scheduler.start()

    def _make_chat_formatter(self, model: native.Model) -> Any:
        """The model's own chat template, built the way llama-cpp-python builds it."""
        template = self.meta.chat_template or model.meta("tokenizer.chat_template")
        if not template:
            return None
        from llama_cpp import llama_chat_format

        return llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_text(model.eos) if model.eos != -1 else "",
            bos_token=model.token_text(model.bos) if model.bos != -1 else "",
            stop_token_ids=[model.eos],
        )

    def close(self) -> None:
        """Stop the engine thread, then free context and model (blocking)."""
        if self.scheduler is not None:
            self.scheduler.stop()
            self.scheduler = None
        for part in (self.ctx, self.model):
            if part is not None:
                with contextlib.suppress(Exception):
                    part.close()
        self.ctx = None
        self.model = None

    # ------------------------------------------------------------------ prompts

    def prepare(self, request: InferenceRequest) -> list[int]:
        """Prompt tokens for a request, checked (blocking; safe beside the engine thread).

        Cheap checks first: an empty prompt, a missing chat template, then a size bound
        (no token is longer than the vocabulary's longest, so a prompt with more characters
        than the room × that length × 2 cannot fit) before any template is rendered or
        anything tokenized.
        """
        model = self.model
        assert model is not None
        room = self.config.ctx_size - request.max_tokens
        if request.messages is not None:
            if self._chat_format is None:
                raise RbeeError(
                    ErrorCode.INVALID_REQUEST,
                    f"Model {self.config.model_path.name} has no chat template",
                    hint="Send a plain 'prompt' instead of 'messages'.",
                )
            chars = sum(len(m.content) for m in request.messages)
        else:
            assert request.prompt is not None
            if not request.prompt:
                raise RbeeError(ErrorCode.INVALID_REQUEST,
                                "Invalid request: prompt: the prompt is empty",
                                hint="Send at least one character of prompt.")
            chars = len(request.prompt)
        at_least = chars // (2 * model.max_piece_bytes)
        if at_least > room:
            raise self._too_long(at_least, request.max_tokens, estimated=True)
        if request.messages is not None:
            rendered = self._render_chat(request)
            tokens = model.tokenize(rendered.prompt, add_special=not rendered.added_special,
                                    parse_special=True)
        else:
            assert request.prompt is not None
            tokens = model.tokenize(request.prompt, add_special=True, parse_special=False)
        if not tokens:
            raise RbeeError(ErrorCode.INVALID_REQUEST,
                            "Invalid request: prompt: the prompt makes no tokens")
        if len(tokens) > room:
            raise self._too_long(len(tokens), request.max_tokens)
        if request.grammar is not None:
            check_grammar(model, request.grammar)
        return tokens

    def _render_chat(self, request: InferenceRequest) -> Any:
        assert request.messages is not None
        try:
            return self._chat_format(messages=[m.model_dump() for m in request.messages])
        except Exception as exc:  # the template is the model's code: it may refuse anything
            raise RbeeError(
                ErrorCode.INVALID_REQUEST,
                f"The chat template of {self.config.model_path.name} refused these messages: "
                f"{type(exc).__name__}: {exc}",
                hint="Check the order of roles (many templates want user and assistant to "
                "alternate, with at most one system message first).",
            ) from None

    def _too_long(self, tokens: int, max_tokens: int, estimated: bool = False) -> RbeeError:
        count = f"at least {tokens}" if estimated else str(tokens)
        return RbeeError(
            ErrorCode.PROMPT_TOO_LONG,
            f"The prompt is {count} tokens; with max_tokens {max_tokens} it does not fit "
            f"the context of {self.config.ctx_size} tokens",
            hint="Shorten the prompt, lower max_tokens, or start the worker with a larger "
            "--ctx-size.",
            details={"prompt_tokens": tokens, "max_tokens": max_tokens,
                     "ctx_size": self.config.ctx_size, "estimated": estimated},
        )

    def submit(self, job: Job) -> None:
        assert self.scheduler is not None
        self.scheduler.submit(job)
