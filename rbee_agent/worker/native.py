"""llama.cpp's C API as the worker uses it: one model, one context holding many sequences.

We call the C functions through llama-cpp-python's ctypes bindings (`llama_cpp.llama_cpp`)
and not its `Llama` class, because `Llama` is built for one sequence: it creates a context
with `n_seq_max = 1`, keeps a Python-side copy of the logits (n_batch × n_vocab floats,
~100 MB for SmolLM2's 49k vocabulary) and samples in Python. A worker needs one context for
all its slots, a batch it fills itself and a sampler chain per sequence that runs in C.

Nothing here knows about requests or HTTP. Everything blocks; `Context.decode` must only be
called from the engine thread (llama.cpp keeps a CPU thread pool per calling thread).
This module imports `llama_cpp`, which loads libllama and then numpy: the worker imports it
before anything else that could load numpy (docs/architecture.md, "Import order").
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp.llama_cpp as C

log = logging.getLogger("rbee.worker.llama")

_backend_ready = threading.Lock()
_backend_initialised = False
_LLAMA_LOG_WARN = 3  # ggml_log_level: 0 none, 1 debug, 2 info, 3 warn, 4 error, 5 cont


def _route_llama_log(level: int, text: bytes | None, _user: Any) -> None:
    """llama.cpp's own log, warnings and errors only, into ours (it talks a lot at info)."""
    if text and level in (_LLAMA_LOG_WARN, _LLAMA_LOG_WARN + 1):
        log.log(logging.WARNING if level == _LLAMA_LOG_WARN else logging.ERROR,
                "llama.cpp: %s", text.decode("utf-8", "replace").rstrip())


_log_callback = C.llama_log_callback(_route_llama_log)


def init_backend() -> None:
    """Once per process: route llama.cpp's log and initialise its backends."""
    global _backend_initialised
    with _backend_ready:
        if not _backend_initialised:
            C.llama_log_set(_log_callback, None)
            C.llama_backend_init()
            _backend_initialised = True


def add_rpc_servers(endpoints: Sequence[str]) -> None:
    """A split worker's RPC servers become devices ahead of this node's own (B202)."""
    init_backend()
    from rbee_agent import rpc_native

    rpc_native.add_servers(list(endpoints))
    log.info("llama.cpp devices: %s", ", ".join(rpc_native.device_names()))


def supports_gpu_offload() -> bool:
    return bool(C.llama_supports_gpu_offload())


def max_devices() -> int:
    return int(C.llama_max_devices())


class LoadAborted(Exception):
    """The progress callback asked llama.cpp to stop loading."""


@dataclass(frozen=True)
class Placement:
    """Where the weights go. `gpu_layers` -1 means every layer; `tensor_split` spreads them
    over several visible GPUs (llama.cpp's layer split); without it the model stays on
    `main_gpu` alone (split mode none), so a worker never spills onto a card it was not
    given."""

    gpu_layers: int = 0
    main_gpu: int = 0
    tensor_split: tuple[float, ...] | None = None


class Model:
    """The weights and vocabulary, loaded once per worker."""

    def __init__(self, path: Path, placement: Placement,
                 on_progress: Callable[[float], bool]) -> None:
        init_backend()
        params = C.llama_model_default_params()
        params.n_gpu_layers = placement.gpu_layers
        params.main_gpu = placement.main_gpu
        split: Any = None
        if placement.tensor_split:
            split = (ctypes.c_float * max_devices())(*placement.tensor_split)
            params.tensor_split = split
            params.split_mode = C.LLAMA_SPLIT_MODE_LAYER
        elif placement.gpu_layers != 0:
            params.split_mode = C.LLAMA_SPLIT_MODE_NONE
        aborted = False

        def progress(fraction: float, _user: Any) -> bool:
            nonlocal aborted
            keep_going = bool(on_progress(float(fraction)))
            aborted = aborted or not keep_going
            return keep_going

        callback = C.llama_progress_callback(progress)
        params.progress_callback = callback
        ptr = C.llama_model_load_from_file(str(path).encode(), params)
        del split, callback  # llama.cpp keeps neither past the load
        if not ptr:
            if aborted:
                raise LoadAborted()
            raise ValueError("llama.cpp could not load the model (see the log above)")
        self.ptr = ptr
        self.vocab = C.llama_model_get_vocab(ptr)
        self.n_vocab = int(C.llama_vocab_n_tokens(self.vocab))
        self.n_layer = int(C.llama_model_n_layer(ptr))
        self.bos = int(C.llama_vocab_bos(self.vocab))
        self.eos = int(C.llama_vocab_eos(self.vocab))
        self.eog = frozenset(t for t in range(self.n_vocab)
                             if C.llama_vocab_is_eog(self.vocab, t))
        self._pieces: dict[int, bytes] = {}
        self._piece_buf = ctypes.create_string_buffer(256)
        self.max_piece_bytes = max(
            1, max(len(C.llama_vocab_get_text(self.vocab, t) or b"")
                   for t in range(self.n_vocab)))

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        """Thread-safe (the vocabulary is read-only once loaded), so it runs beside decode."""
        data = text.encode("utf-8", "replace")  # a lone surrogate is no UTF-8
        room = len(data) + 16
        while True:
            out = (C.llama_token * room)()
            n = C.llama_tokenize(self.vocab, data, len(data), out, room, add_special,
                                 parse_special)
            if n >= 0:
                return list(out[:n])
            room = -n

    def piece(self, token: int) -> bytes:
        """The bytes a generated token stands for (special tokens render as nothing).
        Cached: a reply uses a few hundred distinct tokens over and over. Engine thread only."""
        cached = self._pieces.get(token)
        if cached is not None:
            return cached
        n = C.llama_token_to_piece(self.vocab, token, self._piece_buf, 256, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
            value = buf.raw[:n]
        else:
            value = self._piece_buf.raw[:n]
        self._pieces[token] = value
        return value

    def token_text(self, token: int) -> str:
        """A token's text as the vocabulary spells it (for chat templates' bos/eos)."""
        raw = C.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", "replace") if raw else ""

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(64 * 1024)
        n = C.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def close(self) -> None:
        if self.ptr:
            C.llama_model_free(self.ptr)
            self.ptr = None


class Context:
    """One llama.cpp context: `n_seq` sequences, each with its own KV stream of
    `ctx_per_seq` cells (kv_unified off, llama-server's default for explicit slots), so a
    sequence's attention only ever reads its own cells, in position order."""

    def __init__(self, model: Model, n_seq: int, ctx_per_seq: int, n_batch: int,
                 threads: int) -> None:
        params = C.llama_context_default_params()
        params.n_ctx = ctx_per_seq * n_seq
        params.n_seq_max = n_seq
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_threads = threads
        params.n_threads_batch = threads
        params.kv_unified = False
        params.no_perf = True
        # Flash attention: on wherever llama.cpp supports it ("auto"). It skips masked cells
        # rather than adding their zero weights, so a token's logits do not depend on how
        # many cells the batch's other sequences hold (docs/architecture.md, Determinism).
        params.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_AUTO
        ptr = C.llama_init_from_model(model.ptr, params)
        if not ptr:
            raise ValueError("llama.cpp could not create a context (out of memory?)")
        self.ptr = ptr
        self.memory = C.llama_get_memory(ptr)
        self.n_seq = n_seq
        self.ctx_per_seq = int(C.llama_n_ctx_seq(ptr))

    def decode(self, batch: Batch) -> int:
        return int(C.llama_decode(self.ptr, batch.raw))

    def forget(self, seq: int, start: int = 0) -> None:
        """Free a sequence's cells from position `start` on."""
        C.llama_memory_seq_rm(self.memory, seq, start, -1)

    def cells(self, seq: int) -> int:
        """Positions a sequence holds in the cache (0 when empty)."""
        return int(C.llama_memory_seq_pos_max(self.memory, seq)) + 1

    def logits(self, index: int) -> Any:
        """A pointer to the logits of the batch's `index`-th token (valid until the next
        decode). Read in place: nothing is copied unless a request asked for logprobs."""
        return C.llama_get_logits_ith(self.ptr, index)

    def close(self) -> None:
        if self.ptr:
            C.llama_free(self.ptr)
            self.ptr = None


class Batch:
    """A `llama_batch` allocated once and refilled every step (no allocation per token)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.raw = C.llama_batch_init(capacity, 0, 1)
        self._token = self.raw.token
        self._pos = self.raw.pos
        self._logits = self.raw.logits
        self._seq = [self.raw.seq_id[i] for i in range(capacity)]
        for i in range(capacity):
            self.raw.n_seq_id[i] = 1
        self.n = 0

    def clear(self) -> None:
        self.n = 0

    def add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        """Append one token; returns its index in the batch (for `Context.logits`)."""
        i = self.n
        self._token[i] = token
        self._pos[i] = pos
        self._seq[i][0] = seq
        self._logits[i] = logits
        self.n = i + 1
        return i

    def add_run(self, tokens: Sequence[int], start: int, seq: int, last_logits: bool) -> int:
        """Append consecutive tokens of one sequence from position `start`; index of the last."""
        for k, token in enumerate(tokens):
            self.add(token, start + k, seq, False)
        if last_logits:
            self._logits[self.n - 1] = True
        return self.n - 1

    def seal(self) -> None:
        self.raw.n_tokens = self.n

    def close(self) -> None:
        if self._seq:
            C.llama_batch_free(self.raw)
            self._seq = []
