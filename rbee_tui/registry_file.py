"""Safe writes of the operator's config file: a lock, a merge, an atomic durable replace.

`config.save_config` is the one caller. The rules (B145):
- Every read-modify-write holds an exclusive `flock` on the config's folder (a lock that
  needs no extra file, and that the rename of the config cannot take away), so two rbee
  processes never interleave their saves.
- Only temp files written under that lock exist, so any `.config.toml.*` temp file found
  while holding it was left by a writer that died (kill -9): it is removed. A temp file holds
  API keys (mode 0600), and none outlives the next save.
- The new text goes to a temp file in the same folder, created 0600, `fsync`ed, renamed
  over the config, and the folder is `fsync`ed, so after a crash the file is either the old
  one or the new one, never empty, and the rename itself survives a power cut.
- The document is edited in place with tomlkit, so comments and the order a person gave
  the file are kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.container import Container
from tomlkit.items import Table

TEMP_SUFFIX = ".tmp"


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the config's exclusive lock; sweep temp files that dead writers left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for stale in path.parent.glob(_temp_prefix(path) + "*"):
            stale.unlink(missing_ok=True)  # also those of rbee before this lock existed
        yield
    finally:
        os.close(fd)  # closing releases the lock


def read_document(path: Path) -> tomlkit.TOMLDocument:
    """The file as an editable document (empty when it does not exist). The caller has
    already reported a file that does not parse (`read_toml`), so this cannot fail on one."""
    try:
        return tomlkit.parse(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return tomlkit.document()


def subtable(container: Container | Table | tomlkit.TOMLDocument, key: str) -> Table:
    """`container[key]` as a table, made (as a super table: `[nodes.NAME]`) when missing."""
    if key not in container:
        container[key] = tomlkit.table(is_super_table=True)
    table = container[key]
    assert isinstance(table, Table)
    return table


def merge_table(container: Container | Table | tomlkit.TOMLDocument, key: str,
                ours: dict[str, Any], was: dict[str, Any], *, removal_wins: bool = False
                ) -> None:
    """Three-way merge of one table, key by key: what `ours` changed relative to `was` (the
    file as this process read it) is written into the table as the file holds it now; a key
    `ours` dropped is removed; every other key keeps the file's value.

    `removal_wins`: a table that existed when this process read the file and is gone now
    was removed by another process, and stays removed (a node deleted elsewhere).
    """
    if key not in container:
        if not ours or (was and removal_wins):
            return
        container[key] = tomlkit.table()
    table = container[key]
    assert isinstance(table, Table)
    for name, value in ours.items():
        if name not in table or value != was.get(name):
            table[name] = value
    for name in was.keys() - ours.keys():
        table.pop(name, None)


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` durably; the temp file is removed on every exit path."""
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
