"""An async client for the parts of the Hugging Face hub protocol that rbee uses (B36, B37).

- Repo listing: `GET {endpoint}/api/models/{org}/{repo}[/revision/{rev}]?blobs=true` gives
  the commit and every file with its size and, for LFS files, its sha256.
- File metadata: `HEAD {endpoint}/{org}/{repo}/resolve/{rev}/{path}`, following only
  relative redirects (a renamed repo), never the one to the CDN: that reply carries
  `X-Linked-Size`, `X-Linked-Etag` (the LFS sha256) and `X-Repo-Commit`.
- File bytes: `GET` of the same URL, redirects followed, with `Range` to resume. httpx drops
  the token when a redirect leaves the hub's origin.

`HF_ENDPOINT` picks the hub (a mirror, or a test server) and `HF_TOKEN` (or the older
`HUGGING_FACE_HUB_TOKEN`) is sent as a bearer token. Hub errors become `RbeeError`s:
the hub's `X-Error-Code` (`RepoNotFound`, `EntryNotFound`, `RevisionNotFound`) or a 404 →
MODEL_NOT_FOUND; other 401/403 (`GatedRepo`, a private repo) → MODEL_ACCESS_DENIED with the
HF_TOKEN hint. Transport errors and 5xx replies of the listing calls are retried with the
download backoff; `DOWNLOAD_FAILED` after the last attempt.

This module never touches the file system and never logs or returns the token.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import httpx

from rbee_agent import __version__
from rbee_agent.model_refs import HfRef
from rbee_agent.protocol import ErrorCode, RbeeError
from rbee_agent.settings import AgentSettings

log = logging.getLogger("rbee.agent")

DEFAULT_ENDPOINT = "https://huggingface.co"
ENDPOINT_ENV = "HF_ENDPOINT"
TOKEN_ENVS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
TOKEN_HINT = (
    "Set HF_TOKEN in the agent's environment to a Hugging Face token that can read this "
    "repo (for a gated model, accept its licence on the model page first), then restart "
    "the agent."
)
NOT_FOUND_CODES = {"RepoNotFound", "EntryNotFound", "RevisionNotFound"}
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_MAX_RELATIVE_REDIRECTS = 5


@dataclass(frozen=True)
class HubFile:
    """One file of a repo as the listing describes it (size/sha256 may be unknown)."""

    path: str
    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class RepoInfo:
    repo_id: str
    commit: str | None
    files: tuple[HubFile, ...]


@dataclass(frozen=True)
class FileMeta:
    """What a `HEAD` of a resolve URL says about one file."""

    size: int | None
    sha256: str | None
    commit: str | None


class Retryable(Exception):
    """A failure worth another attempt (a broken connection, a 5xx), with its description."""


class HubClient:
    def __init__(
        self,
        endpoint: str,
        token: str | None,
        *,
        attempts: int,
        backoff_s: float,
        connect_timeout_s: float,
        stall_timeout_s: float,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self._token = token or None
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.stall_timeout_s = stall_timeout_s
        headers = {"User-Agent": f"rbee/{__version__}", "Accept-Encoding": "identity"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        self.http = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(connect_timeout_s, read=stall_timeout_s,
                                  write=stall_timeout_s, pool=connect_timeout_s),
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=4),
        )

    @classmethod
    def from_env(cls, settings: AgentSettings, env: Mapping[str, str]) -> HubClient:
        token = next((env[name].strip() for name in TOKEN_ENVS if env.get(name, "").strip()),
                     None)
        return cls(
            env.get(ENDPOINT_ENV, "").strip() or DEFAULT_ENDPOINT,
            token,
            attempts=settings.download_attempts,
            backoff_s=settings.download_backoff_s,
            connect_timeout_s=settings.download_connect_timeout_s,
            stall_timeout_s=settings.download_stall_timeout_s,
        )

    @property
    def has_token(self) -> bool:
        return self._token is not None

    async def aclose(self) -> None:
        await self.http.aclose()

    # ------------------------------------------------------------------ URLs

    def file_url(self, repo_id: str, revision: str, path: str) -> str:
        return (f"{self.endpoint}/{repo_id}/resolve/{quote(revision, safe='')}/"
                f"{quote(path, safe='/')}")

    def _info_url(self, ref: HfRef) -> str:
        url = f"{self.endpoint}/api/models/{ref.repo_id}"
        return url if ref.revision is None else f"{url}/revision/{quote(ref.revision, safe='')}"

    # ------------------------------------------------------------------ calls

    async def repo_info(self, ref: HfRef) -> RepoInfo:
        """The repo's commit and files at `ref.revision` (default branch when None)."""
        reply = await self._retrying("GET", self._info_url(ref), str(ref), params={"blobs": "true"})
        try:
            body = reply.json()
            siblings = body.get("siblings") or []
            files = tuple(_hub_file(s) for s in siblings if isinstance(s, dict))
        except (ValueError, AttributeError, TypeError) as exc:
            raise RbeeError(
                ErrorCode.DOWNLOAD_FAILED,
                f"The hub at {self.endpoint} sent a repo listing for {ref} that is not "
                f"readable: {exc}",
                hint="Check HF_ENDPOINT: it must point at a Hugging Face hub or a mirror.",
                details={"endpoint": self.endpoint, "model_ref": str(ref)},
            ) from None
        commit = body.get("sha") if isinstance(body.get("sha"), str) else None
        return RepoInfo(repo_id=ref.repo_id, commit=commit, files=files)

    async def file_meta(self, repo_id: str, revision: str, path: str, what: str) -> FileMeta:
        """HEAD the file's resolve URL; follow relative redirects only (B37)."""
        url = self.file_url(repo_id, revision, path)
        for _ in range(_MAX_RELATIVE_REDIRECTS):
            reply = await self._retrying("HEAD", url, what)
            location = reply.headers.get("location")
            if not reply.is_redirect or not location or urlsplit(location).netloc:
                break
            url = urljoin(url, location)
        headers = reply.headers
        size = _int(headers.get("x-linked-size") or headers.get("content-length"))
        etag = (headers.get("x-linked-etag") or headers.get("etag") or "").strip()
        etag = etag.removeprefix("W/").strip('"').lower()
        return FileMeta(size=size, sha256=etag if _SHA256_RE.fullmatch(etag) else None,
                        commit=headers.get("x-repo-commit"))

    @asynccontextmanager
    async def open_stream(self, url: str, offset: int, what: str) -> AsyncIterator[httpx.Response]:
        """GET `url` from byte `offset` (redirects followed). A reply the caller can read as
        the file's bytes; `Retryable` for a 5xx/408/429; other errors as RbeeError."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        async with self.http.stream("GET", url, headers=headers, follow_redirects=True) as reply:
            if reply.status_code >= 400:
                await reply.aread()
                if _retryable_status(reply.status_code):
                    raise Retryable(f"the hub answered {reply.status_code}")
                raise self.error(reply, what)
            yield reply

    async def _retrying(
        self, method: str, url: str, what: str, params: dict[str, str] | None = None
    ) -> httpx.Response:
        problem = ""
        for attempt in range(1, self.attempts + 1):
            if attempt > 1:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 2))
            try:
                reply = await self.http.request(method, url, params=params)
            except httpx.TransportError as exc:
                problem = _describe(exc)
                log.warning("hub %s %s: %s (attempt %d of %d)", method, url, problem, attempt,
                            self.attempts)
                continue
            if _retryable_status(reply.status_code):
                problem = f"the hub answered {reply.status_code}"
                log.warning("hub %s %s: %s (attempt %d of %d)", method, url, problem, attempt,
                            self.attempts)
                continue
            if reply.status_code >= 400:
                raise self.error(reply, what)
            return reply
        raise RbeeError(
            ErrorCode.DOWNLOAD_FAILED,
            f"Cannot reach the Hugging Face hub at {self.endpoint} for {what}: {problem} "
            f"({self.attempts} attempts)",
            hint=f"Check the node's network; a mirror can be set with {ENDPOINT_ENV}.",
            details={"endpoint": self.endpoint, "model_ref": what, "attempts": self.attempts,
                     "last_error": problem},
        )

    # ------------------------------------------------------------------ errors

    def error(self, reply: httpx.Response, what: str) -> RbeeError:
        """The RbeeError for a hub error reply about `what` (a model reference or file)."""
        status = reply.status_code
        code = reply.headers.get("x-error-code", "")
        hub_message = reply.headers.get("x-error-message", "") or _body_error(reply)
        details: dict[str, Any] = {"model_ref": what, "status": status, "endpoint": self.endpoint}
        if code:
            details["hub_error"] = code
        if code in NOT_FOUND_CODES or (status == 404 and code != "GatedRepo"):
            private = status == 401 and not self.has_token
            return RbeeError(
                ErrorCode.MODEL_NOT_FOUND,
                f"{what} was not found on the hub at {self.endpoint}"
                + (f": {hub_message}" if hub_message else ""),
                hint="Check the org, repo and file names (and the revision)."
                + (f" If the repo is private: {TOKEN_HINT}" if private else ""),
                details=details,
            )
        if status in (401, 403):
            return RbeeError(
                ErrorCode.MODEL_ACCESS_DENIED,
                f"The hub at {self.endpoint} refused access to {what} ({status}"
                + (f", {code}" if code else "") + ")"
                + (f": {hub_message}" if hub_message else ""),
                hint=TOKEN_HINT if not self.has_token else
                "The HF_TOKEN the agent has cannot read this repo: use a token with access "
                "(and accept the model's licence on its page if it is gated).",
                details={**details, "token_set": self.has_token},
            )
        return RbeeError(
            ErrorCode.DOWNLOAD_FAILED,
            f"The hub at {self.endpoint} answered {status} for {what}"
            + (f": {hub_message}" if hub_message else ""),
            details=details,
        )


def _retryable_status(status: int) -> bool:
    return status >= 500 or status in (408, 429)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _body_error(reply: httpx.Response) -> str:
    try:
        body = reply.json()
    except ValueError:
        return ""
    error = body.get("error") if isinstance(body, dict) else None
    return error[:200] if isinstance(error, str) else ""


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _hub_file(sibling: dict[str, Any]) -> HubFile:
    raw_lfs = sibling.get("lfs")
    lfs: dict[str, Any] = raw_lfs if isinstance(raw_lfs, dict) else {}
    sha = lfs.get("sha256") or lfs.get("oid")
    size = lfs.get("size", sibling.get("size"))
    return HubFile(
        path=str(sibling["rfilename"]),
        size=size if isinstance(size, int) else None,
        sha256=sha.lower() if isinstance(sha, str) and _SHA256_RE.fullmatch(sha.lower()) else None,
    )
