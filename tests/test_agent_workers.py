"""B20-B33 with a real agent process spawning real workers on the bundled model."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil

from tests.agent_support import AgentProc
from tests.support import LONG_PROMPT, bundled_model_path, sse_data, sse_events


def infer_events(agent: AgentProc, worker_id: str, **body: object) -> list[dict]:
    with httpx.stream("POST", f"{agent.url}/v1/workers/{worker_id}/inference", json=body,
                      headers=agent.headers, timeout=60) as r:
        assert r.status_code == 200, r.read()
        return sse_events(r)


def test_b21_health_needs_no_key(agent: AgentProc) -> None:
    body = httpx.get(f"{agent.url}/v1/health").json()
    assert body == {"status": "ok", "version": body["version"], "api_version": "1"}


def test_b23_node_reports_resources(agent: AgentProc) -> None:
    node = agent.get("/v1/node").json()
    assert node["cpu_count"] == os.cpu_count()
    assert node["ram_total_mb"] > node["ram_available_mb"] > 0
    assert node["backends"][0] == "cpu" and node["models_dir"].startswith(str(agent.home))


def test_b25_spawn_answers_loading_then_becomes_idle_and_serves(agent: AgentProc) -> None:
    started = time.monotonic()
    r = agent.post("/v1/workers", json={"model_ref": "smollm2-135m"})
    assert r.status_code == 201 and time.monotonic() - started < 1.0
    worker = r.json()["worker"]
    assert worker["state"] == "loading" and r.json()["reused"] is False
    assert worker["model_id"] == "smollm2-135m" and worker["layers_total"] == 30
    with httpx.stream("GET", f"{agent.url}/v1/workers/{worker['id']}/progress",
                      headers=agent.headers, timeout=60) as p:
        events = sse_events(p)
    assert events[0]["stage"] in ("starting", "loading")
    assert events[-1] == {"stage": "ready", "layers_loaded": 30, "layers_total": 30}
    info = agent.get(f"/v1/workers/{worker['id']}").json()
    assert info["state"] == "idle" and info["pid"] > 0 and info["rss_mb"] > 50
    assert info["url"].startswith("http://127.0.0.1:")
    listed = agent.get("/v1/workers").json()["workers"]
    assert [w["id"] for w in listed] == [worker["id"]]
    assert agent.get("/v1/workers/list").json()["workers"][0]["id"] == worker["id"]

    events = infer_events(agent, worker["id"], prompt="The capital of France is",
                          max_tokens=8, temperature=0)
    assert events[-1]["done"] and events[-1]["total_tokens"] == 8
    assert "Paris" in "".join(e.get("token", "") for e in events)
    assert agent.get(f"/v1/workers/{worker['id']}").json()["tokens_served"] == 8

    # B26: the idle worker for the same model, backend and device is reused.
    again = agent.post("/v1/workers", json={"model_ref": "smollm2-135m"})
    assert again.status_code == 200 and again.json()["reused"] is True
    assert again.json()["worker"]["id"] == worker["id"]

    stopped = agent.delete(f"/v1/workers/{worker['id']}")
    assert stopped.status_code == 200
    assert agent.get(f"/v1/workers/{worker['id']}").status_code == 404
    assert not psutil.pid_exists(info["pid"]) or psutil.Process(info["pid"]).status() == "zombie"


def test_b33_request_id_passes_through_and_cancel_reaches_the_worker(agent: AgentProc) -> None:
    worker = agent.spawn()
    agent.wait_state(worker["id"], "idle")
    url = f"{agent.url}/v1/workers/{worker['id']}"
    with httpx.stream("POST", f"{url}/inference", timeout=60,
                      headers={**agent.headers, "X-Request-Id": "req-through-agent"},
                      json={"prompt": LONG_PROMPT, "max_tokens": 1500, "temperature": 0}) as r:
        assert r.headers["x-request-id"] == "req-through-agent"
        frames = sse_data(r)
        next(frames)
        assert agent.get(f"/v1/workers/{worker['id']}").json()["state"] == "busy"
        c = httpx.delete(f"{url}/inference/req-through-agent", headers=agent.headers)
        assert c.status_code == 204
        rest = [json.loads(f) for f in frames if f != "[DONE]"]
    assert rest[-1]["finish_reason"] == "cancelled"
    assert rest[-1]["request_id"] == "req-through-agent"
    agent.wait_state(worker["id"], "idle", timeout=2)
    agent.delete(f"/v1/workers/{worker['id']}")


def test_b134_tokens_served_rises_while_a_reply_streams(agent: AgentProc) -> None:
    """The node's TOK/S is computed from this count between polls: it must move during a
    reply, not jump when the reply ends."""
    worker = agent.spawn()
    agent.wait_state(worker["id"], "idle")
    url = f"{agent.url}/v1/workers/{worker['id']}"
    with httpx.stream("POST", f"{url}/inference", timeout=60, headers=agent.headers,
                      json={"prompt": LONG_PROMPT, "max_tokens": 1500, "temperature": 0}) as r:
        frames = sse_data(r)
        seen = 0
        while seen < 6:
            seen += "token" in json.loads(next(frames))
        counted = agent.get(f"/v1/workers/{worker['id']}").json()["tokens_served"]
        assert counted >= seen
        rest = [json.loads(f) for f in frames if f != "[DONE]"]
    done = rest[-1]
    assert done["done"]
    info = agent.get(f"/v1/workers/{worker['id']}").json()
    assert info["tokens_served"] == done["total_tokens"]
    agent.delete(f"/v1/workers/{worker['id']}")


def test_b33_client_disconnect_cancels_upstream(agent: AgentProc) -> None:
    worker = agent.spawn()
    agent.wait_state(worker["id"], "idle")
    url = f"{agent.url}/v1/workers/{worker['id']}"
    with httpx.stream("POST", f"{url}/inference", headers=agent.headers, timeout=60,
                      json={"prompt": LONG_PROMPT, "max_tokens": 1500, "temperature": 0}) as r:
        frames = sse_data(r)
        for _ in range(3):
            next(frames)
    start = time.monotonic()
    while True:
        r = agent.post(f"/v1/workers/{worker['id']}/inference",
                       json={"prompt": "Hi", "max_tokens": 2, "stream": False})
        if r.status_code == 200:
            break
        assert r.json()["error"]["code"] == "ALL_SLOTS_BUSY"
        assert time.monotonic() - start < 1.0, "the worker kept generating for a gone client"
        time.sleep(0.02)
    agent.delete(f"/v1/workers/{worker['id']}")


def test_b44_busy_answer_passes_through_the_agent(agent: AgentProc) -> None:
    worker = agent.spawn()
    agent.wait_state(worker["id"], "idle")
    url = f"{agent.url}/v1/workers/{worker['id']}"
    with httpx.stream("POST", f"{url}/inference", headers=agent.headers, timeout=60,
                      json={"prompt": LONG_PROMPT, "max_tokens": 1500, "temperature": 0}) as r:
        frames = sse_data(r)  # keep a reference: a collected generator closes the stream
        next(frames)
        busy = agent.post(f"/v1/workers/{worker['id']}/inference", json={"prompt": "x"})
        assert busy.status_code == 503
        details = busy.json()["error"]["details"]
        assert details == {"slots_total": 1, "slots_busy": 1, "hint": details["hint"],
                           "retry_after_s": details["retry_after_s"]}
        assert busy.headers["retry-after"] == str(details["retry_after_s"])
        httpx.delete(f"{url}/inference/{r.headers['x-request-id']}", headers=agent.headers)
    agent.delete(f"/v1/workers/{worker['id']}")


# ---------------------------------------------------------------- preflight (B25, B36)


def error_of(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    return dict(err)


def test_b25_invalid_backend_names_the_valid_ones(agent: AgentProc) -> None:
    err = error_of(agent.post("/v1/workers", json={"model_ref": "smollm2-135m",
                                                   "backend": "tpu"}), 400, "INVALID_BACKEND")
    assert err["details"]["valid"] == ["cpu", "cuda", "metal"]


def test_b25_unavailable_backend_lists_what_is(agent: AgentProc) -> None:
    err = error_of(agent.post("/v1/workers", json={"model_ref": "smollm2-135m",
                                                   "backend": "cuda"}), 409,
                   "BACKEND_UNAVAILABLE")
    assert err["details"]["available"] == ["cpu"]


def test_b25_unknown_device_lists_devices(agent: AgentProc) -> None:
    err = error_of(agent.post("/v1/workers", json={"model_ref": "smollm2-135m",
                                                   "device": 3}), 404, "DEVICE_NOT_FOUND")
    assert err["details"] == {"device": 3, "devices": [0], "hint": err["details"]["hint"]}


def test_b36_bad_references(agent: AgentProc) -> None:
    err = error_of(agent.post("/v1/workers", json={"model_ref": "ftp://x/y.gguf"}), 400,
                   "INVALID_MODEL_REF")
    assert "hf:org/repo" in err["message"] + json.dumps(err["details"])
    err = error_of(agent.post("/v1/workers", json={"model_ref": "no-such-model"}), 404,
                   "MODEL_NOT_FOUND")
    assert "no-such-model" in err["message"]
    # hf: references not on the node are downloaded first: see tests/test_provision.py.
    assert agent.get("/v1/workers").json()["workers"] == []


def test_b36_file_reference_is_registered_on_first_use(agent: AgentProc, tmp_path: Path) -> None:
    copy = tmp_path / "My Model.gguf"
    os.link(bundled_model_path(), copy) if _same_fs(tmp_path) else copy.write_bytes(
        bundled_model_path().read_bytes())
    worker = agent.spawn(copy.as_uri())
    assert worker["model_ref"] == copy.as_uri() and worker["model_id"] == "my-model"
    models = {m["id"]: m for m in agent.get("/v1/models").json()["models"]}
    assert models["my-model"]["provider"] == "file"
    assert models["my-model"]["architecture"] == "llama" and models["my-model"]["layers"] == 30
    agent.wait_state(worker["id"], "idle")
    # B35: a model in use cannot be deleted.
    error_of(agent.delete("/v1/models/my-model"), 409, "MODEL_IN_USE")
    agent.delete(f"/v1/workers/{worker['id']}")
    assert agent.delete("/v1/models/my-model").status_code == 200
    assert copy.exists(), "a file: model outside the models dir is the user's: keep it"
    assert "my-model" not in {m["id"] for m in agent.get("/v1/models").json()["models"]}


def _same_fs(path: Path) -> bool:
    return os.stat(path).st_dev == os.stat(bundled_model_path()).st_dev


def test_b35_bundled_model_cannot_be_deleted(agent: AgentProc) -> None:
    error_of(agent.delete("/v1/models/smollm2-135m"), 409, "MODEL_PROTECTED")
    error_of(agent.delete("/v1/models/nope"), 404, "MODEL_NOT_FOUND")


# ---------------------------------------------------------------- failures (B28, B32)


def test_b32_worker_dying_while_starting_reports_its_last_lines(
    agent: AgentProc, tmp_path: Path
) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(bundled_model_path().read_bytes()[: 4 * 1024 * 1024])
    worker = agent.spawn(cut.as_uri())
    with httpx.stream("GET", f"{agent.url}/v1/workers/{worker['id']}/progress",
                      headers=agent.headers, timeout=60) as p:
        events = sse_events(p)
    failed = events[-1]
    assert failed["stage"] == "failed"
    err = failed["error"]
    assert err["code"] == "WORKER_START_FAILED" and err["details"]["exit_code"] == 1
    assert any(str(cut) in line for line in err["details"]["last_lines"])
    kept = agent.get(f"/v1/workers/{worker['id']}").json()  # B127: kept, as failed
    assert kept["state"] == "failed" and kept["error"]["code"] == "WORKER_START_FAILED"
    assert "exited with code 1" in agent.log()


def test_b28_killed_worker_mid_stream_ends_clearly_and_is_removed(agent: AgentProc) -> None:
    worker = agent.spawn()
    agent.wait_state(worker["id"], "idle")
    with httpx.stream("POST", f"{agent.url}/v1/workers/{worker['id']}/inference",
                      headers=agent.headers, timeout=60,
                      json={"prompt": LONG_PROMPT, "max_tokens": 1500, "temperature": 0}) as r:
        frames = sse_data(r)
        next(frames)
        os.kill(worker["pid"], signal.SIGKILL)
        killed = time.monotonic()
        rest = list(frames)
    assert rest[-1] == "[DONE]"
    err = json.loads(rest[-2])["error"]
    assert err["code"] == "WORKER_CRASHED" and worker["id"] in err["message"]
    assert agent.wait_gone(worker["id"], 1.0) + (time.monotonic() - killed) < 2.0
    fresh = agent.spawn()
    assert fresh["id"] != worker["id"]
    agent.wait_state(fresh["id"], "idle")
    agent.delete(f"/v1/workers/{fresh['id']}")


def test_b25_taken_port_is_skipped(start_agent: Callable[..., AgentProc]) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    try:
        a = start_agent(**{"worker-port-min": str(taken), "worker-port-max": str(taken + 20)})
        worker = a.spawn()
        assert worker["url"] != f"http://127.0.0.1:{taken}"
        assert int(worker["url"].rsplit(":", 1)[1]) > taken
        a.wait_state(worker["id"], "idle")
    finally:
        blocker.close()


def test_b28_hung_worker_is_removed_after_three_failed_checks(
    start_agent: Callable[..., AgentProc],
) -> None:
    a = start_agent(**{"health-interval-s": "0.2", "health-timeout-s": "0.2"})
    worker = a.spawn()
    a.wait_state(worker["id"], "idle")
    process = psutil.Process(worker["pid"])
    os.kill(worker["pid"], signal.SIGSTOP)
    try:
        took = a.wait_gone(worker["id"], 5.0)
        assert took > 0.5, "removed before three checks could have failed"
        assert "failed 3 health checks in a row" in a.log()
        gone, _ = psutil.wait_procs([process], timeout=3)
        assert gone
    finally:
        if psutil.pid_exists(worker["pid"]):
            os.kill(worker["pid"], signal.SIGKILL)


def test_b29_idle_worker_is_stopped_and_agent_keeps_running(
    start_agent: Callable[..., AgentProc],
) -> None:
    a = start_agent(**{"idle-timeout-s": "1"})
    worker = a.spawn()
    a.wait_state(worker["id"], "idle")
    took = a.wait_gone(worker["id"], 6.0)
    assert took >= 0.5
    assert "idle for" in a.log()
    assert httpx.get(f"{a.url}/v1/health").status_code == 200


def test_b31_sigterm_stops_all_workers_and_exits_0(start_agent: Callable[..., AgentProc]) -> None:
    a = start_agent()
    pids = [a.spawn()["pid"], a.spawn(ctx_size=1024)["pid"]]
    a.wait_state(a.get("/v1/workers").json()["workers"][0]["id"], "idle")
    a.proc.send_signal(signal.SIGTERM)
    assert a.proc.wait(30) == 0
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


def test_b31_hard_killed_agent_leaves_no_orphans(start_agent: Callable[..., AgentProc]) -> None:
    a = start_agent()
    worker = a.spawn()
    a.wait_state(worker["id"], "idle")
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait()
    gone, alive = psutil.wait_procs([psutil.Process(worker["pid"])], timeout=3)
    assert gone and not alive


def test_b35_catalog_survives_a_restart(start_agent: Callable[..., AgentProc],
                                        tmp_path: Path) -> None:
    model = tmp_path / "keep.gguf"
    model.write_bytes(bundled_model_path().read_bytes())
    a = start_agent("persist")
    a.spawn(model.as_uri())
    a.stop()
    b = start_agent("persist")
    ids = {m["id"] for m in b.get("/v1/models").json()["models"]}
    assert {"keep", "smollm2-135m"} <= ids


def test_b34_logs_tail_and_follow(agent: AgentProc) -> None:
    worker = agent.spawn()
    agent.wait_state(worker["id"], "idle")
    tail = agent.get("/v1/logs", params={"worker": worker["id"], "tail": 2}).json()
    assert tail["source"] == worker["id"] and len(tail["lines"]) == 2
    agent_log = agent.get("/v1/logs", params={"tail": 50}).json()["lines"]
    assert any(f"spawned worker {worker['id']}" in line for line in agent_log)
    with httpx.stream("GET", f"{agent.url}/v1/logs", headers=agent.headers, timeout=30,
                      params={"follow": "true", "tail": 0}) as r:
        frames = sse_data(r)
        agent.delete(f"/v1/workers/{worker['id']}")
        seen = ""
        for data in frames:
            seen = json.loads(data)["line"]
            if f"worker {worker['id']}" in seen and "exited" in seen:
                break
    assert "exited with code 0" in seen
    err = agent.get("/v1/logs", params={"worker": "../etc"}).json()["error"]
    assert err["code"] == "WORKER_NOT_FOUND"
