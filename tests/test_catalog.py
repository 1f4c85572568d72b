"""B35/B38: the SQLite model catalog and GGUF metadata read from file headers."""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np
import pytest

from rbee_agent.catalog import Catalog, derive_id, file_sha256, owned_file
from rbee_agent.protocol import CatalogEntry, ErrorCode, RbeeError
from tests.support import bundled_model_path


def write_gguf(path: Path, *, layers: int = 4, context: int = 512, arch: str = "llama") -> Path:
    """A tiny but real GGUF file, written by the gguf library."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_block_count(layers)
    writer.add_context_length(context)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_token_list(["<s>", "a", "b"])
    writer.add_tensor("token_embd.weight", np.arange(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def entry(model_id: str, reference: str | None = None, **changes: object) -> CatalogEntry:
    data: dict[str, object] = {
        "id": model_id,
        "provider": "hf",
        "reference": reference or f"hf:org/{model_id}/{model_id}.gguf",
        "local_path": f"/models/{model_id}.gguf",
        "size_bytes": 1234,
        "sha256": None,
        "quantization": "Q4_K_M",
        "architecture": "llama",
        "layers": 22,
        "context_length": 4096,
        "added_at": 1_700_000_000.5,
    }
    data.update(changes)
    return CatalogEntry.model_validate(data)


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    cat = Catalog(tmp_path / "data" / "catalog.sqlite3")
    yield cat
    cat.close()


@pytest.fixture(scope="module")
def smollm2_registered(tmp_path_factory: pytest.TempPathFactory) -> CatalogEntry:
    """The real bundled model registered once (reading its header takes a second or two)."""
    with Catalog(tmp_path_factory.mktemp("cat") / "catalog.sqlite3") as cat:
        return cat.register_file(bundled_model_path())


# --------------------------------------------------------------------------- B35 rows


def test_b35_catalog_survives_reopen(tmp_path: Path) -> None:
    db = tmp_path / "catalog.sqlite3"
    with Catalog(db) as cat:
        cat.add(entry("tiny", sha256="ab" * 32))
        cat.add(entry("other"))
    with Catalog(db) as reopened:
        assert reopened.get("tiny") == entry("tiny", sha256="ab" * 32)
        assert [e.id for e in reopened.list()] == ["other", "tiny"]


def test_b35_add_get_list_remove(catalog: Catalog) -> None:
    assert catalog.list() == []
    assert catalog.get("tiny") is None
    catalog.add(entry("tiny"))
    catalog.add(entry("big", layers=80))
    assert catalog.get("big") == entry("big", layers=80)
    assert [e.id for e in catalog.list()] == ["big", "tiny"]
    assert catalog.remove("tiny") == entry("tiny")
    assert catalog.get("tiny") is None
    assert catalog.remove("tiny") is None
    assert [e.id for e in catalog.list()] == ["big"]


def test_b35_find_by_reference(catalog: Catalog) -> None:
    catalog.add(entry("tiny", reference="hf:org/repo/tiny.gguf@main"))
    found = catalog.find_by_reference("hf:org/repo/tiny.gguf@main")
    assert found is not None and found.id == "tiny"
    assert catalog.find_by_reference("hf:org/repo/tiny.gguf") is None


def test_b35_duplicate_id_is_refused(catalog: Catalog) -> None:
    catalog.add(entry("tiny"))
    with pytest.raises(RbeeError) as caught:
        catalog.add(entry("tiny", reference="hf:org/elsewhere"))
    assert caught.value.code == ErrorCode.MODEL_ALREADY_EXISTS
    assert caught.value.http_status == 409
    assert catalog.get("tiny") == entry("tiny")


def test_b35_duplicate_reference_is_refused(catalog: Catalog) -> None:
    catalog.add(entry("tiny", reference="hf:org/repo"))
    with pytest.raises(RbeeError) as caught:
        catalog.add(entry("tiny-2", reference="hf:org/repo"))
    assert caught.value.code == ErrorCode.MODEL_ALREADY_EXISTS
    assert caught.value.details["model"] == "tiny"
    assert catalog.get("tiny-2") is None


def test_b35_replace_overwrites_the_row(catalog: Catalog) -> None:
    catalog.add(entry("tiny"))
    catalog.add(entry("tiny", layers=7), replace=True)
    assert [e.layers for e in catalog.list()] == [7]


def test_b35_failed_replace_keeps_the_old_row(catalog: Catalog) -> None:
    catalog.add(entry("tiny"))
    catalog.add(entry("other", reference="hf:org/taken"))
    with pytest.raises(RbeeError):
        catalog.add(entry("tiny", reference="hf:org/taken"), replace=True)
    assert catalog.get("tiny") == entry("tiny")


def test_b35_require_unknown_model_lists_known(catalog: Catalog) -> None:
    catalog.add(entry("tiny"))
    assert catalog.require("tiny") == entry("tiny")
    with pytest.raises(RbeeError) as caught:
        catalog.require("nope")
    err = caught.value
    assert err.code == ErrorCode.MODEL_NOT_FOUND
    assert err.http_status == 404
    assert "'nope'" in err.message
    assert err.details["known"] == ["tiny"]


def test_b35_database_is_in_wal_mode(tmp_path: Path) -> None:
    db = tmp_path / "catalog.sqlite3"
    Catalog(db).close()
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        columns = [row[1] for row in conn.execute("PRAGMA table_info(models)")]
    finally:
        conn.close()
    assert columns == [
        "id", "provider", "reference", "local_path", "size_bytes", "sha256",
        "quantization", "architecture", "layers", "context_length", "added_at",
    ]  # fmt: skip


def test_b35_catalog_is_usable_from_worker_threads(catalog: Catalog) -> None:
    # The agent calls the catalog through asyncio.to_thread: many threads, one connection.
    names = [f"m{i}" for i in range(24)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(lambda n: catalog.add(entry(n)), names))
        got = list(pool.map(catalog.get, names))
    assert [g.id if g else None for g in got] == names
    assert len(catalog.list()) == len(names)


def test_b35_unknown_provider_is_refused_by_the_model() -> None:
    with pytest.raises(ValueError):
        entry("tiny", provider="s3")


# --------------------------------------------------------------------------- register_file


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct.q4_1"),
        ("My Model (final) Q4_K_M.GGUF", "my-model-final-q4_k_m"),
        ("--weird__name--.gguf", "weird__name"),
        ("日本語.gguf", "model"),
        ("x" * 200 + ".gguf", "x" * 56),
    ],
)
def test_b35_id_derived_from_file_name(filename: str, expected: str) -> None:
    assert derive_id(filename) == expected


def test_b35_register_file_derives_and_deduplicates_ids(catalog: Catalog, tmp_path: Path) -> None:
    first = catalog.register_file(write_gguf(tmp_path / "a" / "Tiny Model.gguf"))
    second = catalog.register_file(write_gguf(tmp_path / "b" / "Tiny Model.gguf"))
    assert first.id == "tiny-model"
    assert second.id == "tiny-model-2"
    assert first.provider == second.provider == "file"
    assert first.reference == (tmp_path / "a" / "Tiny Model.gguf").as_uri()
    assert {e.local_path for e in catalog.list()} == {
        str(tmp_path / "a" / "Tiny Model.gguf"),
        str(tmp_path / "b" / "Tiny Model.gguf"),
    }


def test_b35_register_same_file_twice_keeps_one_row(catalog: Catalog, tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "tiny.gguf", layers=4)
    first = catalog.register_file(path, compute_sha256=True)
    write_gguf(path, layers=6)  # the file changed in place: same size, new header values
    time.sleep(0.01)
    again = catalog.register_file(path)
    assert again.id == first.id
    assert again.added_at == first.added_at
    assert again.layers == 6
    assert first.sha256 is not None and again.sha256 is None  # the old hash may be stale
    assert len(catalog.list()) == 1


def test_b35_register_with_explicit_id_provider_and_reference(
    catalog: Catalog, tmp_path: Path
) -> None:
    path = write_gguf(tmp_path / "dl" / "x.gguf")
    got = catalog.register_file(path, id="tinyllama", provider="hf", reference="hf:org/repo/x.gguf")
    assert catalog.get("tinyllama") == got
    assert (got.provider, got.reference) == ("hf", "hf:org/repo/x.gguf")
    assert catalog.find_by_reference("hf:org/repo/x.gguf") == got


def test_b35_register_refuses_taken_or_invalid_id(catalog: Catalog, tmp_path: Path) -> None:
    catalog.register_file(write_gguf(tmp_path / "a.gguf"), id="tiny")
    with pytest.raises(RbeeError) as taken:
        catalog.register_file(write_gguf(tmp_path / "b.gguf"), id="tiny")
    assert taken.value.code == ErrorCode.MODEL_ALREADY_EXISTS
    with pytest.raises(RbeeError) as renamed:
        catalog.register_file(tmp_path / "a.gguf", id="another-name")
    assert renamed.value.code == ErrorCode.MODEL_ALREADY_EXISTS
    with pytest.raises(RbeeError) as bad:
        catalog.register_file(tmp_path / "b.gguf", id="Bad Name")
    assert bad.value.code == ErrorCode.INVALID_REQUEST
    assert [e.id for e in catalog.list()] == ["tiny"]


def test_b35_register_refuses_a_file_that_is_not_gguf(catalog: Catalog, tmp_path: Path) -> None:
    path = tmp_path / "notes.gguf"
    path.write_bytes(b"not a model at all")
    with pytest.raises(RbeeError) as caught:
        catalog.register_file(path)
    assert caught.value.code == ErrorCode.MODEL_FILE_INVALID
    with pytest.raises(RbeeError) as missing:
        catalog.register_file(tmp_path / "missing.gguf")
    assert missing.value.code == ErrorCode.MODEL_FILE_INVALID
    assert catalog.list() == []


def test_b35_sha256_only_when_asked(catalog: Catalog, tmp_path: Path) -> None:
    plain = catalog.register_file(write_gguf(tmp_path / "plain.gguf"))
    assert plain.sha256 is None
    path = write_gguf(tmp_path / "hashed.gguf")
    hashed = catalog.register_file(path, compute_sha256=True)
    assert hashed.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_sha256(path) == hashed.sha256
    given = catalog.register_file(write_gguf(tmp_path / "given.gguf"), sha256="0" * 64)
    assert given.sha256 == "0" * 64


def test_b35_owned_file_only_inside_models_dir(tmp_path: Path) -> None:
    models = tmp_path / "models"
    inside = entry("a", local_path=str(models / "hf" / "a.gguf"))
    outside = entry("b", local_path=str(tmp_path / "elsewhere" / "b.gguf"))
    sneaky = entry("c", local_path=str(models / ".." / "c.gguf"))
    assert owned_file(inside, models) == (models / "hf" / "a.gguf").resolve()
    assert owned_file(outside, models) is None
    assert owned_file(sneaky, models) is None


# --------------------------------------------------------------------------- B38


def test_b38_metadata_read_from_header(smollm2_registered: CatalogEntry) -> None:
    got = smollm2_registered
    assert got.id == "smollm2-135m-instruct.q4_1"
    assert got.architecture == "llama"
    assert got.layers == 30
    assert got.quantization == "Q4_1"
    assert got.context_length == 8192
    assert got.size_bytes == bundled_model_path().stat().st_size
    assert got.local_path == str(bundled_model_path().resolve())
    assert got.sha256 is None


def test_b38_metadata_of_a_written_file(catalog: Catalog, tmp_path: Path) -> None:
    got = catalog.register_file(
        write_gguf(tmp_path / "g.gguf", layers=9, context=2048, arch="gemma3")
    )
    assert (got.architecture, got.layers, got.context_length, got.quantization) == (
        "gemma3",
        9,
        2048,
        "Q8_0",
    )
