"""B100: a request that finds every slot busy waits in a FIFO queue, against a real worker.

Each stream is read on its own thread into one shared, ordered log, so the tests assert on
the order in which things happened, never on time.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.support import LONG_PROMPT, WorkerProc, sse_data

LONG = {"prompt": LONG_PROMPT, "max_tokens": 1500, "temperature": 0}
SHORT = {"prompt": "Hi", "max_tokens": 3, "temperature": 0}


class Log:
    """Every event of every stream of a test, in the order the test saw them."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, dict[str, Any]]] = []
        self.cond = threading.Condition()

    def add(self, name: str, event: dict[str, Any]) -> None:
        with self.cond:
            self.entries.append((name, event))
            self.cond.notify_all()

    def of(self, name: str) -> list[dict[str, Any]]:
        with self.cond:
            return [e for n, e in self.entries if n == name]

    def wait(self, name: str, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            return next((e for e in self.of(name) if pred(e)), None)

        with self.cond:
            assert self.cond.wait_for(lambda: found() is not None, timeout=60), self.entries
        event = found()
        assert event is not None
        return event

    def index(self, name: str, pred: Callable[[dict[str, Any]], bool]) -> int:
        with self.cond:
            return next(i for i, (n, e) in enumerate(self.entries) if n == name and pred(e))


class Stream:
    """One streamed request on a thread; `close()` hangs up like a client that left."""

    def __init__(self, worker: WorkerProc, log: Log, name: str, body: dict[str, Any]) -> None:
        self.name = name
        self.status = 0
        self.request_id = ""
        self._closed = threading.Event()
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, args=(worker, log, body))
        self._thread.start()

    def _run(self, worker: WorkerProc, log: Log, body: dict[str, Any]) -> None:
        try:
            with httpx.stream("POST", f"{worker.url}/v1/inference", json=body,
                              headers=worker.headers, timeout=60) as r:
                self._sock = r.extensions["network_stream"].get_extra_info("socket")
                self.status = r.status_code
                self.request_id = r.headers.get("x-request-id", "")
                if r.status_code != 200:
                    log.add(self.name, {"status": r.status_code, **json.loads(r.read())})
                    return
                for data in sse_data(r):
                    log.add(self.name,
                            {"end": True} if data == "[DONE]" else json.loads(data))
        except (httpx.HTTPError, AssertionError):
            if not self._closed.is_set():
                raise

    def close(self) -> None:
        """Hang up now, even while the reader waits for a frame."""
        self._closed.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    def join(self) -> None:
        self._thread.join(60)


@pytest.fixture
def streams() -> Iterator[list[Stream]]:
    started: list[Stream] = []
    yield started
    for s in started:
        s.close()
    for s in started:
        s.join()


def start(streams: list[Stream], worker: WorkerProc, log: Log, name: str,
          body: dict[str, Any]) -> Stream:
    stream = Stream(worker, log, name, body)
    streams.append(stream)
    return stream


def occupy(streams: list[Stream], worker: WorkerProc, log: Log,
           max_tokens: int = 1500) -> Stream:
    """Stream "a": a long generation that holds the worker's only slot once it streams."""
    a = start(streams, worker, log, "a", {**LONG, "max_tokens": max_tokens})
    log.wait("a", is_token)
    return a


def is_token(e: dict[str, Any]) -> bool:
    return "token" in e


def is_done(e: dict[str, Any]) -> bool:
    return e.get("done") is True


def queued(n: int) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e == {"queued": n}


def get(worker: WorkerProc, path: str) -> dict[str, Any]:
    return dict(httpx.get(f"{worker.url}{path}", headers=worker.headers).json())


def cancel(worker: WorkerProc, stream: Stream) -> None:
    httpx.delete(f"{worker.url}/v1/inference/{stream.request_id}", headers=worker.headers)


def test_b100_queued_requests_start_in_arrival_order_and_see_their_place(
    start_worker: Callable[..., WorkerProc], streams: list[Stream],
) -> None:
    w = start_worker()
    log = Log()
    a = occupy(streams, w, log)
    for place, name in enumerate("bcd"):
        start(streams, w, log, name, SHORT)
        log.wait(name, queued(place))
    health = get(w, "/v1/health")
    assert (health["slots_busy"], health["queued"], health["queue_depth"]) == (1, 3, 64)
    assert health["state"] == "busy"
    ready = get(w, "/v1/ready")
    assert ready["queued"] == 3 and ready["queue_depth"] == 64
    cancel(w, a)
    for s in streams:
        s.join()
    # Each moved up one place as the one ahead of it got the slot...
    assert [e for e in log.of("c") if "queued" in e] == [{"queued": 1}, {"queued": 0}]
    assert [e for e in log.of("d") if "queued" in e] == [{"queued": 2}, {"queued": 1},
                                                         {"queued": 0}]
    # ... and they were served one after the other, in the order they came.
    done = [log.index(n, is_done) for n in "abcd"]
    assert done == sorted(done)
    assert log.index("b", is_done) < log.index("c", is_token)
    assert [log.of(n)[-2]["total_tokens"] for n in "bcd"] == [3, 3, 3]
    assert get(w, "/v1/health")["queued"] == 0


def test_b100_full_queue_is_refused_with_retry_after(
    start_worker: Callable[..., WorkerProc], streams: list[Stream],
) -> None:
    w = start_worker("--queue-depth", "1")
    log = Log()
    a = occupy(streams, w, log)
    start(streams, w, log, "b", SHORT)
    log.wait("b", queued(0))
    refused = httpx.post(f"{w.url}/v1/inference", headers=w.headers, json=SHORT)
    assert refused.status_code == 503
    err = refused.json()["error"]
    assert err["code"] == "QUEUE_FULL" and "queue of 1 is full" in err["message"]
    assert err["details"]["queued"] == 1 and err["details"]["queue_depth"] == 1
    assert int(refused.headers["retry-after"]) == err["details"]["retry_after_s"] >= 1
    assert err["details"]["hint"]
    cancel(w, a)
    log.wait("b", is_done)


def test_b100_queue_timeout_ends_the_wait_with_all_slots_busy(
    start_worker: Callable[..., WorkerProc], streams: list[Stream],
) -> None:
    w = start_worker("--queue-timeout", "0.2")
    log = Log()
    a = occupy(streams, w, log)
    start(streams, w, log, "b", SHORT)
    error = log.wait("b", lambda e: "error" in e)["error"]
    assert error["code"] == "ALL_SLOTS_BUSY" and "waited in the queue" in error["message"]
    assert error["details"]["retry_after_s"] >= 1
    log.wait("b", lambda e: e == {"end": True})
    plain = httpx.post(f"{w.url}/v1/inference", headers=w.headers,
                       json={**SHORT, "stream": False}, timeout=30)
    assert plain.status_code == 503 and plain.json()["error"]["code"] == "ALL_SLOTS_BUSY"
    assert int(plain.headers["retry-after"]) >= 1
    assert get(w, "/v1/health")["queued"] == 0
    cancel(w, a)


def test_b100_a_client_that_leaves_the_queue_gives_up_its_place(
    start_worker: Callable[..., WorkerProc], streams: list[Stream],
) -> None:
    w = start_worker()
    log = Log()
    a = occupy(streams, w, log)
    b = start(streams, w, log, "b", SHORT)
    log.wait("b", queued(0))
    start(streams, w, log, "c", SHORT)
    log.wait("c", queued(1))
    b.close()  # the stream's reader stops and hangs up
    log.wait("c", queued(0))
    # A non-streamed request whose client gives up while it waits leaves the queue too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{w.url}/v1/inference", headers=w.headers,
                   json={**SHORT, "stream": False}, timeout=httpx.Timeout(60, read=0.5))
    log.wait("c", queued(0))
    cancel(w, a)
    log.wait("c", is_done)
    assert get(w, "/v1/health")["queued"] == 0


def test_b100_draining_worker_answers_queued_requests_worker_draining(
    start_worker: Callable[..., WorkerProc], streams: list[Stream],
) -> None:
    w = start_worker()
    log = Log()
    occupy(streams, w, log, max_tokens=60)
    start(streams, w, log, "b", SHORT)
    log.wait("b", queued(0))
    reply = httpx.post(f"{w.url}/v1/admin/shutdown", headers=w.headers).json()
    assert reply == {"state": "draining", "active_requests": 1}
    assert log.wait("b", lambda e: "error" in e)["error"]["code"] == "WORKER_DRAINING"
    done = log.wait("a", is_done)
    assert done["finish_reason"] == "length" and done["total_tokens"] == 60
    assert w.proc.wait(30) == 0
