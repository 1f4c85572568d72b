"""Read the agent's and the workers' log files: the last N lines, then follow (B34).

Following polls the file (cheap: one stat per interval) and copes with rotation: when the
file shrinks or is replaced, reading starts again from its beginning.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path


def tail_lines(path: Path, count: int) -> list[str]:
    """The last `count` lines of a file (read from the end, so big logs stay cheap)."""
    if count <= 0 or not path.exists():
        return []
    block = 64 * 1024
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        end = fh.tell()
        data = b""
        while end > 0 and data.count(b"\n") <= count:
            start = max(0, end - block)
            fh.seek(start)
            data = fh.read(end - start) + data
            end = start
    lines: deque[str] = deque(maxlen=count)
    for line in data.decode("utf-8", "replace").splitlines():
        lines.append(line)
    return list(lines)


async def follow_lines(path: Path, poll_s: float = 0.2) -> AsyncIterator[str]:
    """Lines appended to `path` from now on, forever (the caller stops iterating)."""
    now = await asyncio.to_thread(_size_and_inode, path)
    position, inode = now if now is not None else (0, None)
    partial = ""
    while True:
        await asyncio.sleep(poll_s)
        now = await asyncio.to_thread(_size_and_inode, path)
        if now is None:
            continue
        size, current = now
        if current != inode or size < position:
            inode, position, partial = current, 0, ""
        if size == position:
            continue
        chunk, position = await asyncio.to_thread(_read_from, path, position)
        text = partial + chunk
        *complete, partial = text.split("\n")
        for line in complete:
            yield line


def _size_and_inode(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_size, stat.st_ino


def _read_from(path: Path, position: int) -> tuple[str, int]:
    with path.open("rb") as fh:
        fh.seek(position)
        data = fh.read()
    return data.decode("utf-8", "replace"), position + len(data)
