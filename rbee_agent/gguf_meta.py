"""Read a GGUF file's metadata from its header, without loading the weights (B38).

The worker needs the layer count before llama.cpp starts loading (progress is reported in
layers), and the catalog records architecture, context length and quantization. The `gguf`
package memory-maps the file, so only the header pages are actually read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rbee_agent.protocol import ErrorCode, RbeeError

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GgufMeta:
    architecture: str
    layers: int
    context_length: int
    vocab_size: int
    quantization: str
    name: str | None
    chat_template: str | None


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    return field.contents()


def _quantization(file_type: int | None) -> str:
    if file_type is None:
        return "unknown"
    import gguf

    try:
        name = gguf.LlamaFileType(file_type).name
    except ValueError:
        return f"type{file_type}"
    return name.removeprefix("MOSTLY_")


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
    import gguf

    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as exc:  # the gguf package raises plain ValueError/struct errors
        raise RbeeError(
            ErrorCode.MODEL_FILE_INVALID,
            f"Model file {path} has a damaged GGUF header: {exc}",
            hint="The file may be truncated; download it again.",
            details={"path": str(path)},
        ) from None
    arch = str(_field(reader, "general.architecture") or "unknown")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return GgufMeta(
        architecture=arch,
        layers=int(_field(reader, f"{arch}.block_count") or 0),
        context_length=int(_field(reader, f"{arch}.context_length") or 0),
        vocab_size=len(tokens.data) if tokens is not None else 0,
        quantization=_quantization(_field(reader, "general.file_type")),
        name=_field(reader, "general.name"),
        chat_template=_field(reader, "tokenizer.chat_template"),
    )
