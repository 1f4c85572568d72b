"""B100-B105, B47: the engine thread with the real model, in-process (no HTTP).

One context, many sequences: these tests drive the real scheduler through its inbox and read
what it emits, in order, so they assert on the order of events and never on time.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from rbee_agent.protocol import DoneEvent, InferenceRequest, RbeeError, TokenEvent
from rbee_agent.worker.engine import Engine, EngineConfig
from rbee_agent.worker.scheduler import Job, Reuse, StreamItem
from tests.support import LONG_PROMPT, bundled_model_path

CHUNK = 64
SLOTS = 8

PROMPTS = [
    "Once upon a time", "The capital of France is", "1, 2, 3, 4,", "Name a colour:",
    "def fib(n):", "In the beginning", "Bees make honey because", "My favourite food is",
]


@dataclass
class Recorder:
    """Everything the engine emitted, in order, with markers the test adds itself."""

    log: list[tuple[str, StreamItem | str]] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    steps: int = 0

    def sink(self, items: list[tuple[Job, StreamItem]]) -> None:
        with self.cond:
            self.steps += 1
            self.log.extend((job.request_id, item) for job, item in items)
            self.cond.notify_all()

    def mark(self, what: str) -> None:
        with self.cond:
            self.log.append(("test", what))

    def items(self, rid: str) -> list[StreamItem]:
        with self.cond:
            return [item for r, item in self.log if r == rid and not isinstance(item, str)]

    def wait(self, rid: str, tokens: int = 0) -> list[StreamItem]:
        """Items of `rid` once it has ended (or has `tokens` token events)."""
        def ready() -> bool:
            got = self.items(rid)
            return bool(got) and (isinstance(got[-1], DoneEvent | RbeeError)
                                  or (tokens > 0 and sum(isinstance(i, TokenEvent)
                                                         for i in got) >= tokens))
        with self.cond:
            assert self.cond.wait_for(ready, timeout=120), f"{rid} did not get there"
        return self.items(rid)


def running_engine(slots: int, reuse: Reuse) -> Iterator[tuple[Engine, Recorder]]:
    eng = Engine(EngineConfig(model_path=bundled_model_path(), slots=slots, ctx_size=2048,
                              prefill_chunk=CHUNK, threads=1, prefix_reuse=reuse))
    eng.load(lambda _layers: None, lambda: False)
    recorder = Recorder()
    eng.start(recorder.sink)
    yield eng, recorder
    eng.close()


@pytest.fixture(scope="module")
def engine() -> Iterator[tuple[Engine, Recorder]]:
    """Eight slots, reusing any cached prefix (the CPU default)."""
    yield from running_engine(SLOTS, Reuse.ANY)


@pytest.fixture(scope="module")
def chunk_engine() -> Iterator[tuple[Engine, Recorder]]:
    """Two slots, reusing whole prompt chunks only (the GPU default)."""
    yield from running_engine(2, Reuse.CHUNKS)


@pytest.fixture
def fresh_engine() -> Iterator[tuple[Engine, Recorder]]:
    yield from running_engine(4, Reuse.ANY)


either_engine = pytest.mark.parametrize("which", ["engine", "chunk_engine"])


_ids = iter(range(10**6))


def submit(engine: Engine, **body: object) -> Job:
    request = InferenceRequest.model_validate(body)
    job = Job(f"r{next(_ids)}", request, engine.prepare(request))
    engine.submit(job)
    return job


def text_of(items: list[StreamItem]) -> str:
    return "".join(i.token for i in items if isinstance(i, TokenEvent))


def done_of(items: list[StreamItem]) -> DoneEvent:
    assert isinstance(items[-1], DoneEvent), items[-1]
    return items[-1]


def test_b104_greedy_output_is_the_same_alone_and_batched_with_seven_others(
    engine: tuple[Engine, Recorder],
) -> None:
    eng, rec = engine
    body = {"max_tokens": 16, "temperature": 0}
    alone = []
    for prompt in PROMPTS:
        job = submit(eng, prompt=prompt, **body)
        alone.append(text_of(rec.wait(job.request_id)))
    jobs = [submit(eng, prompt=prompt, **body) for prompt in PROMPTS]
    batched = [text_of(rec.wait(job.request_id)) for job in jobs]
    assert batched == alone
    assert len(set(alone)) == len(PROMPTS) and all(alone)


def test_b104_seeded_sampling_is_the_same_alone_and_batched(
    engine: tuple[Engine, Recorder],
) -> None:
    eng, rec = engine
    body = {"max_tokens": 16, "temperature": 1.1, "seed": 42}
    alone = [text_of(rec.wait(submit(eng, prompt=p, **body).request_id)) for p in PROMPTS[:4]]
    jobs = [submit(eng, prompt=p, **body) for p in PROMPTS[:4]]
    assert [text_of(rec.wait(j.request_id)) for j in jobs] == alone


def test_b105_cancelling_one_of_four_leaves_the_others_intact_and_frees_its_cells(
    fresh_engine: tuple[Engine, Recorder],
) -> None:
    eng, rec = fresh_engine
    assert eng.scheduler is not None
    body = {"prompt": LONG_PROMPT, "max_tokens": 40, "temperature": 0}
    jobs = [submit(eng, **body) for _ in range(4)]
    prompt = len(jobs[0].prompt)
    for job in jobs:
        rec.wait(job.request_id, tokens=3)
    victim = jobs[1]
    victim.cancelled = True
    done = done_of(rec.wait(victim.request_id))
    assert done.finish_reason == "cancelled" and done.total_tokens < 40
    # The moment it ends, its reply's cells are freed (its prompt's stay, for a retry),
    # while the three others still hold their prompt and what they have generated so far.
    cells = eng.scheduler.kv_cells().result(30)
    assert cells.count(prompt) == 1
    assert sorted(cells)[1:] == sorted(c for c in cells if c > prompt)
    texts = {text_of(rec.wait(j.request_id)) for j in jobs if j is not victim}
    assert len(texts) == 1 and all(done_of(rec.items(j.request_id)).total_tokens == 40
                                   for j in jobs if j is not victim)
    alone = rec.wait(submit(eng, **body).request_id)
    assert text_of(alone) in texts


def test_b103_a_long_prompt_is_read_in_chunks_between_the_running_streams_tokens(
    engine: tuple[Engine, Recorder],
) -> None:
    eng, rec = engine
    runner = submit(eng, prompt=LONG_PROMPT, max_tokens=400, temperature=0)
    rec.wait(runner.request_id, tokens=3)
    long_prompt = " ".join(f"bee{i}" for i in range(160))  # ~600 tokens
    rec.mark("long prompt sent")
    reader = submit(eng, prompt=long_prompt, max_tokens=2, temperature=0)
    rec.wait(reader.request_id)
    runner.cancelled = True
    rec.wait(runner.request_id)
    chunks = len(reader.prompt) // CHUNK
    assert chunks >= 8
    with rec.cond:
        order = [(rid, item) for rid, item in rec.log if rid in (runner.request_id, "test",
                                                                  reader.request_id)]
    sent = order.index(("test", "long prompt sent"))
    first_token = next(i for i, (rid, item) in enumerate(order)
                       if rid == reader.request_id and isinstance(item, TokenEvent))
    tokens_meanwhile = sum(1 for rid, item in order[sent:first_token]
                           if rid == runner.request_id and isinstance(item, TokenEvent))
    # One step per chunk of the long prompt, and the running stream got a token in each.
    assert tokens_meanwhile >= chunks - 1


@either_engine
def test_b102_b47_next_chat_turn_reuses_the_cache_and_gives_the_same_text(
    which: str, request: pytest.FixtureRequest,
) -> None:
    eng, rec = request.getfixturevalue(which)
    history = [{"role": "user", "content": f"Tell me about bees ({which}). " + "Buzz. " * 90}]
    first = rec.wait(submit(eng, messages=history, max_tokens=16, temperature=0).request_id)
    prompt = done_of(first).prompt_tokens
    assert done_of(first).cached_tokens == 0
    history += [{"role": "assistant", "content": text_of(first)},
                {"role": "user", "content": "And wasps?"}]
    seeded = {"messages": history, "max_tokens": 16, "temperature": 1.2, "seed": 99}
    second = rec.wait(submit(eng, **seeded).request_id)
    cached = done_of(second).cached_tokens or 0
    if which == "engine":  # any prefix: the whole first turn, prompt and reply
        assert cached >= prompt + 1
    else:  # whole chunks of the first prompt only
        assert cached == prompt - prompt % CHUNK >= 2 * CHUNK
    # The same turn again, now mostly from the cache: the same seeded text (B47).
    third = rec.wait(submit(eng, **seeded).request_id)
    assert (done_of(third).cached_tokens or 0) >= max(cached, 1)
    assert text_of(third) == text_of(second)


@either_engine
def test_b47_seeded_request_gives_the_same_text_with_and_without_its_cached_prefix(
    which: str, request: pytest.FixtureRequest,
) -> None:
    eng, rec = request.getfixturevalue(which)
    body = {"prompt": f"Flowers ({which}): " + ", ".join(f"rose{i}" for i in range(80)),
            "max_tokens": 16, "temperature": 1.2, "seed": 1234}
    cold = rec.wait(submit(eng, **body).request_id)
    warm = rec.wait(submit(eng, **body).request_id)
    assert done_of(cold).cached_tokens == 0 and (done_of(warm).cached_tokens or 0) > 0
    assert text_of(warm) == text_of(cold)
