"""The node's model catalog: one SQLite table of the GGUF models this node can serve (B35).

Each row is a `protocol.CatalogEntry` — short id, provider (bundled, file, hf), the reference
it came from, the local file, its size, sha256 when known, and metadata read from the GGUF
header (B38). The agent keeps the database at `<data dir>/catalog.sqlite3`, so it survives
restarts.

A `Catalog` is safe to share between threads (the agent calls it via `asyncio.to_thread`):
writes go through one connection guarded by a lock; reads use a connection per thread, so a
write that waits for a lock held by another process never holds up `GET /v1/models` (WAL
readers do not wait for writers). A write that cannot get the database within
`busy_timeout_s` is CATALOG_BUSY; a full disk is INSUFFICIENT_DISK; a damaged file is
CATALOG_CORRUPT (B130) — never a raw sqlite3 error.

This module must never download, copy or delete model files, and never load weights: it
records files that other code has put in place, and reads only their headers. Hashing a whole
file is slow on big models, so it happens only when a caller asks for it.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
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
    """The entry's file when rbee downloaded it into `models_dir` (so deleting the model
    deletes it).

    Anything else — a bundled model in site-packages, a user's `file:` model, even one the
    user placed inside the models dir (B131) — is not rbee's to delete: `None`.
    """
    if entry.provider != "hf":
        return None
    path = Path(entry.local_path).resolve()
    return path if path.is_relative_to(models_dir.resolve()) else None


def sqlite_error(exc: sqlite3.Error, path: Path) -> RbeeError:
    """A sqlite3 error as the RbeeError a client can act on."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
        return RbeeError(
            ErrorCode.CATALOG_BUSY,
            f"The model catalog {path} is locked by another process",
            hint="Try again in a moment; if it stays locked, look for another program "
            "holding the file (lsof).",
            details={"path": str(path), "retry_after_s": 1},
        )
    if name.startswith("SQLITE_FULL") or "disk is full" in text:
        return RbeeError(
            ErrorCode.INSUFFICIENT_DISK,
            f"The disk holding the model catalog {path} is full",
            hint="Free some space on that disk (delete unused models: rbee models rm).",
            details={"path": str(path)},
        )
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or "not a database" in text:
        return RbeeError(
            ErrorCode.CATALOG_CORRUPT,
            f"The model catalog {path} is damaged ({text})",
            hint="Start the agent with --rebuild-catalog: it keeps the damaged file as a "
            "backup and rebuilds the catalog from the models directory.",
            details={"path": str(path)},
        )
    return RbeeError(
        ErrorCode.CATALOG_BUSY,
        f"The model catalog {path} could not be used: {text}",
        hint="Check the data directory's permissions and free space, then try again.",
        details={"path": str(path)},
    )


class Catalog:
    """The model catalog in one SQLite file (WAL mode). Use from any thread."""

    def __init__(self, path: Path, busy_timeout_s: float = 5.0) -> None:
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._readers = threading.local()
        self._all: builtins.list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        try:
            self._conn = self._connect()
            with self._lock, self._conn:
                if self._conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                    raise sqlite3.DatabaseError("file is not a database (quick_check failed)")
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute(_SCHEMA)
                self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            self.close()
            raise sqlite_error(exc, path) from None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, timeout=self.busy_timeout_s)
        conn.row_factory = sqlite3.Row
        with self._all_lock:
            self._all.append(conn)
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._readers, "conn", None)
        if conn is None:
            conn = self._readers.conn = self._connect()
        return conn

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; sqlite3 errors come out as RbeeErrors."""
        try:
            with self._lock, self._conn:
                yield self._conn
        except sqlite3.Error as exc:
            raise sqlite_error(exc, self.path) from None

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        with self._all_lock:
            conns, self._all = self._all, []
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

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
            with self._writing() as conn:  # one transaction: a replaced row is never half-lost
                conn.execute("DELETE FROM models WHERE id = ?", (entry.id,))
                conn.execute(_INSERT, entry.model_dump())
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
        return [_entry(row) for row in self._read("SELECT * FROM models ORDER BY id")]

    def remove(self, model_id: str) -> CatalogEntry | None:
        """Delete the row (not the file; see `owned_file`). The removed entry, or None."""
        with self._lock:
            entry = self.get(model_id)
            if entry is not None:
                with self._writing() as conn:
                    conn.execute("DELETE FROM models WHERE id = ?", (model_id,))
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

    def _read(self, sql: str, *args: str) -> builtins.list[sqlite3.Row]:
        try:
            return self._reader().execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise sqlite_error(exc, self.path) from None

    def _one(self, sql: str, value: str) -> CatalogEntry | None:
        rows = self._read(sql, value)
        return _entry(rows[0]) if rows else None


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
