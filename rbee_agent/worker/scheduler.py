"""The engine thread: every running request advances in one `llama_decode` per step.

One thread owns the llama.cpp context. Each step it builds one batch: the next token of
every sequence that is generating, then prompt chunks of sequences that are still reading
their prompt, at most `chunk` prompt tokens in all. A long prompt therefore delays the running
streams by one chunk per step, never by its whole length (B103). After the decode, each
generating sequence samples its next token with its own sampler chain, in C (B101).

Prompts are read in chunks at fixed positions (0, C, 2C, …). A finished sequence keeps KV
cells in its slot, and a new request whose prompt starts with the same tokens (the next turn
of a chat) takes that slot and skips them (B102). What is kept, so that caching never
changes a seeded request's text (B47; docs/architecture.md, "Determinism"):

- `Reuse.ANY` (the CPU backend, whose kernels compute each token of a batch the same way
  whatever else is in it): every cell — the prompt and the reply (a cancelled request keeps
  its prompt) — and any common prefix is reused;
- `Reuse.CHUNKS` (GPU backends, whose kernels depend on the batch's shape): only the whole
  prompt chunks, so a cached prompt computes its rest in exactly the pieces a fresh one
  would; the other cells are freed at once.

The asyncio side talks to this thread through a thread-safe inbox (jobs in) and a sink
(events out, one call per step, which the service hands to its loop). Cancellation is a flag
read every step.
"""

from __future__ import annotations

import codecs
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import StrEnum

from rbee_agent.protocol import (
    DoneEvent,
    ErrorCode,
    FinishReason,
    InferenceRequest,
    RbeeError,
    TokenEvent,
    TokenLogprob,
)
from rbee_agent.worker.native import Batch, Context, Model
from rbee_agent.worker.sampling import NO_TOKEN, SamplerChain, build_chain, logprobs
from rbee_agent.worker.stops import StopHoldback

log = logging.getLogger("rbee.worker")

StreamItem = TokenEvent | DoneEvent | RbeeError


@dataclass(eq=False)
class Job:
    """One admitted request. Made on the event loop; run on the engine thread.

    `cancelled` is written by the loop and read by the engine every step; `produced` is
    written by the engine only. A job ends with exactly one DoneEvent or RbeeError.
    """

    request_id: str
    request: InferenceRequest
    prompt: list[int]
    started: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    produced: int = 0


Sink = Callable[[list[tuple[Job, StreamItem]]], None]


class _Call:
    """A question for the engine thread, answered between two steps."""

    def __init__(self, fn: Callable[[], list[int]]) -> None:
        self.fn = fn
        self.future: Future[list[int]] = Future()

    def run(self) -> None:
        try:
            self.future.set_result(self.fn())
        except Exception as exc:
            self.future.set_exception(exc)


class Reuse(StrEnum):
    """Which cached cells a new request may reuse (see the module docstring)."""

    ANY = "any"
    CHUNKS = "chunks"


@dataclass(eq=False)
class _Slot:
    seq: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV cells are kept
    last_used: int = -1
    busy: bool = False


class _Running:
    """A job in a slot: where it is in its prompt, what it has sampled, its text state."""

    def __init__(self, job: Job, slot: _Slot, sampler: SamplerChain, reused: int) -> None:
        self.job = job
        self.slot = slot
        self.sampler = sampler
        self.reused = reused
        self.n_past = reused  # positions with KV in the cache for this sequence
        self.next_token = -1  # sampled, decoded in the next step
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.holdback = StopHoldback(job.request.stop)
        self.index = 0
        self.ttft_ms: float | None = None


class Scheduler:
    def __init__(self, model: Model, ctx: Context, chunk: int, sink: Sink,
                 reuse: Reuse = Reuse.CHUNKS) -> None:
        self.model = model
        self.ctx = ctx
        self.chunk = chunk
        self.reuse = reuse
        self._sink = sink
        self._slots = [_Slot(i) for i in range(ctx.n_seq)]
        self._batch = Batch(chunk + ctx.n_seq)
        self._inbox: queue.SimpleQueue[Job | _Call | None] = queue.SimpleQueue()
        self._prefilling: list[_Running] = []  # admission order
        self._decoding: list[_Running] = []
        self._out: list[tuple[Job, StreamItem]] = []
        self._tick = 0
        self._stopping = False
        self.steps = 0
        self._thread = threading.Thread(target=self._run, name="llama-engine", daemon=True)

    # ------------------------------------------------------------------ loop side

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Thread-safe. The caller guarantees a free slot (at most n_seq jobs unfinished)."""
        self._inbox.put(job)

    def kv_cells(self) -> Future[list[int]]:
        """Cells each slot's sequence holds in the KV cache, read on the engine thread
        between steps (llama.cpp's cache must not be read while it decodes)."""
        call = _Call(lambda: [self.ctx.cells(slot.seq) for slot in self._slots])
        self._inbox.put(call)
        return call.future

    def stop(self, timeout: float | None = None) -> None:
        """Cancel whatever still runs and end the thread (blocking; not on the loop)."""
        self._inbox.put(None)
        self._thread.join(timeout)
        self._batch.close()

    # ------------------------------------------------------------------ engine thread

    @property
    def _active(self) -> bool:
        return bool(self._prefilling or self._decoding)

    def _run(self) -> None:
        while True:
            try:
                if not self._take_new(block=not self._active):
                    break
                self._drop_cancelled()
                if self._active:
                    self._step()
            except Exception as exc:  # never let the engine die with requests waiting on it
                log.exception("engine step failed")
                self._fail_all(f"The engine failed: {type(exc).__name__}: {exc}")
            self._flush()
        for running in [*self._prefilling, *self._decoding]:
            self._finish(running, "cancelled")
        self._flush()

    def _take_new(self, block: bool) -> bool:
        """Start the jobs that arrived; False once told to stop and nothing runs."""
        while True:
            try:
                item = self._inbox.get(block=block and not self._stopping)
            except queue.Empty:
                return not (self._stopping and not self._active)
            block = False
            if item is None:
                self._stopping = True
                for running in [*self._prefilling, *self._decoding]:
                    running.job.cancelled = True
            elif isinstance(item, _Call):
                item.run()
            else:
                self._start(item)

    def _start(self, job: Job) -> None:
        """Give a job a slot; a job that cannot start fails alone, never the others."""
        free = [s for s in self._slots if not s.busy]
        if not free:  # the service admits at most one job per slot: a bug if we get here
            log.error("request %s arrived with every slot taken", job.request_id)
            self._emit(job, RbeeError(ErrorCode.GENERATION_FAILED,
                                      "The worker had no free slot for this request",
                                      hint="Retry the request."))
            return
        slot, reuse = self._choose_slot(free, job.prompt)
        try:
            sampler = build_chain(self.model, job.request)
        except RbeeError as err:
            self._emit(job, err)
            return
        slot.busy = True
        del slot.cached[reuse:]
        self.ctx.forget(slot.seq, reuse)
        sampler.remember_prompt(job.prompt)
        self._prefilling.append(_Running(job, slot, sampler, reuse))

    def _choose_slot(self, free: list[_Slot], prompt: list[int]) -> tuple[_Slot, int]:
        """The free slot whose kept cells cover most of this prompt; else an empty one; else
        the one unused longest (LRU). Returns it with how many prompt tokens it holds."""
        limit = len(prompt) - 1  # the last prompt token is always computed (its logits)
        best, best_reuse = None, 0
        for slot in free:
            reuse = _common_prefix(slot.cached, prompt, limit, self.chunk)
            if self.reuse is Reuse.CHUNKS:
                reuse -= reuse % self.chunk
            if reuse > best_reuse:
                best, best_reuse = slot, reuse
        if best is not None:
            return best, best_reuse
        # Slots that keep nothing first, lowest id first (running sequences with consecutive
        # ids decode in one pass); else the one whose kept chunks were used longest ago.
        return min(free, key=lambda s: (bool(s.cached), s.last_used if s.cached else s.seq)), 0

    def _drop_cancelled(self) -> None:
        for running in [r for r in (*self._prefilling, *self._decoding) if r.job.cancelled]:
            self._finish(running, "cancelled")

    def _step(self) -> None:
        """One `llama_decode`: a token for every decoding sequence and the next prompt
        pieces, then what it computed is recorded and sampled."""
        pieces = self._prompt_pieces()
        decodes, prefills = self._fill_batch(pieces)
        self.steps += 1
        status = self.ctx.decode(self._batch)
        if status != 0:
            self._fail([r for r, _ in decodes] + [r for r, _, _ in prefills],
                       f"llama_decode returned {status}")
            return
        self._after_decode(decodes, prefills)

    def _prompt_pieces(self) -> list[tuple[_Running, int]]:
        """Prompt pieces first-come first-served, `chunk` prompt tokens in all per step; a
        piece ends at the next multiple of `chunk` (fixed positions, see the docstring)."""
        chunk = self.chunk
        pieces: list[tuple[_Running, int]] = []
        budget = chunk
        for running in self._prefilling:
            end = min(len(running.job.prompt), (running.n_past // chunk + 1) * chunk)
            if pieces and end - running.n_past > budget:
                break
            pieces.append((running, end))
            budget -= end - running.n_past
            if budget <= 0:
                break
        return pieces

    def _fill_batch(self, pieces: list[tuple[_Running, int]]
                    ) -> tuple[list[tuple[_Running, int]], list[tuple[_Running, int, int]]]:
        """Into the batch in sequence-id order: with a KV stream per sequence, llama.cpp
        computes a run of consecutive sequence ids in one pass, and splits the rest. Returns
        the decodes (with their logits index) and the prefills (with their end, and the
        logits index of a prompt's last token, else -1)."""
        batch = self._batch
        batch.clear()
        decodes: list[tuple[_Running, int]] = []
        prefills: list[tuple[_Running, int, int]] = []
        ending = {id(r): end for r, end in pieces}
        for running in sorted([*self._decoding, *(r for r, _ in pieces)],
                              key=lambda r: r.slot.seq):
            stop = ending.get(id(running))
            if stop is None:
                decodes.append((running, batch.add(running.next_token, running.n_past,
                                                   running.slot.seq, True)))
                continue
            last = stop == len(running.job.prompt)
            index = batch.add_run(running.job.prompt[running.n_past:stop], running.n_past,
                                  running.slot.seq, last)
            prefills.append((running, stop, index if last else -1))
        batch.seal()
        return decodes, prefills

    def _after_decode(self, decodes: list[tuple[_Running, int]],
                      prefills: list[tuple[_Running, int, int]]) -> None:
        chunk = self.chunk
        keep_all = self.reuse is Reuse.ANY
        for running, index in decodes:
            running.n_past += 1
            if keep_all:
                running.slot.cached.append(running.next_token)
            self._sample(running, index)
        for running, end, index in prefills:
            if keep_all:
                running.slot.cached.extend(running.job.prompt[running.n_past:end])
            elif end % chunk == 0:  # a whole chunk at a fixed position: worth keeping
                running.slot.cached.extend(running.job.prompt[end - chunk:end])
            running.n_past = end
            if index >= 0:
                self._prefilling.remove(running)
                self._decoding.append(running)
                self._sample(running, index)

    def _sample(self, running: _Running, index: int) -> None:
        job = running.job
        request = job.request
        token = running.sampler.sample(self.ctx.ptr, index)
        if token == NO_TOKEN:
            log.warning("request %s: its grammar allows no further token", job.request_id)
            self._finish(running, "stop")
            return
        if token in self.model.eog and not request.ignore_eos:
            self._finish(running, "stop")
            return
        job.produced += 1
        text, hit_stop = running.holdback.feed(running.decoder.decode(self.model.piece(token)))
        if request.top_logprobs is not None:
            chosen, top = logprobs(self.model, self.ctx.logits(index), token,
                                   request.top_logprobs)
            self._token(running, text, chosen, top)
        elif text:
            self._token(running, text)
        if hit_stop:
            self._finish(running, "stop")
        elif job.produced >= request.max_tokens:
            self._finish(running, "length")
        else:
            running.next_token = token

    def _token(self, running: _Running, text: str, logprob: float | None = None,
               top: list[TokenLogprob] | None = None) -> None:
        if running.ttft_ms is None and text:
            running.ttft_ms = (time.perf_counter() - running.job.started) * 1000
        self._emit(running.job, TokenEvent(token=text, index=running.index, logprob=logprob,
                                           top_logprobs=top))
        running.index += 1

    def _finish(self, running: _Running, reason: FinishReason) -> None:
        """End a job: free its cells beyond the kept chunks, then say so (DoneEvent last:
        the slot is free before the client can see the end)."""
        job = running.job
        if reason != "cancelled":
            tail = running.holdback.flush() + running.decoder.decode(b"", final=True)
            if tail:
                self._token(running, tail)
        else:  # a retry may want the prompt again; nobody wants a reply that was abandoned
            del running.slot.cached[len(job.prompt):]
        self._release(running)
        self._emit(job, DoneEvent(
            total_tokens=job.produced,
            duration_ms=round((time.perf_counter() - job.started) * 1000, 2),
            finish_reason=reason,
            request_id=job.request_id,
            prompt_tokens=len(job.prompt),
            ttft_ms=round(running.ttft_ms, 2) if running.ttft_ms is not None else None,
            cached_tokens=running.reused,
        ))

    def _release(self, running: _Running) -> None:
        slot = running.slot
        self.ctx.forget(slot.seq, len(slot.cached))
        running.sampler.free()
        self._tick += 1
        slot.last_used = self._tick
        slot.busy = False
        if running in self._prefilling:
            self._prefilling.remove(running)
        else:
            self._decoding.remove(running)

    def _fail(self, runs: list[_Running], why: str) -> None:
        log.error("generation failed for %d request(s): %s", len(runs), why)
        for running in runs:
            running.slot.cached.clear()  # the cache may hold half-written cells
            self._release(running)
            self._emit(running.job, RbeeError(
                ErrorCode.GENERATION_FAILED, f"Generation failed: {why}",
                hint="Retry the request; if it keeps failing, see the worker log.",
            ))

    def _fail_all(self, why: str) -> None:
        self._fail([*self._prefilling, *self._decoding], why)

    def _emit(self, job: Job, item: StreamItem) -> None:
        self._out.append((job, item))

    def _flush(self) -> None:
        if self._out:
            out, self._out = self._out, []
            self._sink(out)


def _common_prefix(cached: list[int], prompt: list[int], limit: int, step: int) -> int:
    """How many leading tokens `cached` and `prompt` share, at most `limit`; compared `step`
    tokens at a time (list slices compare in C), then token by token."""
    n = min(len(cached), limit)
    same = 0
    while same + step <= n and cached[same:same + step] == prompt[same:same + step]:
        same += step
    while same < n and cached[same] == prompt[same]:
        same += 1
    return same
