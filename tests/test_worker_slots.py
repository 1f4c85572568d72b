"""B44 slots and B45 cancellation against a real worker process."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from tests.support import LONG_PROMPT, WorkerProc, sse_data

LONG = {"prompt": LONG_PROMPT, "max_tokens": 1500, "temperature": 0}


def quick_ok(worker: WorkerProc) -> bool:
    r = httpx.post(f"{worker.url}/v1/inference", headers=worker.headers, timeout=30,
                   json={"prompt": "Hi", "max_tokens": 2, "stream": False})
    return r.status_code == 200


def wait_until_serving(worker: WorkerProc, limit: float) -> float:
    """Seconds until a new request is accepted; fails past `limit`."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if quick_ok(worker):
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"worker still busy {limit}s later")


def test_b44_request_to_a_busy_worker_waits_its_turn(worker: WorkerProc) -> None:
    with httpx.stream("POST", f"{worker.url}/v1/inference", json=LONG,
                      headers=worker.headers, timeout=60) as r:
        rid = r.headers["x-request-id"]
        frames = sse_data(r)
        next(frames)
        with httpx.stream("POST", f"{worker.url}/v1/inference", headers=worker.headers,
                          json={"prompt": "Hi", "max_tokens": 2}, timeout=60) as waiting:
            assert waiting.status_code == 200
            events = sse_data(waiting)
            assert json.loads(next(events)) == {"queued": 0}
            httpx.delete(f"{worker.url}/v1/inference/{rid}", headers=worker.headers)
            rest = [json.loads(f) for f in events if f != "[DONE]"]
        assert rest[-1]["done"] is True and rest[-1]["finish_reason"] == "length"
        assert rest[-1]["total_tokens"] == 2
    wait_until_serving(worker, 2.0)


def test_b44_overloaded_worker_returns_503_with_slot_counts(
    start_worker: Callable[..., WorkerProc],
) -> None:
    w = start_worker("--queue-depth", "0")
    with httpx.stream("POST", f"{w.url}/v1/inference", json=LONG,
                      headers=w.headers, timeout=60) as r:
        frames = sse_data(r)  # kept: a dropped generator closes the stream (B45)
        next(frames)
        busy = httpx.post(f"{w.url}/v1/inference", headers=w.headers,
                          json={"prompt": "Hi", "max_tokens": 2})
        assert busy.status_code == 503
        err = busy.json()["error"]
        assert err["code"] == "QUEUE_FULL"
        assert err["details"]["slots_total"] == 1 and err["details"]["slots_busy"] == 1
        assert int(busy.headers["retry-after"]) == err["details"]["retry_after_s"] >= 1


def test_b44_two_slots_generate_in_parallel(start_worker: Callable[..., WorkerProc]) -> None:
    w = start_worker("--slots", "2")
    order: list[tuple[int, str]] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        with httpx.stream("POST", f"{w.url}/v1/inference", json={**LONG, "max_tokens": 40},
                          headers=w.headers, timeout=60) as r:
            assert r.status_code == 200
            for data in sse_data(r):
                kind = "token" if '"token"' in data else "done" if '"done"' in data else ""
                if kind:
                    with lock:
                        order.append((i, kind))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [k for i, k in order if i == 0].count("token") == 40
    assert [k for i, k in order if i == 1].count("token") == 40
    # Both streamed at once: each had tokens before the other was done, and no request
    # waited in the queue (there was a slot for each).
    for i in (0, 1):
        assert order.index((i, "token")) < order.index((1 - i, "done"))
    assert health(w)["queued"] == 0 and health(w)["slots_busy"] == 0


def health(worker: WorkerProc) -> dict[str, Any]:
    return dict(httpx.get(f"{worker.url}/v1/health").json())


def test_b45_delete_cancels_and_frees_the_slot_within_1s(worker: WorkerProc) -> None:
    with httpx.stream("POST", f"{worker.url}/v1/inference", json=LONG,
                      headers=worker.headers, timeout=60) as r:
        rid = r.headers["x-request-id"]
        frames = sse_data(r)
        for _ in range(3):
            next(frames)
        d = httpx.delete(f"{worker.url}/v1/inference/{rid}", headers=worker.headers)
        assert d.status_code == 204 and d.content == b""
        rest = [json.loads(f) for f in frames if f != "[DONE]"]
    assert rest[-1]["done"] is True and rest[-1]["finish_reason"] == "cancelled"
    assert rest[-1]["total_tokens"] < 200
    assert wait_until_serving(worker, 1.0) < 1.0


def test_b45_delete_is_idempotent_for_unknown_and_finished_ids(worker: WorkerProc) -> None:
    for rid in ("never-existed", "never-existed"):
        assert httpx.delete(f"{worker.url}/v1/inference/{rid}",
                            headers=worker.headers).status_code == 204
    r = httpx.post(f"{worker.url}/v1/inference", headers=worker.headers,
                   json={"prompt": "Hi", "max_tokens": 2, "stream": False})
    rid = r.json()["request_id"]
    assert httpx.delete(f"{worker.url}/v1/inference/{rid}",
                        headers=worker.headers).status_code == 204


def test_b45_dropped_connection_stops_generation_within_1s(worker: WorkerProc) -> None:
    served_before = worker_tokens(worker)
    with httpx.stream("POST", f"{worker.url}/v1/inference", json=LONG,
                      headers=worker.headers, timeout=60) as r:
        frames = sse_data(r)
        for _ in range(3):
            next(frames)
    # The connection is closed now; the slot must be free again within a second.
    assert wait_until_serving(worker, 1.0) < 1.0
    # And the generation really stopped: far fewer than 1500 tokens were produced.
    assert worker_tokens(worker) - served_before < 200


def worker_tokens(worker: WorkerProc) -> int:
    return int(httpx.get(f"{worker.url}/v1/health").json()["tokens_served"])


def test_b44_slot_is_free_when_the_client_sees_the_end(worker: WorkerProc) -> None:
    """A request sent the moment the previous stream ended is served, never 'busy'."""
    for _ in range(15):
        with httpx.stream("POST", f"{worker.url}/v1/inference", headers=worker.headers,
                          json={"prompt": "Hi", "max_tokens": 3}, timeout=60) as r:
            assert r.status_code == 200
            for _ in sse_data(r):
                pass
        again = httpx.post(f"{worker.url}/v1/inference", headers=worker.headers, timeout=60,
                           json={"prompt": "Hi", "max_tokens": 1, "stream": False})
        assert again.status_code == 200, again.text

