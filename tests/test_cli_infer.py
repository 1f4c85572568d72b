"""B09, B50-B57: `rbee infer` end to end on localhost with the real model."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import httpx
import psutil
import pytest

from tests.cli_support import RbeeEnv
from tests.support import LONG_PROMPT


def test_b50_cold_then_warm_infer_on_localhost(rbee: RbeeEnv) -> None:
    cold = rbee.run("infer", "--raw", "--prompt", "The capital of France is", "--max-tokens", "8",
                    "--temperature", "0")
    assert cold.returncode == 0, cold.stderr
    assert "Paris" in cold.stdout
    for phase in ("Checking the agent on localhost", "spawning one", "Loading smollm2-135m",
                  "30/30 layers", "Generating on worker"):
        assert phase in cold.stderr, phase
    assert re.search(r"8 tokens in [\d.]+ s \([\d.]+ tokens/s\)", cold.stderr)
    # B09: the agent stays up for the next request, which is warm (B51).
    assert psutil.pid_exists(rbee.agent_pid() or -1)
    warm = rbee.run("infer", "--raw", "--prompt", "The capital of France is", "--max-tokens", "8",
                    "--temperature", "0", "--json")
    assert warm.returncode == 0, warm.stderr
    assert "warm: reusing worker" in warm.stderr and "Loading" not in warm.stderr
    result = json.loads(warm.stdout)
    assert result["tokens"] == 8 and result["text"] == cold.stdout.rstrip("\n")
    assert result["finish_reason"] == "length" and result["tokens_per_s"] > 0


def test_b72_chat_flag_uses_the_template(rbee: RbeeEnv) -> None:
    r = rbee.run("infer", "--prompt", "Hi", "--chat", "--max-tokens", "5", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokens"] <= 5


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--node", "nope"], "Node 'nope' is not in the registry"),
        (["--temperature", "3"], "Temperature 3 is out of range"),
        (["--temperature", "-0.1"], "out of range"),
        (["--max-tokens", "0"], "--max-tokens must be greater than 0"),
        (["--model", "ftp://x/y.gguf"], "is not a model reference"),
        (["--backend", "tpu"], "Unknown backend 'tpu'"),
        (["--prompt", "   "], "The prompt is empty"),
    ],
)
def test_b57_inputs_validated_before_any_network(rbee: RbeeEnv, args: list[str],
                                                 needle: str) -> None:
    full = ["infer", "--prompt", "Hello", *args]
    r = rbee.run(*full)
    assert r.returncode == 1
    assert needle in r.stderr and "hint:" in r.stderr
    assert "Traceback" not in r.stderr
    assert rbee.agent_pid() is None, "validation must fail before starting the agent"


def test_b52_unknown_node_hint_names_the_add_command(rbee: RbeeEnv) -> None:
    r = rbee.run("infer", "--node", "gpu9", "--prompt", "x")
    assert "rbee nodes add --name gpu9" in r.stderr


def test_b56_usage_errors_exit_2(rbee: RbeeEnv) -> None:
    assert rbee.run("infer").returncode == 2
    assert rbee.run("infer", "--prompt", "x", "--max-tokens", "many").returncode == 2
    assert rbee.run("bogus").returncode == 2


def test_b55_ctrl_c_cancels_on_the_worker_and_exits_130(rbee: RbeeEnv) -> None:
    warmup = rbee.run("infer", "--prompt", "Hi", "--max-tokens", "1")
    assert warmup.returncode == 0, warmup.stderr
    proc = rbee.popen("infer", "--raw", "--prompt", LONG_PROMPT, "--max-tokens", "1500",
                      "--temperature", "0")
    assert proc.stdout is not None
    proc.stdout.read(20)  # tokens are flowing
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "canceled" in err and "Traceback" not in err
    # The worker's slot is free again at once.
    after = rbee.run("infer", "--prompt", "Hi", "--max-tokens", "2", "--json")
    assert after.returncode == 0, after.stderr
    assert "warm: reusing worker" in after.stderr


def test_b53_worker_killed_mid_stream_saves_the_partial_text(rbee: RbeeEnv) -> None:
    warmup = rbee.run("infer", "--prompt", "Hi", "--max-tokens", "1", "--json")
    assert warmup.returncode == 0, warmup.stderr
    worker_id = json.loads(warmup.stdout)["worker_id"]
    listed = json.loads(rbee.run("workers", "list", "--node", "localhost", "--json").stdout)
    pid = next(w["pid"] for w in listed if w["id"] == worker_id)
    proc = rbee.popen("infer", "--raw", "--prompt", LONG_PROMPT, "--max-tokens", "1500",
                      "--temperature", "0")
    assert proc.stdout is not None
    got = proc.stdout.read(40)
    os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    match = re.search(r"got (\d+) of 1500 tokens; partial text saved to (\S+)", err)
    assert match, err
    saved = Path(match.group(2)).read_text()
    assert saved.startswith(got) and saved == got + out
    assert int(match.group(1)) > 0


def test_b09_ephemeral_stops_only_what_it_started(rbee: RbeeEnv) -> None:
    url = f"http://127.0.0.1:{rbee.port}/v1/health"
    r = rbee.run("--ephemeral", "infer", "--prompt", "Hi", "--max-tokens", "2")
    assert r.returncode == 0, r.stderr
    assert rbee.agent_pid() is None, "the agent this run started is stopped and forgotten"
    with pytest.raises(httpx.TransportError):
        httpx.get(url, timeout=1)
    # Now an agent this run did not start: --ephemeral must leave it running.
    assert rbee.run("nodes", "start", "localhost").returncode == 0
    pid = rbee.agent_pid()
    assert pid is not None
    r = rbee.run("--ephemeral", "infer", "--prompt", "Hi", "--max-tokens", "2")
    assert r.returncode == 0, r.stderr
    assert psutil.pid_exists(pid)  # and `nodes stop` below finds that very agent running
    stop = rbee.run("nodes", "stop", "localhost")
    assert stop.returncode == 0 and f"pid {pid}" in stop.stderr
    with pytest.raises(httpx.TransportError):
        httpx.get(url, timeout=1)
