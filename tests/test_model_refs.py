"""B36: model references — every accepted form parses to the right value, the rest are refused
with INVALID_MODEL_REF naming the input and the accepted forms."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest

from rbee_agent.model_refs import (
    ACCEPTED_FORMS,
    EXAMPLE,
    CatalogRef,
    FileRef,
    HfRef,
    ModelRef,
    parse_model_ref,
)
from rbee_agent.protocol import ErrorCode, RbeeError

ACCEPTED: list[tuple[str, ModelRef]] = [
    ("hf:org/repo", HfRef("org", "repo")),
    ("hf:bartowski/SmolLM2-135M-Instruct-GGUF", HfRef("bartowski", "SmolLM2-135M-Instruct-GGUF")),
    ("hf:org/repo@main", HfRef("org", "repo", revision="main")),
    ("hf:org/repo@refs/pr/1", HfRef("org", "repo", revision="refs/pr/1")),
    ("hf:org/repo/model.Q4_K_M.gguf", HfRef("org", "repo", filename="model.Q4_K_M.gguf")),
    (
        "hf:org/repo/file.gguf@abc123",
        HfRef("org", "repo", filename="file.gguf", revision="abc123"),
    ),
    ("hf:org/repo/q4/part.GGUF", HfRef("org", "repo", filename="q4/part.GGUF")),
    ("hf:my_org.x/repo_1.5", HfRef("my_org.x", "repo_1.5")),
    ("file:///abs/path.gguf", FileRef(PurePosixPath("/abs/path.gguf"))),
    ("file://localhost/abs/path.gguf", FileRef(PurePosixPath("/abs/path.gguf"))),
    ("file:///models/my%20model.gguf", FileRef(PurePosixPath("/models/my model.gguf"))),
    ("smollm2-135m", CatalogRef("smollm2-135m")),
    ("gemma3-270m", CatalogRef("gemma3-270m")),
    ("a", CatalogRef("a")),
    ("0.x_y-z", CatalogRef("0.x_y-z")),
    ("  smollm2-135m\n", CatalogRef("smollm2-135m")),
]


@pytest.mark.parametrize(("text", "expected"), ACCEPTED, ids=[t for t, _ in ACCEPTED])
def test_b36_accepted_forms_parse(text: str, expected: ModelRef) -> None:
    assert parse_model_ref(text) == expected


@pytest.mark.parametrize("text", [t for t, _ in ACCEPTED])
def test_b36_canonical_form_parses_back(text: str) -> None:
    ref = parse_model_ref(text)
    assert parse_model_ref(str(ref)) == ref


def test_b36_hf_ref_exposes_repo_id() -> None:
    ref = parse_model_ref("hf:org/repo/file.gguf@v1")
    assert isinstance(ref, HfRef)
    assert ref.repo_id == "org/repo"
    assert str(ref) == "hf:org/repo/file.gguf@v1"


REJECTED: list[tuple[str, str]] = [
    ("", "empty"),
    ("   ", "empty"),
    ("hf:", "org and a repo"),
    ("hf:org", "org and a repo"),
    ("hf:org/", "empty"),
    ("hf:/repo", "empty"),
    ("hf:-org/repo", "not a Hugging Face name"),
    ("hf:org/repo-", "not a Hugging Face name"),
    ("hf:org/.repo", "not a Hugging Face name"),
    ("hf:org/re..po", "'..'"),
    ("hf:org/re--po", "'--'"),
    ("hf:org/repo.git", ".git"),
    ("hf:org/re po", "not a Hugging Face name"),
    ("hf:org/répo", "not a Hugging Face name"),
    ("hf:" + "o" * 48 + "/" + "r" * 48, "at most 96"),
    ("hf:org/repo/file.bin", "not a .gguf file"),
    ("hf:org/repo/../x.gguf", "unsafe part"),
    ("hf:org/repo//x.gguf", "unsafe part"),
    ("hf:org/repo/a b.gguf", "unsafe part"),
    ("hf:org/repo@", "revision"),
    ("hf:org/repo@a..b", "revision"),
    ("hf:org/repo@x y", "revision"),
    ("hf:org/repo@v1@v2", "revision"),
    ("file://relative/x.gguf", "host 'relative'"),
    ("file:///abs/model.bin", "not a .gguf file"),
    ("file:///abs/dir.gguf/", "not a .gguf file"),
    ("file:///abs/x.gguf?download=1", "'?' or '#'"),
    ("file:///abs/%00x.gguf", "NUL"),
    ("file:/abs/x.gguf", "'file:' is not a known prefix"),
    ("s3://bucket/x.gguf", "'s3:' is not a known prefix"),
    ("https://huggingface.co/org/repo", "'https:' is not a known prefix"),
    ("/abs/path.gguf", "catalog name"),
    ("./model.gguf", "catalog name"),
    ("SmolLM2", "lowercase"),
    ("-smollm2", "catalog name"),
    ("n" * 65, "at most 64"),
]


@pytest.mark.parametrize(("text", "reason"), REJECTED, ids=[t[:40] for t, _ in REJECTED])
def test_b36_rejected_forms_raise_invalid_model_ref(text: str, reason: str) -> None:
    with pytest.raises(RbeeError) as caught:
        parse_model_ref(text)
    err = caught.value
    assert err.code == ErrorCode.INVALID_MODEL_REF
    assert reason in err.details["reason"]
    assert err.details["reference"] == text


def test_b36_error_names_input_lists_forms_and_example() -> None:
    with pytest.raises(RbeeError) as caught:
        parse_model_ref("ftp://x")
    err = caught.value
    assert err.http_status == 400
    assert "'ftp://x'" in err.message
    for form in ACCEPTED_FORMS:
        assert form in err.message
    assert f"Example: {EXAMPLE}" in err.message
    assert err.details["accepted"] == list(ACCEPTED_FORMS)
    body = err.to_body().model_dump()
    assert body["error"]["code"] == "INVALID_MODEL_REF"
    assert body["error"]["details"]["hint"]


def test_b36_example_in_error_is_itself_valid() -> None:
    ref = parse_model_ref(EXAMPLE)
    assert isinstance(ref, HfRef)
    assert ref.filename is not None
