"""B36-B38 end to end: a real agent provisions `hf:` models from a loopback test hub.

The hub (tests/hub_server.py) serves the bundled GGUF model through the hub protocol and
injects faults on demand; every assertion about resuming reads the hub's own request log.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.agent_support import AgentProc
from tests.agent_support import start_agent as start_agent_process
from tests.hub_server import Blob, TestHub
from tests.support import bundled_model_path, sse_events

SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MB = 1024 * 1024
# The hub's URL, and no token unless a test gives one (not even from the developer's shell).
NO_TOKEN = {"HF_TOKEN": "", "HUGGING_FACE_HUB_TOKEN": ""}
HUB_SETTINGS = {
    "download-stall-timeout-s": "0.5",
    "download-reserve-mb": "0",
    "download-progress-interval-s": "0.05",
}


@pytest.fixture(scope="module")
def hub() -> Iterator[TestHub]:
    with TestHub(token="hf_test_token") as h:
        yield h


@pytest.fixture(scope="module")
def model() -> Blob:
    blob = Blob(bundled_model_path())
    assert blob.sha256 == SHA256
    return blob


@pytest.fixture(scope="module")
def hub_agent(hub: TestHub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProc]:
    """One agent on the test hub, no token, stall timeout 0.5 s, default attempts/backoff."""
    a = start_agent_process(tmp_path_factory.mktemp("hub-agent"),
                            env={**NO_TOKEN, "HF_ENDPOINT": hub.url}, **HUB_SETTINGS)
    try:
        yield a
    finally:
        a.stop()


@pytest.fixture(autouse=True)
def fresh_hub(hub: TestHub) -> Iterator[None]:
    hub.faults.clear()
    hub.held.clear()
    hub._release.clear()
    hub.listing_sizes = True
    yield
    hub.release()


@pytest.fixture
def start_hub_agent(hub: TestHub, tmp_path: Path) -> Iterator[Callable[..., AgentProc]]:
    started: list[AgentProc] = []

    def start(name: str = "agent", env: dict[str, str] | None = None,
              **settings: str) -> AgentProc:
        agent = start_agent_process(tmp_path / name,
                                    env={**NO_TOKEN, "HF_ENDPOINT": hub.url, **(env or {})},
                                    **{**HUB_SETTINGS, **settings})
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


# ------------------------------------------------------------------------ helpers


def download(agent: AgentProc, ref: str, status: int = 202) -> dict[str, Any]:
    r = agent.post("/v1/models/download", json={"model_ref": ref})
    assert r.status_code == status, r.text
    return dict(r.json())


def error_of(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    return dict(err)


def follow(agent: AgentProc, job_id: str) -> list[dict[str, Any]]:
    with httpx.stream("GET", f"{agent.url}/v1/models/download/{job_id}/progress",
                      headers=agent.headers, timeout=60) as r:
        assert r.status_code == 200, r.read()
        return sse_events(r)


def finish(agent: AgentProc, ref: str) -> dict[str, Any]:
    """Download `ref` and return the final event, which must be `complete`."""
    events = follow(agent, download(agent, ref)["job_id"])
    assert events[-1]["stage"] == "complete", events[-1]
    return events[-1]


def models_dir(agent: AgentProc) -> Path:
    return agent.home / "data" / "models"


def local(agent: AgentProc, repo: str, name: str, revision: str = "main") -> Path:
    return models_dir(agent) / "hf" / repo / revision / name


def catalog(agent: AgentProc) -> dict[str, dict[str, Any]]:
    return {m["reference"]: m for m in agent.get("/v1/models").json()["models"]}


def forget(agent: AgentProc, reference: str) -> None:
    entry = catalog(agent).get(reference)
    if entry is not None:
        assert agent.delete(f"/v1/models/{entry['id']}").status_code == 200


# ------------------------------------------------------------------------ resolution (B36)


def test_b36_repo_reference_lists_files_and_fetches_the_q4_k_m(
    hub: TestHub, hub_agent: AgentProc, model: Blob
) -> None:
    small = Blob(model.path, 0, 20 * MB)  # smaller, but not the preferred quantization
    hub.add_repo("acme/pick-GGUF", {"pick-Q2_K.gguf": small, "pick-Q4_K_M.gguf": model,
                                    "mmproj-pick-f16.gguf": small})
    job = download(hub_agent, "hf:acme/pick-GGUF")
    assert job["files"] == ["pick-Q4_K_M.gguf"] and job["bytes_total"] == model.size
    assert job["reference"] == "hf:acme/pick-GGUF/pick-Q4_K_M.gguf"
    done = follow(hub_agent, job["job_id"])[-1]
    path = local(hub_agent, "acme/pick-GGUF", "pick-Q4_K_M.gguf")
    assert done["local_path"] == str(path) and path.read_bytes() == model.path.read_bytes()
    assert hub.cdn_gets(small) == [], "the smaller Q2_K and the projector are not fetched"
    listing = [r for r in hub.log if r.path == "/api/models/acme/pick-GGUF"]
    assert len(listing) == 1 and listing[0].authorization is None
    heads = [r for r in hub.log if r.method == "HEAD"]
    assert heads and heads[-1].path.endswith("/resolve/" + hub.repos["acme/pick-GGUF"].commit
                                             + "/pick-Q4_K_M.gguf")
    # B35, B38: in the catalog with its GGUF metadata and the verified sha256.
    entry = catalog(hub_agent)["hf:acme/pick-GGUF/pick-Q4_K_M.gguf"]
    assert entry["id"] == done["model_id"] == "pick-q4_k_m"
    assert (entry["provider"], entry["sha256"], entry["size_bytes"]) == ("hf", SHA256, model.size)
    assert (entry["architecture"], entry["layers"], entry["quantization"]) == ("llama", 30, "Q4_1")
    assert entry["context_length"] > 0

    # hf:org/repo now matches the downloaded model without asking the hub.
    asked = len(hub.log)
    again = download(hub_agent, "hf:acme/pick-GGUF", status=200)
    assert again["stage"] == "complete" and again["model_id"] == "pick-q4_k_m"
    assert follow(hub_agent, again["job_id"])[-1]["local_path"] == str(path)
    assert len(hub.log) == asked
    # B35: deleting the model deletes its file, which is inside the models dir.
    forget(hub_agent, entry["reference"])
    assert not path.exists()


def test_b36_named_file_and_revision(hub: TestHub, hub_agent: AgentProc, model: Blob) -> None:
    hub.add_repo("acme/rev", {"sub/m-Q8_0.gguf": model}, revisions=("main", "v1.0"))
    done = finish(hub_agent, "hf:acme/rev/sub/m-Q8_0.gguf@v1.0")
    assert any(r.path == "/api/models/acme/rev/revision/v1.0" for r in hub.log)
    path = local(hub_agent, "acme/rev", "sub/m-Q8_0.gguf", revision="v1.0")
    assert done["local_path"] == str(path) and path.stat().st_size == model.size
    assert "hf:acme/rev/sub/m-Q8_0.gguf@v1.0" in catalog(hub_agent)
    forget(hub_agent, "hf:acme/rev/sub/m-Q8_0.gguf@v1.0")


def test_b36_split_model_is_downloaded_whole(hub: TestHub, hub_agent: AgentProc,
                                             model: Blob) -> None:
    third = model.size // 3
    parts = [Blob(model.path, 0, third), Blob(model.path, third, third),
             Blob(model.path, 2 * third, model.size - 2 * third)]
    names = [f"big-Q4_K_M-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    hub.add_repo("acme/split", dict(zip(names, parts, strict=True)))
    job = download(hub_agent, "hf:acme/split")
    assert job["files"] == names and job["bytes_total"] == model.size
    done = follow(hub_agent, job["job_id"])[-1]
    paths = [local(hub_agent, "acme/split", n) for n in names]
    assert done["local_path"] == str(paths[0])
    assert b"".join(p.read_bytes() for p in paths) == model.path.read_bytes()
    assert {r.path for r in hub.cdn_gets()} >= {f"/cdn/{p.sha256}" for p in parts}
    entry = catalog(hub_agent)[f"hf:acme/split/{names[0]}"]
    assert entry["id"] == "big-q4_k_m" and entry["size_bytes"] == model.size
    forget(hub_agent, entry["reference"])
    assert not any(p.exists() for p in paths), "every part goes with the model"


def test_b37_mirror_without_sizes_uses_head_size_and_linked_etag(
    hub: TestHub, hub_agent: AgentProc, model: Blob
) -> None:
    hub.listing_sizes = False
    hub.add_repo("acme/mirror", {"m-Q4_K_M.gguf": model})
    hub.fault("corrupt", at=0.5)  # the sha256 from X-Linked-Etag must catch it
    done = finish(hub_agent, "hf:acme/mirror")
    assert [r.range for r in hub.cdn_gets(model)][-2:] == [None, None]
    assert catalog(hub_agent)["hf:acme/mirror/m-Q4_K_M.gguf"]["sha256"] == SHA256
    assert Path(done["local_path"]).stat().st_size == model.size
    forget(hub_agent, "hf:acme/mirror/m-Q4_K_M.gguf")


# ------------------------------------------------------------------------ errors (B37)


def test_b37_not_found_repo_file_and_revision_are_model_not_found(
    hub: TestHub, hub_agent: AgentProc, model: Blob
) -> None:
    hub.add_repo("acme/exists", {"m.gguf": model})
    err = error_of(hub_agent.post("/v1/models/download", json={"model_ref": "hf:acme/nope"}),
                   404, "MODEL_NOT_FOUND")
    assert "hf:acme/nope" in err["message"] and err["details"]["hub_error"] == "RepoNotFound"
    err = error_of(hub_agent.post("/v1/models/download",
                                  json={"model_ref": "hf:acme/exists/other.gguf"}),
                   404, "MODEL_NOT_FOUND")
    assert err["details"]["files"] == ["m.gguf"]
    error_of(hub_agent.post("/v1/models/download", json={"model_ref": "hf:acme/exists@v9"}),
             404, "MODEL_NOT_FOUND")
    # B25/B36: spawning a model the hub does not have fails at once, with no worker.
    error_of(hub_agent.post("/v1/workers", json={"model_ref": "hf:acme/nope"}), 404,
             "MODEL_NOT_FOUND")
    assert hub_agent.get("/v1/workers").json()["workers"] == []


def test_b37_gated_repo_is_access_denied_with_the_hf_token_hint(
    hub: TestHub, hub_agent: AgentProc, start_hub_agent: Callable[..., AgentProc], model: Blob
) -> None:
    hub.add_repo("acme/gated", {"g-Q4_K_M.gguf": model}, gated=True)
    err = error_of(hub_agent.post("/v1/models/download", json={"model_ref": "hf:acme/gated"}),
                   403, "MODEL_ACCESS_DENIED")
    assert "HF_TOKEN" in err["details"]["hint"] and err["details"]["hub_error"] == "GatedRepo"
    wrong = start_hub_agent("wrong", env={"HF_TOKEN": "hf_wrong"})
    err = error_of(wrong.post("/v1/models/download", json={"model_ref": "hf:acme/gated"}),
                   403, "MODEL_ACCESS_DENIED")
    assert "hf_wrong" not in str(err) and "hf_wrong" not in wrong.log()
    # HF_TOKEN is honoured: sent as a bearer token, and the download goes through.
    right = start_hub_agent("right", env={"HF_TOKEN": "hf_test_token"})
    finish(right, "hf:acme/gated")
    listing = [r for r in hub.log if r.path == "/api/models/acme/gated"]
    assert listing[-1].authorization == "Bearer hf_test_token"
    assert "hf_test_token" not in right.log()


def test_b37_missing_object_mid_download_is_not_retried(hub: TestHub, hub_agent: AgentProc,
                                                        model: Blob) -> None:
    hub.add_repo("acme/gone", {"m.gguf": model})
    hub.fault("status", status=404)
    before = len(hub.cdn_gets(model))
    final = follow(hub_agent, download(hub_agent, "hf:acme/gone")["job_id"])[-1]
    assert final["stage"] == "failed" and final["error"]["code"] == "MODEL_NOT_FOUND"
    assert len(hub.cdn_gets(model)) == before + 1


def test_b37_server_errors_are_retried(hub: TestHub, hub_agent: AgentProc, model: Blob) -> None:
    hub.add_repo("acme/flaky", {"m.gguf": model})
    hub.fault("status", status=503, times=2)
    before = len(hub.cdn_gets(model))
    final = finish(hub_agent, "hf:acme/flaky")
    assert [r.status for r in hub.cdn_gets(model)[before:]] == [503, 503, 200]
    assert final["attempt"] == 3
    forget(hub_agent, "hf:acme/flaky/m.gguf")


def test_b37_bad_requests(hub_agent: AgentProc) -> None:
    error_of(hub_agent.post("/v1/models/download", json={"model_ref": "smollm2-135m"}), 400,
             "INVALID_MODEL_REF")
    error_of(hub_agent.post("/v1/models/download", json={"model_ref": "hf:bad"}), 400,
             "INVALID_MODEL_REF")
    error_of(hub_agent.post("/v1/models/download", json={}), 400, "INVALID_REQUEST")
    error_of(hub_agent.get("/v1/models/download/d9-nope"), 404, "DOWNLOAD_NOT_FOUND")
    error_of(hub_agent.get("/v1/models/download/d9-nope/progress"), 404, "DOWNLOAD_NOT_FOUND")
    error_of(hub_agent.delete("/v1/models/download/d9-nope"), 404, "DOWNLOAD_NOT_FOUND")


# ------------------------------------------------------------------------ transfer faults (B37)


def test_b37_resume_sends_range_from_partial_size(hub: TestHub, hub_agent: AgentProc,
                                                  model: Blob) -> None:
    hub.add_repo("acme/drop", {"m.gguf": model})
    hub.fault("drop", at=0.4)
    before = len(hub.cdn_gets(model))
    events = follow(hub_agent, download(hub_agent, "hf:acme/drop")["job_id"])
    first, second = hub.cdn_gets(model)[before:]
    assert first.range is None and first.sent == int(model.size * 0.4)
    assert second.range == f"bytes={first.sent}-", "resume must start at the partial size"
    assert second.status == 206 and second.sent == model.size - first.sent
    assert events[-1]["stage"] == "complete" and events[-1]["attempt"] == 2
    assert catalog(hub_agent)["hf:acme/drop/m.gguf"]["sha256"] == SHA256
    assert not local(hub_agent, "acme/drop", "m.gguf.partial").exists()
    forget(hub_agent, "hf:acme/drop/m.gguf")


def test_b37_connection_reset_is_resumed(hub: TestHub, hub_agent: AgentProc,
                                         model: Blob) -> None:
    hub.add_repo("acme/reset", {"m.gguf": model})
    hub.fault("reset", at=0.4)
    before = len(hub.cdn_gets(model))
    finish(hub_agent, "hf:acme/reset")
    first, second = hub.cdn_gets(model)[before:]
    start = second.range_start
    assert start is not None and 0 < start <= first.sent  # an RST may drop bytes in flight
    assert second.sent == model.size - start
    assert catalog(hub_agent)["hf:acme/reset/m.gguf"]["sha256"] == SHA256
    forget(hub_agent, "hf:acme/reset/m.gguf")


def test_b37_stall_is_cut_by_the_stall_timeout_and_resumed(hub: TestHub, hub_agent: AgentProc,
                                                           model: Blob) -> None:
    hub.add_repo("acme/stall", {"m.gguf": model})
    hub.fault("stall", at=0.4, seconds=20)
    before = len(hub.cdn_gets(model))
    started = time.monotonic()
    finish(hub_agent, "hf:acme/stall")
    took = time.monotonic() - started
    first, second = hub.cdn_gets(model)[before:]
    assert second.range == f"bytes={first.sent}-"
    assert second.at - first.at >= 0.5 and took < 15, "the stall must be cut at 0.5 s"
    assert not first.done, "the stalled response was abandoned, not waited out"
    forget(hub_agent, "hf:acme/stall/m.gguf")


def test_b37_slow_trickle_is_not_a_stall_and_progress_streams(
    hub: TestHub, hub_agent: AgentProc, model: Blob
) -> None:
    hub.add_repo("acme/trickle", {"m.gguf": model})
    hub.fault("trickle", seconds=1.5)  # 64 KiB every 0.05 s: gaps below the 0.5 s stall
    before = len(hub.cdn_gets(model))
    job = download(hub_agent, "hf:acme/trickle")
    assert job["stage"] == "downloading" and job["progress_url"].endswith("/progress")
    events = follow(hub_agent, job["job_id"])
    assert len(hub.cdn_gets(model)) == before + 1, "a slow transfer is not retried"
    downloading = [e for e in events if e["stage"] == "downloading"]
    assert len(downloading) >= 5
    done = [e["bytes_downloaded"] for e in downloading]
    assert done == sorted(done) and done[-1] < model.size
    assert all(e["bytes_total"] == model.size and e["job_id"] == job["job_id"]
               for e in downloading)
    slow = [e["speed_mbps"] for e in downloading if 0 < e["bytes_downloaded"] < 10 * MB]
    assert slow and max(slow[1:] or slow) < 10, "a trickle reads as a low speed"
    final = events[-1]
    assert final["stage"] == "complete" and final["bytes_downloaded"] == model.size
    assert final["local_path"] == str(local(hub_agent, "acme/trickle", "m.gguf"))
    forget(hub_agent, "hf:acme/trickle/m.gguf")


def test_b37_corrupt_file_is_deleted_and_fetched_again(hub: TestHub, hub_agent: AgentProc,
                                                       model: Blob) -> None:
    hub.add_repo("acme/corrupt-once", {"m.gguf": model})
    hub.fault("corrupt", at=0.7)
    before = len(hub.cdn_gets(model))
    finish(hub_agent, "hf:acme/corrupt-once")
    gets = hub.cdn_gets(model)[before:]
    assert [g.range for g in gets] == [None, None], "a corrupt file is fetched again whole"
    assert catalog(hub_agent)["hf:acme/corrupt-once/m.gguf"]["sha256"] == SHA256
    forget(hub_agent, "hf:acme/corrupt-once/m.gguf")


def test_b37_always_corrupt_ends_checksum_mismatch_with_nothing_left(
    hub: TestHub, hub_agent: AgentProc, model: Blob
) -> None:
    hub.add_repo("acme/corrupt", {"m.gguf": model})
    hub.fault("corrupt", at=0.7, times=6)
    before = len(hub.cdn_gets(model))
    final = follow(hub_agent, download(hub_agent, "hf:acme/corrupt")["job_id"])[-1]
    assert final["stage"] == "failed" and final["attempt"] == 6
    err = final["error"]
    assert err["code"] == "CHECKSUM_MISMATCH" and err["details"]["expected_sha256"] == SHA256
    assert len(hub.cdn_gets(model)) == before + 6
    folder = local(hub_agent, "acme/corrupt", "")
    assert not any(folder.iterdir()), "no partial or corrupt file stays behind"
    assert "hf:acme/corrupt/m.gguf" not in catalog(hub_agent)


def test_b37_six_attempts_with_backoff_then_download_failed_and_resume_later(
    hub: TestHub, hub_agent: AgentProc, model: Blob
) -> None:
    hub.add_repo("acme/down", {"m.gguf": model})
    hub.fault("drop", at=0.4, times=6)  # later attempts get no bytes at all
    before = len(hub.cdn_gets(model))
    final = follow(hub_agent, download(hub_agent, "hf:acme/down")["job_id"])[-1]
    err = final["error"]
    assert final["stage"] == "failed" and err["code"] == "DOWNLOAD_FAILED"
    gets = hub.cdn_gets(model)[before:]
    assert len(gets) == 6 and err["details"]["attempts"] == 6
    gaps = [b.at - a.at for a, b in itertools.pairwise(gets)]
    for gap, backoff in zip(gaps, (0.1, 0.2, 0.4, 0.8, 1.6), strict=True):
        assert gap >= backoff * 0.95, f"gaps {gaps}: backoff must double from 100 ms"
    kept = int(model.size * 0.4)
    assert err["details"]["partial_bytes"] == kept
    assert local(hub_agent, "acme/down", "m.gguf.partial").stat().st_size == kept
    assert "resumes" in err["details"]["hint"]
    # Asking again resumes from the kept partial file.
    finish(hub_agent, "hf:acme/down")
    assert hub.cdn_gets(model)[-1].range == f"bytes={kept}-"
    assert catalog(hub_agent)["hf:acme/down/m.gguf"]["sha256"] == SHA256
    forget(hub_agent, "hf:acme/down/m.gguf")


# ------------------------------------------------------------------------ jobs (B37)


def test_b37_two_requests_share_one_download(hub: TestHub, hub_agent: AgentProc,
                                             model: Blob) -> None:
    hub.add_repo("acme/shared", {"m-Q4_K_M.gguf": model})
    hub.fault("hold", at=0.4)
    before = len(hub.cdn_gets(model))
    first = download(hub_agent, "hf:acme/shared")
    hub.held.wait(30)
    second = download(hub_agent, "hf:acme/shared/m-Q4_K_M.gguf")  # another spelling
    assert second["job_id"] == first["job_id"] and second["joined"] is True
    assert first["joined"] is False
    job = hub_agent.get(f"/v1/models/download/{first['job_id']}").json()
    assert job["stage"] == "downloading" and job["bytes_downloaded"] >= int(model.size * 0.4)
    hub.release()
    assert follow(hub_agent, first["job_id"])[-1]["stage"] == "complete"
    assert len(hub.cdn_gets(model)) == before + 1, "one transfer for both requests"
    forget(hub_agent, "hf:acme/shared/m-Q4_K_M.gguf")


def test_b37_cancelled_job_ends_and_removes_its_partial_file(
    hub: TestHub, hub_agent: AgentProc, model: Blob
) -> None:
    hub.add_repo("acme/cancel", {"m.gguf": model})
    hub.fault("hold", at=0.4)
    job = download(hub_agent, "hf:acme/cancel")
    hub.held.wait(30)
    partial = local(hub_agent, "acme/cancel", "m.gguf.partial")
    with httpx.stream("GET", f"{hub_agent.url}/v1/models/download/{job['job_id']}/progress",
                      headers=hub_agent.headers, timeout=60) as stream:
        r = hub_agent.delete(f"/v1/models/download/{job['job_id']}")
        assert r.status_code == 200 and r.json()["stage"] == "failed"
        events = sse_events(stream)
    assert events[-1]["stage"] == "failed" and events[-1]["error"]["code"] == "CANCELLED"
    assert not partial.exists()
    assert "hf:acme/cancel/m.gguf" not in catalog(hub_agent)
    again = hub_agent.delete(f"/v1/models/download/{job['job_id']}")  # idempotent
    assert again.status_code == 200 and again.json()["error"]["code"] == "CANCELLED"


def test_b37_restarted_agent_resumes_from_the_partial_file(
    hub: TestHub, start_hub_agent: Callable[..., AgentProc], model: Blob
) -> None:
    hub.add_repo("acme/restart", {"m.gguf": model})
    hub.fault("hold", at=0.4)
    first = start_hub_agent("restart")
    job = download(first, "hf:acme/restart")
    hub.held.wait(30)
    deadline = time.monotonic() + 30  # the agent has read what the hub sent before the hold
    while first.get(f"/v1/models/download/{job['job_id']}").json()[
            "bytes_downloaded"] < int(model.size * 0.4):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    first.stop()
    partial = local(first, "acme/restart", "m.gguf.partial")
    kept = partial.stat().st_size
    assert kept >= int(model.size * 0.4)
    hub.release()
    second = start_hub_agent("restart")
    finish(second, "hf:acme/restart")
    assert hub.cdn_gets(model)[-1].range == f"bytes={kept}-"
    assert catalog(second)["hf:acme/restart/m.gguf"]["sha256"] == SHA256


# ------------------------------------------------------------------------ disk (B37)


def test_b37_free_disk_is_checked_first(hub: TestHub, start_hub_agent: Callable[..., AgentProc],
                                        model: Blob) -> None:
    hub.add_repo("acme/huge", {"m.gguf": model})
    a = start_hub_agent("disk", **{"download-reserve-mb": str(10**9)})
    before = len(hub.cdn_gets(model))
    err = error_of(a.post("/v1/models/download", json={"model_ref": "hf:acme/huge"}), 507,
                   "INSUFFICIENT_DISK")
    details = err["details"]
    assert details["required_mb"] == -(-model.size // MB) and details["reserve_mb"] == 10**9
    expected_free = details["required_mb"] + 10**9 - details["available_mb"]
    assert abs(details["free_mb"] - expected_free) <= 1
    assert len(hub.cdn_gets(model)) == before, "nothing is fetched when it cannot fit"


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Size-limited tmpfs mounts (root only); unmounted at teardown."""
    mounted: list[Path] = []

    def mount(size_mb: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("a size-limited tmpfs needs root (mount -t tmpfs)")
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs",
                                 str(where)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_b37_small_disk_is_refused_before_downloading(
    hub: TestHub, tmpfs: Callable[[int], Path], start_hub_agent: Callable[..., AgentProc],
    model: Blob,
) -> None:
    disk = tmpfs(50)
    hub.add_repo("acme/small-disk", {"m.gguf": model})
    a = start_hub_agent("small-disk", **{"models-dir": str(disk)})
    err = error_of(a.post("/v1/models/download", json={"model_ref": "hf:acme/small-disk"}),
                   507, "INSUFFICIENT_DISK")
    assert err["details"]["available_mb"] <= 50 < err["details"]["required_mb"]
    assert err["details"]["free_mb"] >= err["details"]["required_mb"] - 50


def test_b37_disk_full_mid_way_removes_the_partial_file(
    hub: TestHub, tmpfs: Callable[[int], Path], start_hub_agent: Callable[..., AgentProc],
    model: Blob,
) -> None:
    disk = tmpfs(120)
    hub.add_repo("acme/full-disk", {"m.gguf": model})
    a = start_hub_agent("full-disk", **{"models-dir": str(disk)})
    hub.fault("hold", at=0.4)
    job = download(a, "hf:acme/full-disk")  # the preflight passes: 94 MB of 120 MB
    hub.held.wait(30)
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as fh, contextlib.suppress(OSError):
        while True:  # fill the disk while the download is paused
            fh.write(b"\0" * MB)
    hub.release()
    final = follow(a, job["job_id"])[-1]
    assert final["stage"] == "failed", final
    err = final["error"]
    assert err["code"] == "INSUFFICIENT_DISK" and "filled up" in err["message"]
    assert {"required_mb", "available_mb", "free_mb"} <= set(err["details"])
    assert not (disk / "hf/acme/full-disk/main/m.gguf.partial").exists()
    assert not (disk / "hf/acme/full-disk/main/m.gguf").exists()
    assert "hf:acme/full-disk/m.gguf" not in catalog(a)
    filler.unlink()


# ------------------------------------------------------------------------ spawn (B25, B37)


def test_b37_spawn_of_an_hf_model_downloads_then_loads_and_serves(
    hub: TestHub, hub_agent: AgentProc, model: Blob
) -> None:
    hub.add_repo("acme/SmolLM2-GGUF", {"SmolLM2-Q4_K_M.gguf": model})
    hub.fault("hold", at=0.4)
    before = len(hub.cdn_gets(model))
    r = hub_agent.post("/v1/workers", json={"model_ref": "hf:acme/SmolLM2-GGUF"})
    assert r.status_code == 201, r.text
    worker = r.json()["worker"]
    assert worker["state"] == "loading" and worker["pid"] is None
    assert worker["model_ref"] == "hf:acme/SmolLM2-GGUF/SmolLM2-Q4_K_M.gguf"
    hub.held.wait(30)
    joined = download(hub_agent, "hf:acme/SmolLM2-GGUF")  # the spawn's download, joined
    assert joined["joined"] is True
    deadline = time.monotonic() + 30
    while hub_agent.get(f"/v1/models/download/{joined['job_id']}").json()[
            "bytes_downloaded"] < model.size * 0.4:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.2)  # a heartbeat byte or two: the worker's stream has the 40 % now
    with httpx.stream("GET", f"{hub_agent.url}/v1/workers/{worker['id']}/progress",
                      headers=hub_agent.headers, timeout=120) as p:
        lines = (line for line in p.iter_lines() if line.startswith("data: {"))
        first = httpx.Response(200, content=next(lines)[6:]).json()
        hub.release()
        rest = [httpx.Response(200, content=line[6:]).json() for line in lines]
    events = [first, *rest]
    stages = [e["stage"] for e in events]
    assert stages[0] == "downloading" and stages[-1] == "ready", stages
    last_download = max(i for i, s in enumerate(stages) if s == "downloading")
    assert set(stages[last_download + 1:]) <= {"starting", "loading", "ready"}
    assert first["bytes_total"] == model.size and first["bytes_downloaded"] >= model.size * 0.4
    assert "bytes_total" not in events[-1]
    assert events[-1] == {"stage": "ready", "layers_loaded": 30, "layers_total": 30}
    assert len(hub.cdn_gets(model)) == before + 1

    info = hub_agent.get(f"/v1/workers/{worker['id']}").json()
    assert info["state"] == "idle" and info["model_id"] == "smollm2-q4_k_m"
    out = hub_agent.post(f"/v1/workers/{worker['id']}/inference",
                         json={"prompt": "The capital of France is", "max_tokens": 8,
                               "temperature": 0, "stream": False})
    assert "Paris" in out.json()["text"]
    # The model is in the catalog now: spawning it again needs no hub.
    asked = len(hub.log)
    again = hub_agent.post("/v1/workers", json={"model_ref": "hf:acme/SmolLM2-GGUF"})
    assert again.status_code == 200 and again.json()["reused"] is True
    assert len(hub.log) == asked
    hub_agent.delete(f"/v1/workers/{worker['id']}")
    forget(hub_agent, "hf:acme/SmolLM2-GGUF/SmolLM2-Q4_K_M.gguf")
    assert not local(hub_agent, "acme/SmolLM2-GGUF", "SmolLM2-Q4_K_M.gguf").exists()


def test_b37_spawn_refused_by_its_preflight_fetches_nothing(
    hub: TestHub, start_hub_agent: Callable[..., AgentProc], model: Blob
) -> None:
    hub.add_repo("acme/too-big", {"m-Q4_K_M.gguf": model})
    # ram_factor: choosing a repo's file; ram_reserve_mb: the spawn preflight (B121)
    a = start_hub_agent("tiny-node", **{"ram-factor": "1000000",
                                        "ram-reserve-mb": "100000000"})
    before = len(hub.cdn_gets(model))
    err = error_of(a.post("/v1/workers", json={"model_ref": "hf:acme/too-big/m-Q4_K_M.gguf"}),
                   507, "INSUFFICIENT_RAM")
    details = err["details"]
    assert details["required_mb"] + details["reserve_mb"] > details["available_mb"]
    # For a whole repo, the choice itself says nothing fits, and names the file to force it.
    err = error_of(a.post("/v1/models/download", json={"model_ref": "hf:acme/too-big"}),
                   507, "INSUFFICIENT_RAM")
    assert "hf:acme/too-big/m-Q4_K_M.gguf" in err["details"]["hint"]
    assert len(hub.cdn_gets(model)) == before, "nothing is fetched for a model that cannot run"
    assert a.get("/v1/workers").json()["workers"] == []


def test_b37_failed_download_fails_the_waiting_worker(hub: TestHub, hub_agent: AgentProc,
                                                      model: Blob) -> None:
    hub.add_repo("acme/spawn-corrupt", {"m.gguf": model})
    hub.fault("corrupt", at=0.5, times=6)
    worker = hub_agent.spawn("hf:acme/spawn-corrupt")
    with httpx.stream("GET", f"{hub_agent.url}/v1/workers/{worker['id']}/progress",
                      headers=hub_agent.headers, timeout=60) as p:
        events = sse_events(p)
    assert events[0]["stage"] == "downloading"
    assert events[-1]["stage"] == "failed"
    assert events[-1]["error"]["code"] == "CHECKSUM_MISMATCH"
    kept = hub_agent.get(f"/v1/workers/{worker['id']}").json()  # B127: kept, as failed
    assert kept["state"] == "failed" and kept["error"]["code"] == "CHECKSUM_MISMATCH"
    assert hub_agent.delete(f"/v1/workers/{worker['id']}").status_code == 200  # forgotten
    assert hub_agent.get(f"/v1/workers/{worker['id']}").status_code == 404


def test_b37_worker_stopped_while_its_model_downloads(hub: TestHub, hub_agent: AgentProc,
                                                      model: Blob) -> None:
    hub.add_repo("acme/spawn-stop", {"m.gguf": model})
    hub.fault("hold", at=0.4)
    worker = hub_agent.spawn("hf:acme/spawn-stop")
    hub.held.wait(30)
    stopped = hub_agent.delete(f"/v1/workers/{worker['id']}")
    assert stopped.status_code == 200
    assert hub_agent.get(f"/v1/workers/{worker['id']}").status_code == 404
    hub.release()  # the download itself goes on and lands in the catalog
    deadline = time.monotonic() + 30
    while "hf:acme/spawn-stop/m.gguf" not in catalog(hub_agent):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert hub_agent.get("/v1/workers").json()["workers"] == []
    forget(hub_agent, "hf:acme/spawn-stop/m.gguf")


def test_b128_retries_resumes_and_checksum_mismatches_are_notes_in_the_progress(
    hub: TestHub, hub_agent: AgentProc, model: Blob
) -> None:
    hub.add_repo("acme/noted", {"m.gguf": model})
    hub.fault("drop", at=0.4)
    events = follow(hub_agent, download(hub_agent, "hf:acme/noted")["job_id"])
    notes = [e["note"] for e in events if e.get("note")]
    assert notes, "the resume was not in the progress stream"
    mb = int(model.size * 0.4) / 1024 / 1024
    assert notes[0].startswith("attempt 2/6: ") and f"resuming at {mb:.1f} MB in " in notes[0]
    forget(hub_agent, "hf:acme/noted/m.gguf")

    hub.add_repo("acme/noted-corrupt", {"m.gguf": model})
    hub.fault("corrupt", at=0.7)
    events = follow(hub_agent, download(hub_agent, "hf:acme/noted-corrupt")["job_id"])
    notes = [e["note"] for e in events if e.get("note")]
    assert any("sha256" in n and "fetching it again" in n for n in notes), notes
    forget(hub_agent, "hf:acme/noted-corrupt/m.gguf")
