"""B44 slots and B45 cancellation against a real worker process."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

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


def test_b44_busy_worker_returns_503_with_slot_counts(worker: WorkerProc) -> None:
    with httpx.stream("POST", f"{worker.url}/v1/inference", json=LONG,
                      headers=worker.headers, timeout=60) as r:
        rid = r.headers["x-request-id"]
        frames = sse_data(r)
        next(frames)
        busy = httpx.post(f"{worker.url}/v1/inference", headers=worker.headers,
                          json={"prompt": "Hi", "max_tokens": 2})
        assert busy.status_code == 503
        err = busy.json()["error"]
        assert err["code"] == "ALL_SLOTS_BUSY"
        assert err["details"]["slots_total"] == 1 and err["details"]["slots_busy"] == 1
        httpx.delete(f"{worker.url}/v1/inference/{rid}", headers=worker.headers)
    wait_until_serving(worker, 2.0)


def test_b44_two_slots_generate_in_parallel(start_worker: Callable[..., WorkerProc]) -> None:
    w = start_worker("--slots", "2", "--threads", "1")
    counts = [0, 0]
    first_token_at: list[float] = [0.0, 0.0]
    start = time.monotonic()

    def run(i: int) -> None:
        with httpx.stream("POST", f"{w.url}/v1/inference", json={**LONG, "max_tokens": 40},
                          headers=w.headers, timeout=60) as r:
            assert r.status_code == 200
            for data in sse_data(r):
                if '"token"' in data:
                    counts[i] += 1
                    first_token_at[i] = first_token_at[i] or time.monotonic() - start

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    third = httpx.post(f"{w.url}/v1/inference", headers=w.headers,
                       json={"prompt": "Hi", "max_tokens": 2})
    for t in threads:
        t.join(60)
    assert third.status_code == 503 and third.json()["error"]["details"]["slots_total"] == 2
    assert counts == [40, 40] or all(c > 30 for c in counts)
    # Both started streaming before either could have finished alone.
    assert max(first_token_at) < 1.5


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

