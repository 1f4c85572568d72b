"""Read a GGUF file's metadata from its header, without loading the weights (B38).

The worker needs the layer count before llama.cpp starts loading (progress is reported in
layers), and the catalog records architecture, context length and quantization. Only the
key/value section at the start of the file is read.

This module must not import `gguf` (or anything else that loads numpy): the worker reads the
header before it loads llama.cpp, and a CUDA build of llama.cpp crashes in a process that
loaded numpy's C++ runtime first (docs/architecture.md, "Import order in the worker").
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from rbee_agent.protocol import ErrorCode, RbeeError

GGUF_MAGIC = b"GGUF"


# llama.cpp's `llama_ftype` (llama.h): what `general.file_type` holds. Gaps are types
# llama.cpp has retired.
_FILE_TYPES = {
    0: "ALL_F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S",
    22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
    37: "TQ2_0", 38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0", 1024: "GUESSED",
}


@dataclass(frozen=True)
class GgufMeta:
    architecture: str
    layers: int
    context_length: int
    vocab_size: int
    quantization: str
    name: str | None
    chat_template: str | None
    # Attention shape, for memory estimates (KV cache per token); None when the header
    # does not say (or says it per layer).
    embedding_length: int | None = None
    head_count: int | None = None
    head_count_kv: int | None = None
    key_length: int | None = None
    value_length: int | None = None


# GGUF value types (ggml's gguf.h): fixed sizes for scalars; 8 = string, 9 = array.
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_STRING = 16 * 1024 * 1024


class _Header:
    """Reads the key/value section of a GGUF file and nothing else.

    `gguf.GGUFReader` parses every tensor descriptor and every array element eagerly
    (about 2 s for a 100 MB model with a 49k-token vocabulary); the worker and the catalog
    need a dozen scalars, so this walks the key/value pairs, skipping arrays by length.
    """

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh

    def _read(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        data = self._fh.read(size)
        if len(data) != size:
            raise ValueError("unexpected end of file in the GGUF header")
        return struct.unpack(fmt, data)[0]

    def _string(self) -> str:
        length = self._read("<Q")
        if length > _MAX_STRING:
            raise ValueError(f"string of {length} bytes in the GGUF header")
        return self._fh.read(length).decode("utf-8", "replace")

    def _skip_string(self) -> None:
        self._fh.seek(self._read("<Q"), os.SEEK_CUR)

    def _value(self, kind: int) -> Any:
        if kind in _SCALAR:
            return self._read(_SCALAR[kind])
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item, count = self._read("<I"), self._read("<Q")
            if item in _SCALAR:
                self._fh.seek(struct.calcsize(_SCALAR[item]) * count, os.SEEK_CUR)
            elif item == _STRING:
                for _ in range(count):
                    self._skip_string()
            else:
                raise ValueError(f"unsupported GGUF array of type {item}")
            return _ArrayLength(count)
        raise ValueError(f"unknown GGUF value type {kind}")

    def fields(self) -> dict[str, Any]:
        if self._fh.read(4) != GGUF_MAGIC:
            raise ValueError("bad magic")
        version = self._read("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
        self._read("<Q")  # tensor count
        kv_count = self._read("<Q")
        found: dict[str, Any] = {}
        for _ in range(kv_count):
            key = self._string()
            found[key] = self._value(self._read("<I"))
        return found


class _ArrayLength(int):
    """An array value we skipped: only its length is kept."""


def _quantization(file_type: int | None) -> str:
    if file_type is None:
        return "unknown"
    return _FILE_TYPES.get(file_type, f"type{file_type}")


def check_gguf_file(path: Path) -> None:
    """Fail with one clear sentence when `path` is missing or is not a GGUF file."""
    if not path.exists():
        raise RbeeError(
            ErrorCode.MODEL_FILE_INVALID,
            f"Model file {path} does not exist",
            hint="Check the path, or list known models with 'rbee models list'.",
            details={"path": str(path)},
        )
    if not path.is_file():
        raise RbeeError(
            ErrorCode.MODEL_FILE_INVALID,
            f"Model path {path} is not a file",
            details={"path": str(path)},
        )
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise RbeeError(
            ErrorCode.MODEL_FILE_INVALID,
            f"Model file {path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')",
            hint="rbee serves GGUF models; convert the model or pick a .gguf file.",
            details={"path": str(path)},
        )


def read_gguf_meta(path: Path) -> GgufMeta:
    check_gguf_file(path)
    try:
        with path.open("rb") as fh:
            fields = _Header(io.BufferedReader(fh, 1024 * 1024)).fields()
    except (ValueError, struct.error, OSError) as exc:
        raise RbeeError(
            ErrorCode.MODEL_FILE_INVALID,
            f"Model file {path} has a damaged GGUF header: {exc}",
            hint="The file may be truncated; download it again.",
            details={"path": str(path)},
        ) from None
    arch = str(fields.get("general.architecture") or "unknown")
    template = fields.get("tokenizer.chat_template")

    def scalar(key: str) -> int | None:
        value = fields.get(f"{arch}.{key}")
        if isinstance(value, bool) or not isinstance(value, int):
            return None
        return None if isinstance(value, _ArrayLength) else int(value)

    return GgufMeta(
        architecture=arch,
        layers=int(fields.get(f"{arch}.block_count") or 0),
        context_length=int(fields.get(f"{arch}.context_length") or 0),
        vocab_size=int(fields.get("tokenizer.ggml.tokens") or 0),
        quantization=_quantization(fields.get("general.file_type")),
        name=fields.get("general.name"),
        chat_template=template if isinstance(template, str) else None,
        embedding_length=scalar("embedding_length"),
        head_count=scalar("attention.head_count"),
        head_count_kv=scalar("attention.head_count_kv"),
        key_length=scalar("attention.key_length"),
        value_length=scalar("attention.value_length"),
    )
