"""The node's model catalog: one SQLite table of the GGUF models this node can serve (B35).

Each row is a `protocol.CatalogEntry` — short id, provider (bundled, file, hf), the reference
it came from, the local file, its size, sha256 when known, and metadata read from the GGUF
header (B38). The agent keeps the database at `<data dir>/catalog.sqlite3`, so it survives
restarts.

A `Catalog` is safe to share between threads (the agent calls it via `asyncio.to_thread`):
one connection, opened with `check_same_thread=False`, guarded by a lock.

This module must never download, copy or delete model files, and never load weights: it
records files that other code has put in place, and reads only their headers. Hashing a whole
file is slow on big models, so it happens only when a caller asks for it.
"""

from __future__ import annotations

import builtins
import hashlib
import re
import sqlite3
import threading
import time
from pathlib import Path
from types import TracebackType

from rbee_agent.gguf_meta import read_gguf_meta
from rbee_agent.model_refs import CATALOG_NAME_MAX, CATALOG_NAME_RE
from rbee_agent.protocol import CatalogEntry, ErrorCode, ModelProvider, RbeeError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    id             TEXT PRIMARY KEY,
    provider       TEXT NOT NULL CHECK (provider IN ('bundled', 'file', 'hf')),
    reference      TEXT NOT NULL UNIQUE,
    local_path     TEXT NOT NULL,
    size_bytes     INTEGER NOT NULL,
    sha256         TEXT,
    quantization   TEXT NOT NULL,
    architecture   TEXT NOT NULL,
    layers         INTEGER NOT NULL,
    context_length INTEGER NOT NULL,
    added_at       REAL NOT NULL
)
"""

_COLUMNS = tuple(CatalogEntry.model_fields)
_INSERT = (
    f"INSERT INTO models ({', '.join(_COLUMNS)}) VALUES ({', '.join(':' + c for c in _COLUMNS)})"
)


def derive_id(filename: str) -> str:
    """A catalog id from a file name: lowercase, `.gguf` dropped, unsafe characters → `-`."""
    stem = filename.lower().removesuffix(".gguf")
    slug = re.sub(r"[^a-z0-9._-]+", "-", stem)
    slug = re.sub(r"-{2,}", "-", slug).strip("._-")
    return slug[: CATALOG_NAME_MAX - 8].rstrip("._-") or "model"


def file_sha256(path: Path) -> str:
    """The file's sha256 as hex. Reads the whole file: seconds per gigabyte."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def owned_file(entry: CatalogEntry, models_dir: Path) -> Path | None:
    """The entry's file when it lies inside `models_dir` (so deleting the model deletes it).

    Files elsewhere — a bundled model in site-packages, a user's `file:` model — are not rbee's
    to delete: `None`.
    """
    path = Path(entry.local_path).resolve()
    return path if path.is_relative_to(models_dir.resolve()) else None


class Catalog:
    """The model catalog in one SQLite file (WAL mode). Use from any thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(path, check_same_thread=False, timeout=5.0)
        self._conn.row_factory = sqlite3.Row
        with self._lock, self._conn:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(_SCHEMA)
            self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ rows

    def add(self, entry: CatalogEntry, *, replace: bool = False) -> CatalogEntry:
        """Insert `entry`; with `replace`, an existing row with its id is overwritten.

        MODEL_ALREADY_EXISTS when the id, or the reference, belongs to another row.
        """
        with self._lock:
            same_id = None if replace else self.get(entry.id)
            same_ref = self.find_by_reference(entry.reference)
            clash = same_id or (same_ref if same_ref and same_ref.id != entry.id else None)
            if clash is not None:
                raise _already_exists(entry, clash)
            with self._conn:  # one transaction: a replaced row is never lost half-way
                self._conn.execute("DELETE FROM models WHERE id = ?", (entry.id,))
                self._conn.execute(_INSERT, entry.model_dump())
        return entry

    def get(self, model_id: str) -> CatalogEntry | None:
        return self._one("SELECT * FROM models WHERE id = ?", model_id)

    def require(self, model_id: str) -> CatalogEntry:
        """The entry with this id, or MODEL_NOT_FOUND listing the ids the catalog has."""
        entry = self.get(model_id)
        if entry is not None:
            return entry
        known = [e.id for e in self.list()]
        raise RbeeError(
            ErrorCode.MODEL_NOT_FOUND,
            f"No model named {model_id!r} in this node's catalog",
            hint="List the models with 'rbee models list', or give an hf: or file:// reference.",
            details={"model": model_id, "known": known},
        )

    def find_by_reference(self, reference: str) -> CatalogEntry | None:
        return self._one("SELECT * FROM models WHERE reference = ?", reference)

    def list(self) -> builtins.list[CatalogEntry]:
        with self._lock:
            rows = self._conn.execute("SELECT * FROM models ORDER BY id").fetchall()
        return [_entry(row) for row in rows]

    def remove(self, model_id: str) -> CatalogEntry | None:
        """Delete the row (not the file; see `owned_file`). The removed entry, or None."""
        with self._lock:
            entry = self.get(model_id)
            if entry is not None:
                with self._conn:
                    self._conn.execute("DELETE FROM models WHERE id = ?", (model_id,))
        return entry

    def unique_id(self, base: str) -> str:
        """`base`, or `base-2`, `base-3`… whichever no row uses yet."""
        with self._lock:
            candidate, n = base, 1
            while self.get(candidate) is not None:
                n += 1
                candidate = f"{base}-{n}"
            return candidate

    # ------------------------------------------------------------------ files

    def register_file(
        self,
        path: Path,
        id: str | None = None,
        provider: ModelProvider = "file",
        reference: str | None = None,
        *,
        compute_sha256: bool = False,
        sha256: str | None = None,
    ) -> CatalogEntry:
        """Record a GGUF file, its metadata read from the header (B38).

        `reference` defaults to the file's `file://` URI. Registering a reference again
        refreshes its row and keeps its id and added time. Without `id`, one is derived from
        the file name and made unique. `compute_sha256` hashes the whole file (slow); a
        caller that already knows the hash passes `sha256` instead. Otherwise sha256 is
        `None`, even on a refresh: the file may have changed since it was last hashed.
        """
        path = path.resolve()
        meta = read_gguf_meta(path)  # MODEL_FILE_INVALID when missing or not GGUF
        size = path.stat().st_size
        if compute_sha256:
            sha256 = file_sha256(path)
        reference = reference or path.as_uri()
        if id is not None:
            _check_id(id)
        with self._lock:
            old = self.find_by_reference(reference)
            if old is not None and id is not None and id != old.id:
                raise RbeeError(
                    ErrorCode.MODEL_ALREADY_EXISTS,
                    f"{reference} is already in the catalog as {old.id!r}",
                    hint=f"Use the name {old.id!r}, or remove it first.",
                    details={"model": old.id, "reference": reference},
                )
            if old is not None:
                model_id, added_at = old.id, old.added_at
            else:
                model_id, added_at = id or self.unique_id(derive_id(path.name)), time.time()
            entry = CatalogEntry(
                id=model_id,
                provider=provider,
                reference=reference,
                local_path=str(path),
                size_bytes=size,
                sha256=sha256,
                quantization=meta.quantization,
                architecture=meta.architecture,
                layers=meta.layers,
                context_length=meta.context_length,
                added_at=added_at,
            )
            return self.add(entry, replace=old is not None)

    # ------------------------------------------------------------------ internals

    def _one(self, sql: str, value: str) -> CatalogEntry | None:
        with self._lock:
            row = self._conn.execute(sql, (value,)).fetchone()
        return None if row is None else _entry(row)


def _entry(row: sqlite3.Row) -> CatalogEntry:
    return CatalogEntry.model_validate(dict(row))


def _check_id(model_id: str) -> None:
    if CATALOG_NAME_RE.fullmatch(model_id) and len(model_id) <= CATALOG_NAME_MAX:
        return
    raise RbeeError(
        ErrorCode.INVALID_REQUEST,
        f"{model_id!r} cannot be a model name: use up to {CATALOG_NAME_MAX} lowercase letters, "
        "digits, '.', '_' and '-', starting with a letter or digit",
        details={"model": model_id},
    )


def _already_exists(entry: CatalogEntry, clash: CatalogEntry) -> RbeeError:
    what = f"the name {entry.id!r}" if clash.id == entry.id else f"{entry.reference}"
    return RbeeError(
        ErrorCode.MODEL_ALREADY_EXISTS,
        f"The catalog already has {what} (model {clash.id!r})",
        hint="Pick another name, or remove the existing model first.",
        details={"model": clash.id, "reference": clash.reference},
    )
