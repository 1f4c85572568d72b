"""Sampling in C (B101): one llama.cpp sampler chain per sequence, built from a request.

The chain runs inside `llama_sampler_sample`, reading the logits where llama.cpp left them:
no logits are copied into Python for a normal request. Order, as llama-server's: end-of-text
suppression (`ignore_eos`), repetition penalties, grammar, top-k, top-p, min-p, temperature,
then a draw seeded per request; greedy at temperature 0. A stage at its neutral value is left
out. Grammar comes before the truncating stages so they never cut every allowed token.

Two kinds of request read the logits from Python, and only those: `top_logprobs`, and a
grammar. A grammar that allows no token at some point (one that can match nothing, or one
that is complete while `ignore_eos` forbids the end) would make llama.cpp's combined
sample-and-accept throw a C++ exception through ctypes, which ends the process; so with a
grammar we apply the chain ourselves, check that the pick is allowed, then accept it.
"""

from __future__ import annotations

import ctypes
import math
import secrets
from typing import Any

import llama_cpp.llama_cpp as C

from rbee_agent.protocol import ErrorCode, InferenceRequest, RbeeError, TokenLogprob
from rbee_agent.worker.native import Model

PENALTY_LAST_N = 64  # tokens the penalties look back over (llama.cpp's default)


NO_TOKEN = -1  # a grammar allowed nothing: the generation ends there


class SamplerChain:
    """Owns a `llama_sampler` chain; free it exactly once."""

    def __init__(self, ptr: Any, penalties: Any | None, model: Model, guarded: bool) -> None:
        self.ptr = ptr
        self._penalties = penalties
        self._model = model
        self._candidates: Any = None
        self.sample = self._sample_guarded if guarded else self._sample

    def _sample(self, ctx: Any, index: int) -> int:
        """Sample the batch's `index`-th output and feed the token back to the chain."""
        return int(C.llama_sampler_sample(self.ptr, ctx, index))

    def _sample_guarded(self, ctx: Any, index: int) -> int:
        """`llama_sampler_sample` in steps, refusing a pick the grammar did not allow."""
        import numpy as np

        n = self._model.n_vocab
        if self._candidates is None:
            self._candidates = np.zeros(n, dtype=[("id", "<i4"), ("logit", "<f4"),
                                                  ("p", "<f4")])
        candidates = self._candidates
        candidates["id"] = np.arange(n, dtype=np.int32)
        candidates["logit"] = np.ctypeslib.as_array(
            ctypes.cast(C.llama_get_logits_ith(ctx, index), ctypes.POINTER(ctypes.c_float)),
            shape=(n,))
        candidates["p"] = 0.0
        array = C.llama_token_data_array(
            data=candidates.ctypes.data_as(C.llama_token_data_p), size=n, selected=-1,
            sorted=False)
        C.llama_sampler_apply(self.ptr, ctypes.byref(array))
        if not 0 <= array.selected < array.size:
            return NO_TOKEN
        chosen = array.data[array.selected]
        if not math.isfinite(chosen.logit):
            return NO_TOKEN
        C.llama_sampler_accept(self.ptr, chosen.id)
        return int(chosen.id)

    def remember_prompt(self, tokens: list[int]) -> None:
        """Let the penalties see the prompt's tail (never the grammar: the prompt is not
        output the grammar has to match)."""
        if self._penalties is not None:
            for token in tokens[-PENALTY_LAST_N:]:
                C.llama_sampler_accept(self._penalties, token)

    def free(self) -> None:
        if self.ptr:
            C.llama_sampler_free(self.ptr)
            self.ptr = None


def _penalties_on(request: InferenceRequest) -> bool:
    return (request.repeat_penalty != 1.0 or request.presence_penalty != 0.0
            or request.frequency_penalty != 0.0)


def grammar_error(grammar: str) -> RbeeError:
    return RbeeError(
        ErrorCode.INVALID_REQUEST,
        "Invalid request: grammar: llama.cpp could not parse the GBNF grammar",
        hint="Check the grammar's syntax (GBNF, with a 'root' rule); the worker log names "
             "the line llama.cpp stopped at.",
        details={"grammar_chars": len(grammar)},
    )


def check_grammar(model: Model, grammar: str) -> None:
    """Parse a grammar once, so a bad one is a 400 before the request takes a slot."""
    ptr = C.llama_sampler_init_grammar(model.vocab, grammar.encode(), b"root")
    if not ptr:
        raise grammar_error(grammar)
    C.llama_sampler_free(ptr)


def build_chain(model: Model, request: InferenceRequest) -> SamplerChain:
    params = C.llama_sampler_chain_default_params()
    params.no_perf = True
    chain = C.llama_sampler_chain_init(params)
    add = C.llama_sampler_chain_add
    if request.ignore_eos and model.eog:
        biases = (C.llama_logit_bias * len(model.eog))(
            *(C.llama_logit_bias(token, -math.inf) for token in sorted(model.eog)))
        add(chain, C.llama_sampler_init_logit_bias(model.n_vocab, len(model.eog), biases))
    penalties = None
    if _penalties_on(request):
        penalties = C.llama_sampler_init_penalties(
            model.n_vocab, PENALTY_LAST_N, request.repeat_penalty,
            request.frequency_penalty, request.presence_penalty)
        add(chain, penalties)
    if request.grammar is not None:
        grammar = C.llama_sampler_init_grammar(model.vocab, request.grammar.encode(), b"root")
        if not grammar:
            C.llama_sampler_free(chain)
            raise grammar_error(request.grammar)
        add(chain, grammar)
    if request.temperature == 0.0:
        add(chain, C.llama_sampler_init_greedy())
    else:
        if request.top_k > 0:
            add(chain, C.llama_sampler_init_top_k(request.top_k))
        if request.top_p < 1.0:
            add(chain, C.llama_sampler_init_top_p(request.top_p, 1))
        if request.min_p > 0.0:
            add(chain, C.llama_sampler_init_min_p(request.min_p, 1))
        add(chain, C.llama_sampler_init_temp(request.temperature))
        seed = request.seed if request.seed is not None else secrets.randbits(32)
        add(chain, C.llama_sampler_init_dist(seed))
    return SamplerChain(chain, penalties, model, guarded=request.grammar is not None)


def logprobs(model: Model, logits: Any, token: int, top: int
             ) -> tuple[float, list[TokenLogprob]]:
    """The sampled token's log-probability and the `top` most likely tokens', from the raw
    logits (softmax at temperature 1, before any sampling stage), read in place.

    numpy is already in the process (llama-cpp-python imports it after libllama); it is
    imported here, lazily, because only requests with `top_logprobs` come this way.
    """
    import numpy as np

    values = np.ctypeslib.as_array(ctypes.cast(logits, ctypes.POINTER(ctypes.c_float)),
                                   shape=(model.n_vocab,)).astype(np.float64)
    peak = float(values.max())
    log_total = peak + math.log(float(np.exp(values - peak).sum()))
    chosen = float(values[token]) - log_total
    if top <= 0:
        return chosen, []
    best = np.argpartition(-values, top - 1)[:top]
    best = best[np.argsort(-values[best], kind="stable")]
    return chosen, [
        TokenLogprob(token=model.piece(int(t)).decode("utf-8", "replace"),
                     logprob=float(values[t]) - log_total)
        for t in best
    ]
