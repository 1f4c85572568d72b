"""B36/B37 in-process: which files an `hf:` reference fetches, and how hub errors read."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from rbee_agent.hub import HubClient, HubFile
from rbee_agent.model_refs import HfRef, parse_model_ref
from rbee_agent.protocol import ErrorCode, LoadingProgress, RbeeError, sse_frame
from rbee_agent.provision import (
    MB,
    choose_candidate,
    gguf_candidates,
    insufficient_disk,
    named_candidate,
    split_parts,
)

GB = 1024 * MB
REF = HfRef("org", "repo")


def files(**sizes_mb: int) -> list[HubFile]:
    return [HubFile(name.replace("__", "/") + ".gguf", mb * MB) for name, mb in sizes_mb.items()]


def choose(listing: list[HubFile], capacity: int = 64 * GB) -> list[str]:
    candidate = choose_candidate(REF, gguf_candidates(listing), capacity, 1.2)
    return [f.path for f in candidate.files]


def test_b36_q4_k_m_is_preferred_over_smaller_and_larger_files() -> None:
    listing = files(m_Q2_K=50, m_Q4_K_M=80, m_Q8_0=140, m_F16=260)
    listing.append(HubFile("README.md", 1))
    assert choose(listing) == ["m_Q4_K_M.gguf"]


def test_b36_without_q4_k_m_the_smallest_that_fits_is_taken() -> None:
    assert choose(files(m_Q8_0=140, m_Q5_K_S=90, m_F16=260)) == ["m_Q5_K_S.gguf"]


def test_b36_q4_k_m_that_does_not_fit_gives_way_to_one_that_does() -> None:
    listing = files(m_Q2_K=3000, m_Q4_K_M=9000)
    assert choose(listing, capacity=8 * GB) == ["m_Q2_K.gguf"]


def test_b36_nothing_fits_is_insufficient_ram_naming_the_smallest() -> None:
    with pytest.raises(RbeeError) as caught:
        choose(files(m_Q4_K_M=9000, m_Q8_0=15000), capacity=4 * GB)
    err = caught.value
    assert err.code == ErrorCode.INSUFFICIENT_RAM
    assert err.details["smallest"] == "m_Q4_K_M.gguf" and "hf:org/repo/m_Q4_K_M.gguf" in err.hint


def test_b36_split_parts_are_one_model_fetched_whole_in_order() -> None:
    listing = files(**{"Q4_K_M__big-Q4_K_M-00002-of-00003": 400,
                       "Q4_K_M__big-Q4_K_M-00001-of-00003": 400,
                       "Q4_K_M__big-Q4_K_M-00003-of-00003": 100,
                       "small-Q8_0": 900})
    assert choose(listing) == [f"Q4_K_M/big-Q4_K_M-0000{i}-of-00003.gguf" for i in (1, 2, 3)]


def test_b36_incomplete_split_sets_and_projectors_are_not_models() -> None:
    listing = files(**{"x-Q4_K_M-00001-of-00002": 10, "mmproj-model-f16": 5, "y-Q6_K": 300})
    assert [c.name for c in gguf_candidates(listing)] == ["y-Q6_K.gguf"]


def test_b37_listed_paths_that_would_leave_the_models_dir_are_ignored() -> None:
    listing = files(**{"ok-Q4_K_M": 10})
    listing += [HubFile("../../evil-Q4_K_M.gguf", MB), HubFile("/abs-Q4_K_M.gguf", MB),
                HubFile("a//b-Q4_K_M.gguf", MB), HubFile("a/./b-Q4_K_M.gguf", MB)]
    assert [c.name for c in gguf_candidates(listing)] == ["ok-Q4_K_M.gguf"]


def test_b36_a_repo_without_gguf_is_model_not_found() -> None:
    with pytest.raises(RbeeError) as caught:
        choose([HubFile("model.safetensors", 500 * MB)])
    assert caught.value.code == ErrorCode.MODEL_NOT_FOUND


def test_b36_named_file_of_a_split_model_brings_its_siblings() -> None:
    listing = files(**{"m-00001-of-00002": 10, "m-00002-of-00002": 10, "other": 5})
    ref = parse_model_ref("hf:org/repo/m-00002-of-00002.gguf")
    assert isinstance(ref, HfRef)
    assert [f.path for f in named_candidate(ref, listing).files] == [
        "m-00001-of-00002.gguf", "m-00002-of-00002.gguf"]
    missing = parse_model_ref("hf:org/repo/nope.gguf")
    assert isinstance(missing, HfRef)
    with pytest.raises(RbeeError) as caught:
        named_candidate(missing, listing)
    assert caught.value.code == ErrorCode.MODEL_NOT_FOUND
    assert "other.gguf" in (caught.value.hint or "")


def test_b35_split_parts_are_found_from_the_first() -> None:
    first = Path("/m/x-Q4_K_M-00001-of-00003.gguf")
    assert [p.name for p in split_parts(first)] == [
        "x-Q4_K_M-00001-of-00003.gguf", "x-Q4_K_M-00002-of-00003.gguf",
        "x-Q4_K_M-00003-of-00003.gguf"]
    assert split_parts(Path("/m/plain.gguf")) == [Path("/m/plain.gguf")]


# ------------------------------------------------------------------------ hub errors


def hub_reply(status: int, code: str = "") -> httpx.Response:
    headers = {"X-Error-Code": code} if code else {}
    return httpx.Response(status, headers=headers, json={"error": "nope"},
                          request=httpx.Request("GET", "https://hub.test/api/models/o/r"))


def hub(token: str | None = None) -> HubClient:
    return HubClient("https://hub.test/", token, attempts=1, backoff_s=0,
                     connect_timeout_s=1, stall_timeout_s=1)


@pytest.mark.parametrize(("status", "code", "expected"), [
    (404, "RepoNotFound", ErrorCode.MODEL_NOT_FOUND),
    (401, "RepoNotFound", ErrorCode.MODEL_NOT_FOUND),  # the hub hides private repos so
    (404, "EntryNotFound", ErrorCode.MODEL_NOT_FOUND),
    (404, "RevisionNotFound", ErrorCode.MODEL_NOT_FOUND),
    (404, "", ErrorCode.MODEL_NOT_FOUND),
    (401, "GatedRepo", ErrorCode.MODEL_ACCESS_DENIED),
    (403, "GatedRepo", ErrorCode.MODEL_ACCESS_DENIED),
    (401, "", ErrorCode.MODEL_ACCESS_DENIED),
    (403, "", ErrorCode.MODEL_ACCESS_DENIED),
    (400, "", ErrorCode.DOWNLOAD_FAILED),
])
async def test_b37_hub_errors_map_to_rbee_codes(status: int, code: str,
                                                expected: ErrorCode) -> None:
    client = hub()
    err = client.error(hub_reply(status, code), "hf:o/r")
    await client.aclose()
    assert err.code == expected and "hf:o/r" in err.message
    assert err.http_status == {ErrorCode.MODEL_NOT_FOUND: 404, ErrorCode.MODEL_ACCESS_DENIED: 403,
                               ErrorCode.DOWNLOAD_FAILED: 502}[expected]
    if expected == ErrorCode.MODEL_ACCESS_DENIED:
        assert "HF_TOKEN" in (err.hint or "")


async def test_b37_access_denied_with_a_token_says_the_token_lacks_access() -> None:
    client = hub("hf_secret_value")
    err = client.error(hub_reply(403, "GatedRepo"), "hf:o/r")
    await client.aclose()
    assert "cannot read this repo" in (err.hint or "")
    assert "hf_secret_value" not in str(err.to_body().model_dump())


def test_b37_insufficient_disk_says_required_available_and_what_to_free() -> None:
    err = insufficient_disk("hf:o/r", Path("/models"), 100 * MB, 40 * MB, 10 * MB)
    assert err.code == ErrorCode.INSUFFICIENT_DISK and err.http_status == 507
    assert err.details == {"required_mb": 100, "available_mb": 40, "free_mb": 70,
                           "reserve_mb": 10, "path": "/models"}
    assert "Free at least 70 MB" in (err.hint or "")


def test_b41_loading_progress_frames_are_unchanged_by_the_download_fields() -> None:
    ready = LoadingProgress(stage="ready", layers_loaded=30, layers_total=30)
    assert sse_frame(ready) == b'data: {"stage":"ready","layers_loaded":30,"layers_total":30}\n\n'
