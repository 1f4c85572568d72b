"""A damaged catalog: keep a backup, and rebuild the catalog from the models directory (B130).

The catalog only records files that are on disk, so it can be rebuilt from them: every GGUF
file under `<models dir>/hf/<org>/<repo>/<revision>/` becomes an `hf:` model again (with the
reference a download would have given it), any other GGUF file in the models dir a `file:`
model; bundled models are registered again at start-up anyway. sha256 sums are not
recomputed (the next download of a model checks its file again).

The damaged file is never deleted: it is copied aside as `catalog.sqlite3.damaged-<time>`
the moment it is found, before anything else touches it.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from urllib.parse import unquote

from rbee_agent.catalog import Catalog
from rbee_agent.model_refs import HfRef
from rbee_agent.protocol import ErrorCode, RbeeError
from rbee_agent.provision import HF_SUBDIR, PARTIAL_SUFFIX, SPLIT_RE

log = logging.getLogger("rbee.agent")

_SIDE_FILES = ("-wal", "-shm")


def open_catalog(path: Path, busy_timeout_s: float) -> Catalog:
    """The catalog at `path`; CATALOG_CORRUPT (after a backup is made) when it is damaged."""
    try:
        return Catalog(path, busy_timeout_s)
    except RbeeError as err:
        if err.code != ErrorCode.CATALOG_CORRUPT:
            raise
        backup = backup_damaged(path)
        err.message += f"; a copy is kept as {backup.name}"
        err.details["backup"] = str(backup)
        raise


def backup_damaged(path: Path) -> Path:
    """Copy the damaged database (and its WAL files) aside once; the copy's path."""
    existing = sorted(path.parent.glob(path.name + ".damaged-*"))
    if existing and existing[-1].stat().st_size == path.stat().st_size:
        return existing[-1]
    backup = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    shutil.copy2(path, backup)
    for suffix in _SIDE_FILES:
        side = path.with_name(path.name + suffix)
        if side.exists():
            shutil.copy2(side, backup.with_name(backup.name + suffix))
    return backup


def rebuild_catalog(path: Path, models_dir: Path, busy_timeout_s: float) -> list[str]:
    """Move a damaged catalog aside (backed up) and build a new one from `models_dir`.

    Returns the ids registered. A catalog that opens fine is left alone (and rescanned).
    """
    try:
        catalog = Catalog(path, busy_timeout_s)
    except RbeeError as err:
        if err.code != ErrorCode.CATALOG_CORRUPT:
            raise
        backup = backup_damaged(path)
        log.warning("catalog %s is damaged; kept as %s, rebuilding from %s", path, backup.name,
                    models_dir)
        for suffix in ("", *_SIDE_FILES):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        catalog = Catalog(path, busy_timeout_s)
    with catalog:
        return _register_models(catalog, models_dir)


def _register_models(catalog: Catalog, models_dir: Path) -> list[str]:
    added = []
    hf_root = models_dir / HF_SUBDIR
    for file in sorted(models_dir.rglob("*.gguf")):
        if file.name.endswith(PARTIAL_SUFFIX) or _later_part(file):
            continue
        reference = _hf_reference(file, hf_root)
        try:
            if reference is not None:
                entry = catalog.find_by_reference(reference) or catalog.register_file(
                    file, None, "hf", reference)
            else:
                entry = catalog.find_by_reference(file.resolve().as_uri()) or \
                    catalog.register_file(file)
        except RbeeError as err:
            log.warning("not in the rebuilt catalog: %s (%s)", file, err.message)
            continue
        added.append(entry.id)
    return added


def _later_part(file: Path) -> bool:
    match = SPLIT_RE.fullmatch(file.name)
    return match is not None and int(match["part"]) != 1


def _hf_reference(file: Path, hf_root: Path) -> str | None:
    """`hf:org/repo/path[@revision]` for a file in the download layout, else None."""
    if not file.is_relative_to(hf_root):
        return None
    parts = file.relative_to(hf_root).parts
    if len(parts) < 4:
        return None
    org, repo, revision, *inside = parts
    rev = unquote(revision)
    return str(HfRef(org, repo, "/".join(inside), None if rev == "main" else rev))
