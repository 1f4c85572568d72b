"""The agent under hostile input, faults and parallel use (B122-B125, B127, B132-B133).

Real agent processes on loopback, real workers on the bundled model; raw sockets where a
misbehaving client is the point.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.agent_support import AgentProc
from tests.support import LONG_PROMPT, bundled_model_path, sse_data

# --------------------------------------------------------------------------- B122 intents


def test_b122_parallel_spawns_of_one_model_start_one_worker(agent: AgentProc) -> None:
    def spawn(_: int) -> httpx.Response:
        return agent.post("/v1/workers", json={"model_ref": "smollm2-135m", "slots": 1})

    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(spawn, range(6)))
    assert sorted(r.status_code for r in replies) == [200] * 5 + [201]
    ids = {r.json()["worker"]["id"] for r in replies}
    assert len(ids) == 1
    assert sum(not r.json()["reused"] for r in replies) == 1
    worker_id = ids.pop()
    agent.wait_state(worker_id, "idle")
    agent.delete(f"/v1/workers/{worker_id}")


def test_b122_reuse_matches_slots_and_ctx_and_new_forces_another(agent: AgentProc) -> None:
    first = agent.spawn(ctx_size=1024)
    agent.wait_state(first["id"], "idle")
    same = agent.post("/v1/workers", json={"model_ref": "smollm2-135m", "ctx_size": 1024})
    assert same.status_code == 200 and same.json()["worker"]["id"] == first["id"]
    plain = agent.post("/v1/workers", json={"model_ref": "smollm2-135m"})
    other_ctx = agent.post("/v1/workers", json={"model_ref": "smollm2-135m",
                                                "ctx_size": 512, "slots": 2})
    forced = agent.post("/v1/workers", json={"model_ref": "smollm2-135m", "ctx_size": 1024,
                                             "new": True})
    assert plain.json()["worker"]["id"] == first["id"]  # no ctx asked: any will do
    assert other_ctx.status_code == 201 and other_ctx.json()["worker"]["slots_total"] == 2
    assert other_ctx.json()["worker"]["ctx_size"] == 512
    assert forced.status_code == 201 and forced.json()["worker"]["id"] != first["id"]
    for w in agent.get("/v1/workers").json()["workers"]:
        agent.delete(f"/v1/workers/{w['id']}")


# --------------------------------------------------------------------------- B123 edge


def test_b123_agent_body_over_4_mib_is_refused_while_reading(agent: AgentProc) -> None:
    big = b'{"model_ref": "' + b"x" * (5 * 1024 * 1024) + b'"}'
    r = agent.post("/v1/workers", content=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "REQUEST_TOO_LARGE"

    def chunks() -> object:  # no Content-Length: counted as it arrives
        for _ in range(6):
            yield b"x" * (1024 * 1024)

    r = agent.post("/v1/workers", content=chunks())
    assert r.status_code == 413 and r.json()["error"]["code"] == "REQUEST_TOO_LARGE"
    assert httpx.get(f"{agent.url}/v1/health").status_code == 200


def test_b123_silent_connections_are_closed_and_capped(
    start_agent: Callable[..., AgentProc],
) -> None:
    a = start_agent(**{"header-timeout-s": "0.5", "max-connections": "8"})
    socks = [socket.create_connection(("127.0.0.1", a.port)) for _ in range(20)]
    try:
        # over the cap: closed at once; the rest: closed when the head timeout passes
        started = time.monotonic()
        closed_at = []
        waiting = set(socks)
        while waiting and time.monotonic() - started < 10:
            readable, _, _ = select.select(list(waiting), [], [], 10)
            for s in readable:
                assert s.recv(1) == b""
                closed_at.append(time.monotonic() - started)
                waiting.discard(s)
        assert not waiting, "a silent connection was kept open"
        assert sum(t < 0.4 for t in closed_at) >= 12
        assert sum(t >= 0.4 for t in closed_at) <= 8
    finally:
        for s in socks:
            s.close()
    assert httpx.get(f"{a.url}/v1/health").status_code == 200


def test_b123_frozen_worker_does_not_hold_a_request(
    start_agent: Callable[..., AgentProc],
) -> None:
    a = start_agent(**{"worker-headers-timeout-s": "1"})
    worker = a.spawn()
    a.wait_state(worker["id"], "idle")
    os.kill(worker["pid"], signal.SIGSTOP)
    try:
        started = time.monotonic()
        r = a.post(f"/v1/workers/{worker['id']}/inference", json={"prompt": "Hi"})
        assert time.monotonic() - started < 5
        assert r.status_code == 502 and "within 1 s" in r.json()["error"]["message"]
    finally:
        os.kill(worker["pid"], signal.SIGCONT)
    a.delete(f"/v1/workers/{worker['id']}")


# --------------------------------------------------------------------------- B124 no 500s


@pytest.mark.parametrize("bad", ["a%00b", "a%0Ab", "a%0Db", "x" * 300])
def test_b124_cancel_with_a_hostile_request_id_is_a_client_error(
    agent: AgentProc, bad: str
) -> None:
    r = httpx.delete(f"{agent.url}/v1/workers/nope/inference/{bad}", headers=agent.headers)
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["code"] in ("INVALID_REQUEST", "WORKER_NOT_FOUND")


def test_b124_log_of_a_300_character_worker_name_is_not_found(agent: AgentProc) -> None:
    for name in ("w" * 300, "a\x00b", "../../etc/passwd", "w" * 60):
        r = agent.get("/v1/logs", params={"worker": name})
        assert r.status_code in (400, 404), r.text


def test_b124_client_hanging_up_mid_body_leaves_no_traceback(agent: AgentProc) -> None:
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", agent.port)) as s:
            s.sendall(b"POST /v1/workers HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer "
                      + agent.key.encode() + b"\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"model_ref\": ")
    assert httpx.get(f"{agent.url}/v1/health").status_code == 200
    time.sleep(0)  # the log is read after the agent answered health: it has seen the hang-up
    log = agent.log() + (agent.home / "logs" / "agent.log").read_text()
    assert "Traceback" not in log


def test_b124_a_request_id_in_the_body_is_the_id_to_cancel(agent: AgentProc) -> None:
    worker = agent.spawn()
    agent.wait_state(worker["id"], "idle")
    url = f"{agent.url}/v1/workers/{worker['id']}"
    with httpx.stream("POST", f"{url}/inference", headers=agent.headers, timeout=60,
                      json={"prompt": LONG_PROMPT, "max_tokens": 1500, "temperature": 0,
                            "request_id": "myid-123"}) as r:
        assert r.headers["x-request-id"] == "myid-123"
        frames = sse_data(r)
        next(frames)
        assert httpx.delete(f"{url}/inference/myid-123", headers=agent.headers
                            ).status_code == 204
        rest = [json.loads(f) for f in frames if f != "[DONE]"]
    assert rest[-1]["finish_reason"] == "cancelled" and rest[-1]["request_id"] == "myid-123"
    bad = agent.post(f"/v1/workers/{worker['id']}/inference",  # a lone surrogate, escaped
                     content=b'{"prompt": "x", "request_id": "a\\ud800b"}')
    assert bad.status_code == 400
    agent.delete(f"/v1/workers/{worker['id']}")


# --------------------------------------------------------------------------- B125 load


def test_b125_a_full_worker_is_refused_by_the_agent_with_retry_after(agent: AgentProc) -> None:
    worker = agent.spawn()
    agent.wait_state(worker["id"], "idle")
    depth = agent.get(f"/v1/workers/{worker['id']}").json()["queue_depth"]
    url = f"{agent.url}/v1/workers/{worker['id']}"
    with httpx.stream("POST", f"{url}/inference", headers=agent.headers, timeout=60,
                      json={"prompt": LONG_PROMPT, "max_tokens": 1500, "temperature": 0}) as r:
        frames = sse_data(r)
        next(frames)
        if depth == 0:  # a worker without a queue: the agent knows its one slot is taken
            os.kill(worker["pid"], signal.SIGSTOP)  # it could not answer anyway
            try:
                started = time.monotonic()
                busy = agent.post(f"/v1/workers/{worker['id']}/inference", json={"prompt": "x"})
                assert time.monotonic() - started < 1
            finally:
                os.kill(worker["pid"], signal.SIGCONT)
            err = busy.json()["error"]
            assert busy.status_code == 503 and err["code"] == "ALL_SLOTS_BUSY"
            assert int(busy.headers["retry-after"]) >= 1
        httpx.delete(f"{url}/inference/{r.headers['x-request-id']}", headers=agent.headers)
    agent.delete(f"/v1/workers/{worker['id']}")


def test_b125_a_full_queue_is_answered_by_the_agent(
    start_agent: Callable[..., AgentProc],
) -> None:
    a = start_agent(**{"worker-queue-depth": "1"})
    worker = a.spawn()
    info = a.wait_state(worker["id"], "idle")
    assert info["queue_depth"] == 1
    url = f"{a.url}/v1/workers/{worker['id']}/inference"
    long = {"prompt": LONG_PROMPT, "max_tokens": 1500, "temperature": 0}
    with httpx.stream("POST", url, headers=a.headers, timeout=60, json=long) as first:
        running = sse_data(first)  # kept: a dropped generator closes the stream
        next(running)
        with httpx.stream("POST", url, headers=a.headers, timeout=60,
                          json={"prompt": "Hi", "max_tokens": 2}) as queued:
            assert queued.status_code == 200
            os.kill(worker["pid"], signal.SIGSTOP)  # the refusal must not need the worker
            try:
                full = a.post(f"/v1/workers/{worker['id']}/inference", json={"prompt": "x"})
            finally:
                os.kill(worker["pid"], signal.SIGCONT)
            err = full.json()["error"]
            assert full.status_code == 503 and err["code"] == "QUEUE_FULL", err
            assert err["details"]["queue_depth"] == 1 and int(full.headers["retry-after"]) >= 1
            httpx.delete(f"{url[:-len('/inference')]}/inference/"
                         f"{first.headers['x-request-id']}", headers=a.headers)
            assert list(sse_data(queued))[-1] == "[DONE]"
    a.delete(f"/v1/workers/{worker['id']}")


# --------------------------------------------------------------------------- B127, B132


def test_b127_failed_start_stays_visible_for_failed_kept_s(
    start_agent: Callable[..., AgentProc],
) -> None:
    a = start_agent(**{"failed-kept-s": "1"})
    cut = a.home / "cut.gguf"
    cut.write_bytes(bundled_model_path().read_bytes()[: 2 * 1024 * 1024])
    worker = a.spawn(cut.as_uri())
    info = a.wait_state(worker["id"], "failed")
    assert info["error"]["code"] == "WORKER_START_FAILED"
    assert worker["id"] in {w["id"] for w in a.get("/v1/workers").json()["workers"]}
    a.wait_gone(worker["id"], 5)


def test_b132_node_says_which_agent_answers(agent: AgentProc) -> None:
    node = agent.get("/v1/node").json()
    assert node["agent_pid"] == agent.proc.pid
    assert len(node["agent_instance_id"]) == 32
    assert node["agent_started_at"] <= time.time()
    assert agent.get("/v1/node").json()["agent_instance_id"] == node["agent_instance_id"]


def test_b124_worker_environment_holds_no_agent_key(agent: AgentProc) -> None:
    worker = agent.spawn()
    environ = Path(f"/proc/{worker['pid']}/environ").read_bytes().split(b"\0")
    names = {e.split(b"=", 1)[0] for e in environ if e}
    assert b"RBEE_WORKER_API_KEY" in names and b"RBEE_AGENT_API_KEY" not in names
    assert agent.key.encode() not in b"\0".join(environ)
    agent.wait_state(worker["id"], "idle")
    agent.delete(f"/v1/workers/{worker['id']}")
