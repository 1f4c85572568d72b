"""How much RAM and VRAM a worker will use, from the GGUF header, before it starts (B121).

One estimator for both checks: the RAM preflight of a cpu worker and the VRAM preflight,
placement and `gpu_layers: "auto"` of a GPU worker (B126, B129). A worker holds:

- the weights: the file's tensors (mmap'd; the offloaded layers' share lives on the GPU);
- a KV cache per context: ctx × layers × KV heads × (key + value length) × 2 bytes (f16),
  one context per slot, each layer's cache where that layer runs;
- compute buffers per context: logits for a 512-token batch (vocabulary × 512 × 4 bytes on
  the GPU side) and a margin for activations (`compute_margin_mb`);
- on a GPU, the CUDA context and library workspaces of the process (`GPU_PROCESS_MB`).

Measured on the bundled SmolLM2-135M (CPU, RSS after load): ctx 512 → 125 MB, 2048 → 159,
8192 → 294; the KV term alone accounts for the differences to the MB.

This module must never touch a process or a device: it takes numbers and returns numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from rbee_agent.gguf_meta import GgufMeta, read_gguf_meta
from rbee_agent.protocol import CatalogEntry, RbeeError

MiB = 1024 * 1024
KV_ELEMENT_BYTES = 2  # llama.cpp's default KV cache type is f16
BATCH_TOKENS = 512  # llama-cpp-python's default n_batch: the logits rows a context keeps
LOGIT_BYTES = 4
# What a CUDA process holds beside tensors: context, cuBLAS workspace, graph buffers. From the
# H100 run of issue 12: SmolLM2-135M at ctx 2048 showed 758 MiB in NVML for 93 MiB of weights.
GPU_PROCESS_MB = 450


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model. Unknown attention shape → no KV term
    (a model not downloaded yet: checked again once its header can be read)."""

    size_bytes: int
    layers: int
    vocab_size: int
    context_length: int
    kv_bytes_per_token_layer: int | None

    @classmethod
    def from_meta(cls, meta: GgufMeta, size_bytes: int) -> ModelShape:
        return cls(size_bytes=size_bytes, layers=meta.layers, vocab_size=meta.vocab_size,
                   context_length=meta.context_length,
                   kv_bytes_per_token_layer=_kv_bytes_per_token_layer(meta))

    @classmethod
    def of_entry(cls, entry: CatalogEntry) -> ModelShape:
        """From the model's header when its file is here, else from the catalog row."""
        path = Path(entry.local_path)
        try:
            if path.is_file():
                return cls.from_meta(read_gguf_meta(path), entry.size_bytes)
        except (RbeeError, OSError):
            pass  # the worker will say what is wrong with the file
        return cls(size_bytes=entry.size_bytes, layers=entry.layers, vocab_size=0,
                   context_length=entry.context_length, kv_bytes_per_token_layer=None)


def _kv_bytes_per_token_layer(meta: GgufMeta) -> int | None:
    heads = meta.head_count
    if not heads or not meta.embedding_length:
        return None
    kv_heads = meta.head_count_kv or heads
    head_dim = meta.embedding_length // heads
    key = meta.key_length or head_dim
    value = meta.value_length or head_dim
    return kv_heads * (key + value) * KV_ELEMENT_BYTES


@dataclass(frozen=True)
class MemoryNeed:
    """MiB one side (RAM or one GPU's VRAM) will hold. Parts are shown to people as they are."""

    weights_mb: int
    kv_cache_mb: int
    compute_mb: int

    @property
    def total_mb(self) -> int:
        return self.weights_mb + self.kv_cache_mb + self.compute_mb

    def details(self) -> dict[str, int]:
        return {"required_mb": self.total_mb, "weights_mb": self.weights_mb,
                "kv_cache_mb": self.kv_cache_mb, "compute_mb": self.compute_mb}

    def describe(self) -> str:
        return (f"{self.total_mb} MB (weights {self.weights_mb} + KV cache {self.kv_cache_mb}"
                f" + compute {self.compute_mb})")


def _mb(n: float) -> int:
    return math.ceil(n / MiB)


def kv_cache_mb(shape: ModelShape, ctx_size: int, slots: int, layers: int) -> int:
    if shape.kv_bytes_per_token_layer is None:
        return 0
    return _mb(shape.kv_bytes_per_token_layer * ctx_size * layers * slots)


def ram_need(shape: ModelShape, ctx_size: int, slots: int, margin_mb: int,
             gpu_layers: int = 0) -> MemoryNeed:
    """RAM for a worker whose first `gpu_layers` layers run on GPUs (0: all on the CPU)."""
    cpu_layers = max(0, shape.layers - gpu_layers) if shape.layers else 1
    share = cpu_layers / shape.layers if shape.layers else 1.0
    return MemoryNeed(
        weights_mb=_mb(shape.size_bytes * share),
        kv_cache_mb=kv_cache_mb(shape, ctx_size, slots, cpu_layers),
        compute_mb=slots * margin_mb,
    )


def vram_need(shape: ModelShape, ctx_size: int, slots: int, margin_mb: int,
              gpu_layers: int, share: float = 1.0) -> MemoryNeed:
    """VRAM on one GPU holding `share` of `gpu_layers` offloaded layers (a tensor split gives
    each GPU its share; the CUDA process overhead and compute buffers are on every GPU)."""
    layers = min(gpu_layers, shape.layers) if shape.layers else 0
    fraction = layers / shape.layers * share if shape.layers else share
    logits = shape.vocab_size * BATCH_TOKENS * LOGIT_BYTES
    return MemoryNeed(
        weights_mb=_mb(shape.size_bytes * fraction),
        kv_cache_mb=math.ceil(kv_cache_mb(shape, ctx_size, slots, layers) * share),
        compute_mb=GPU_PROCESS_MB + slots * (margin_mb + _mb(logits)),
    )


def auto_gpu_layers(shape: ModelShape, ctx_size: int, slots: int, margin_mb: int,
                    free_mb: int) -> int:
    """The most layers whose VRAM need fits `free_mb` (0 when not even one does)."""
    best = 0
    for layers in range(1, shape.layers + 1):
        if vram_need(shape, ctx_size, slots, margin_mb, layers).total_mb > free_mb:
            break
        best = layers
    return best
