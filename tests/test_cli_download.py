"""B37, B50, B73 from the operator's side: `rbee models download` shows progress to the end,
and `rbee infer` on an `hf:` model the node lacks shows the download phase first."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.cli_support import RbeeEnv
from tests.hub_server import Blob, TestHub
from tests.support import bundled_model_path


@pytest.fixture
def hub() -> Iterator[TestHub]:
    with TestHub() as h:
        h.add_repo("bees/Tiny-GGUF", {"tiny-Q4_K_M.gguf": Blob(bundled_model_path())})
        yield h


@pytest.fixture
def hub_rbee(rbee: RbeeEnv, hub: TestHub) -> RbeeEnv:
    rbee.env.update({"HF_ENDPOINT": hub.url, "HF_TOKEN": "", "HUGGING_FACE_HUB_TOKEN": ""})
    return rbee


def test_b37_models_download_shows_progress_then_lists_the_model(hub_rbee: RbeeEnv) -> None:
    r = hub_rbee.run("models", "download", "--model", "hf:bees/Tiny-GGUF", "--json")
    assert r.returncode == 0, r.stderr
    assert "Fetching hf:bees/Tiny-GGUF on localhost" in r.stderr
    assert "MB" in r.stderr  # the progress bar's unit
    done = json.loads(r.stdout)
    assert done["stage"] == "complete" and done["local_path"].endswith("tiny-Q4_K_M.gguf")
    models = json.loads(hub_rbee.run("models", "list", "--json").stdout)
    entry = next(m for m in models if m["id"] == done["model_id"])
    assert entry["provider"] == "hf" and entry["layers"] == 30
    again = hub_rbee.run("models", "download", "--model", "hf:bees/Tiny-GGUF")
    assert again.returncode == 0 and "already on localhost" in again.stderr
    rm = hub_rbee.run("models", "rm", "--model", done["model_id"])
    assert rm.returncode == 0, rm.stderr


def test_b50_infer_on_a_missing_hf_model_downloads_then_loads(hub_rbee: RbeeEnv) -> None:
    r = hub_rbee.run("infer", "--model", "hf:bees/Tiny-GGUF", "--raw", "--prompt",
                     "The capital of France is", "--max-tokens", "6", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert "download" in r.stderr and "downloaded and verified" in r.stderr
    assert r.stderr.index("downloaded and verified") < r.stderr.index("30/30 layers")
    assert "Paris" in r.stdout


def test_b37_missing_repo_is_a_clear_error(hub_rbee: RbeeEnv) -> None:
    r = hub_rbee.run("models", "download", "--model", "hf:bees/Nope-GGUF")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "hf:bees/Nope-GGUF" in r.stderr or "bees/Nope-GGUF" in r.stderr
