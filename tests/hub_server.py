"""A Hugging Face hub on loopback for tests and benchmarks: real protocol, real GGUF bytes.

It speaks the parts of the hub protocol rbee uses:

- `GET /api/models/{org}/{repo}[/revision/{rev}]` (`?blobs=true` adds sizes and LFS sha256);
- `HEAD`/`GET /{org}/{repo}/resolve/{rev}/{path}`: a `302` to the CDN with `X-Repo-Commit`,
  `X-Linked-Etag` (the sha256) and `X-Linked-Size`, as the hub does for LFS files;
- `HEAD`/`GET /cdn/{sha256}`: the bytes, with `Range` (206, `Content-Range`, 416), ETag;
- errors the hub's way: `X-Error-Code` `RepoNotFound` (401 without a token, 404 with one),
  `RevisionNotFound`, `EntryNotFound`, and `GatedRepo` (401 without a token, 403 with a
  wrong one).

Faults are injected on demand into the next CDN GETs (`hub.fault(kind, ...)`): `drop`
(connection closed cleanly part-way), `reset` (TCP RST part-way), `stall` (bytes stop),
`hold` (a byte every 0.1 s until `hub.release()`), `corrupt` (one byte flipped), `trickle` (slow
small chunks for a while), `status` (an HTTP error instead of the bytes). Every request is
logged (`hub.log`) with its Range header and the body bytes actually sent.

Bytes are served with `sendfile` from the file on disk (no copies), so the hub itself is not
what limits a throughput benchmark.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs, unquote, urlsplit

SEND_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Blob:
    """`length` bytes of a file from `start`: a whole model, or one part of a split one."""

    path: Path
    start: int = 0
    length: int = -1

    @property
    def size(self) -> int:
        return self.path.stat().st_size - self.start if self.length < 0 else self.length

    @property
    def sha256(self) -> str:
        return _sha256(self.path, self.start, self.size)


@functools.cache
def _sha256(path: Path, start: int, length: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        fh.seek(start)
        left = length
        while left > 0:
            chunk = fh.read(min(SEND_CHUNK * 8, left))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


@dataclass
class Repo:
    repo_id: str
    files: dict[str, Blob | bytes]
    gated: bool = False
    commit: str = ""
    revisions: tuple[str, ...] = ("main",)


@dataclass
class Fault:
    kind: str  # drop, reset, stall, hold, corrupt, trickle, status
    at: float = 0.4  # where in the file it strikes (fraction of the file)
    status: int = 500
    seconds: float = 5.0  # stall length; trickle duration
    file: str | None = None  # only a blob with this sha256; None: any
    times: int = 1


@dataclass
class Served:
    method: str
    path: str
    range: str | None
    authorization: str | None
    status: int = 0
    sent: int = 0
    fault: str | None = None
    done: bool = False
    at: float = field(default_factory=time.monotonic)

    @property
    def range_start(self) -> int | None:
        m = _RANGE_RE.fullmatch(self.range or "")
        return int(m[1]) if m else None


@dataclass
class TestHub:
    __test__: ClassVar[bool] = False  # not a pytest test class

    token: str | None = None
    listing_sizes: bool = True  # False: a mirror whose listing has no sizes or LFS info
    repos: dict[str, Repo] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    log: list[Served] = field(default_factory=list)
    held: threading.Event = field(default_factory=threading.Event)
    _release: threading.Event = field(default_factory=threading.Event)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ setup

    def start(self) -> TestHub:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.hub = self  # type: ignore[attr-defined]
        self._server = server
        threading.Thread(target=server.serve_forever, name="test-hub", daemon=True).start()
        return self

    def close(self) -> None:
        self._stopping.set()
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> TestHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add_repo(self, repo_id: str, files: dict[str, Blob | bytes], *, gated: bool = False,
                 revisions: tuple[str, ...] = ("main",)) -> Repo:
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        all_files: dict[str, Blob | bytes] = {
            "README.md": f"# {repo_id}\n".encode(), ".gitattributes": b"*.gguf filter=lfs\n",
            **files,
        }
        repo = Repo(repo_id, all_files, gated, commit, revisions)
        self.repos[repo_id] = repo
        return repo

    def fault(self, kind: str, **kw: Any) -> Fault:
        fault = Fault(kind, **kw)
        with self._lock:
            self.faults.append(fault)
        return fault

    def release(self) -> None:
        """Let a `hold` fault go on sending."""
        self._release.set()

    # ------------------------------------------------------------------ log

    def cdn_gets(self, blob: Blob | None = None) -> list[Served]:
        prefix = "/cdn/" + (blob.sha256 if blob else "")
        return [s for s in self.log if s.method == "GET" and s.path.startswith(prefix)]

    def wait_for(self, check: Any, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.01)
        raise AssertionError(f"test hub: condition not met in {timeout}s; log: {self.log}")

    def _take_fault(self, sha: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.file in (None, sha):
                    fault.times -= 1
                    if fault.times <= 0:
                        self.faults.remove(fault)
                    return fault
        return None


_API_RE = re.compile(r"/api/models/([^/]+/[^/]+?)(?:/revision/([^/]+))?")
_RESOLVE_RE = re.compile(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)")
_CDN_RE = re.compile(r"/cdn/([0-9a-f]{64})")
_RANGE_RE = re.compile(r"bytes=(\d+)-(\d*)")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "test-hub/1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    @property
    def hub(self) -> TestHub:
        return self.server.hub  # type: ignore[attr-defined, no-any-return]

    def do_GET(self) -> None:
        self._route()

    def do_HEAD(self) -> None:
        self._route()

    # ------------------------------------------------------------------ routing

    def _route(self) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        record = Served(self.command, path, self.headers.get("Range"),
                        self.headers.get("Authorization"))
        self.hub.log.append(record)
        self.record = record
        try:
            if m := _API_RE.fullmatch(path):
                self._model_info(m[1], m[2], parse_qs(parts.query))
            elif m := _RESOLVE_RE.fullmatch(path):
                self._resolve(m[1], m[2], m[3])
            elif m := _CDN_RE.fullmatch(path):
                self._cdn(m[1])
            else:
                self._error(404, "", "Not found")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            record.done = True

    def _repo(self, repo_id: str, revision: str | None) -> Repo | None:
        """The repo when this request may see it; else answers the error and returns None."""
        repo = self.hub.repos.get(repo_id)
        auth = self.headers.get("Authorization")
        if repo is None:
            self._error(401 if auth is None else 404, "RepoNotFound", "Repository not found")
            return None
        if repo.gated and auth != f"Bearer {self.hub.token}":
            self._error(401 if auth is None else 403, "GatedRepo",
                        f"Access to model {repo_id} is restricted.")
            return None
        if revision is not None and revision not in (*repo.revisions, repo.commit):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo

    def _model_info(self, repo_id: str, revision: str | None,
                    query: dict[str, list[str]]) -> None:
        repo = self._repo(repo_id, revision)
        if repo is None:
            return
        blobs = query.get("blobs") == ["true"] and self.hub.listing_sizes
        siblings = []
        for name, content in repo.files.items():
            sibling: dict[str, Any] = {"rfilename": name}
            if blobs and isinstance(content, Blob):
                sibling.update(blobId=content.sha256[:40], size=content.size,
                               lfs={"sha256": content.sha256, "size": content.size,
                                    "pointerSize": 134})
            elif blobs:
                sibling.update(blobId=hashlib.sha1(content).hexdigest(), size=len(content))
            siblings.append(sibling)
        body = {"_id": repo.commit[:24], "id": repo_id, "modelId": repo_id, "sha": repo.commit,
                "private": False, "gated": "manual" if repo.gated else False,
                "tags": ["gguf"], "siblings": siblings}
        self._json(200, body)

    def _resolve(self, repo_id: str, revision: str, name: str) -> None:
        repo = self._repo(repo_id, revision)
        if repo is None:
            return
        content = repo.files.get(name)
        if content is None:
            self._error(404, "EntryNotFound", f"{name} does not exist on \"{revision}\"")
            return
        if isinstance(content, bytes):  # a small file kept in git: served in place
            self.record.status = 200
            self.send_response(200)
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("ETag", f'"{hashlib.sha1(content).hexdigest()}"')
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(content)
            return
        self.record.status = 302
        self.send_response(302)
        self.send_header("Location", f"{self.hub.url}/cdn/{content.sha256}")
        self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("X-Linked-Etag", f'"{content.sha256}"')
        self.send_header("X-Linked-Size", str(content.size))
        self.send_header("ETag", f'"{content.sha256[:40]}"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _cdn(self, sha: str) -> None:
        blob = next((c for r in self.hub.repos.values() for c in r.files.values()
                     if isinstance(c, Blob) and c.sha256 == sha), None)
        if blob is None:
            self._error(404, "", "No such object")
            return
        size = blob.size
        start, end = 0, size
        wanted = self.headers.get("Range")
        if wanted:
            m = _RANGE_RE.fullmatch(wanted.strip())
            if m is None or int(m[1]) >= size:
                self.record.status = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = int(m[1])
            end = min(size, int(m[2]) + 1) if m[2] else size
        fault = self.hub._take_fault(sha) if self.command == "GET" else None
        self.record.fault = fault.kind if fault else None
        if fault is not None and fault.kind == "status":
            self._error(fault.status, "", f"injected {fault.status}")
            return
        status = 206 if wanted else 200
        self.record.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{sha}"')
        if wanted:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if self.command == "GET":
            self._send_bytes(blob, start, end, fault)

    # ------------------------------------------------------------------ bytes and faults

    def _send_bytes(self, blob: Blob, start: int, end: int, fault: Fault | None) -> None:
        strike = int(blob.size * fault.at) if fault else -1
        with blob.path.open("rb") as fh:
            if fault is None or (fault.kind == "corrupt" and not start <= strike < end):
                self._sendfile(fh, blob, start, end)
            elif fault.kind == "corrupt":
                self._sendfile(fh, blob, start, strike)
                fh.seek(blob.start + strike)
                flipped = bytes([fh.read(1)[0] ^ 0xFF])
                self._sendall(flipped)
                self._sendfile(fh, blob, strike + 1, end)
            elif fault.kind == "trickle":
                self._trickle(fh, blob, start, end, fault.seconds)
            else:
                stop = max(start, min(strike, end))
                self._sendfile(fh, blob, start, stop)
                self._interrupt(fault, fh, blob, stop, end)

    def _interrupt(self, fault: Fault, fh: Any, blob: Blob, at: int, end: int) -> None:
        if fault.kind == "hold":  # a byte every 0.1 s: slow, but never a stall
            self.hub.held.set()
            while at < end and not self.hub._release.wait(0.1):
                self._sendfile(fh, blob, at, at + 1)
                at += 1
            self._sendfile(fh, blob, at, end)
            return
        if fault.kind == "stall":
            self.hub._stopping.wait(fault.seconds)
        self.close_connection = True
        if fault.kind == "reset":  # RST: SO_LINGER with a zero timeout, then close
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.connection.close()
            return
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_WR)  # a clean close, mid-body

    def _trickle(self, fh: Any, blob: Blob, start: int, end: int, seconds: float) -> None:
        until = time.monotonic() + seconds
        pos = start
        while pos < end and time.monotonic() < until:
            step = min(64 * 1024, end - pos)
            self._sendfile(fh, blob, pos, pos + step)
            pos += step
            time.sleep(0.05)
        self._sendfile(fh, blob, pos, end)

    def _sendfile(self, fh: Any, blob: Blob, start: int, end: int) -> None:
        if end <= start:
            return
        sent = self.connection.sendfile(fh, blob.start + start, end - start)
        self.record.sent += sent

    def _sendall(self, data: bytes) -> None:
        self.connection.sendall(data)
        self.record.sent += len(data)

    # ------------------------------------------------------------------ replies

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.record.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(data)

    def _error(self, status: int, code: str, message: str) -> None:
        data = json.dumps({"error": message}).encode()
        self.record.status = status
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(data)


def main() -> None:
    """`python -m tests.hub_server ORG/REPO FILE=PATH…`: serve until killed; prints the URL."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Serve GGUF files as a Hugging Face hub.")
    parser.add_argument("repo", help="org/repo")
    parser.add_argument("files", nargs="+", metavar="NAME=PATH")
    args = parser.parse_args()
    hub = TestHub().start()
    hub.add_repo(args.repo, {name: Blob(Path(path)) for name, path in
                             (item.split("=", 1) for item in args.files)})
    for blob in hub.repos[args.repo].files.values():
        if isinstance(blob, Blob):
            _ = blob.sha256  # hash before saying we are up
    print(hub.url, flush=True)
    try:
        sys.stdin.read()  # until our parent closes the pipe
    finally:
        hub.close()


if __name__ == "__main__":
    main()
