"""llama.cpp's sampler chain, configured from OpenAI-style parameters."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import llama_cpp.llama_cpp as ll
import numpy as np


# llama.cpp's sampling defaults (common/common.h, common_params_sampling): temperature 0.8, top-k 40,
# top-p 0.95, min-p 0.05, repeat penalty 1.0 (off), frequency and presence penalties 0 (off), the
# penalties over the last 64 tokens. `chat` and `summarize`
# sample with them; the engine's own default stays greedy (reproducible tests, the server's choice).
CHAT_TEMPERATURE = 0.8


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 40  # 0: off
    top_p: float = 0.95  # 1: off
    min_p: float = 0.05  # 0: off
    repeat_penalty: float = 1.0  # 1: off; > 1 makes the last repeat_last_n tokens less likely
    repeat_last_n: int = 64
    # OpenAI's penalties on the logits, counted over the last repeat_last_n generated tokens: minus
    # frequency_penalty per occurrence, minus presence_penalty once if the token occurs at all
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int = 0
    ignore_eos: bool = False  # as llama.cpp's --ignore-eos: end-of-generation tokens get -inf
    grammar: str | None = None  # GBNF the output must follow (llama.cpp's grammar sampler), root rule "root"

    def validate(self) -> None:
        """ValueError (one line, naming the option) for values llama.cpp's samplers would misread."""
        checks = (
            (self.temperature >= 0, f"temperature must be 0 (greedy) or more, got {self.temperature:g}"),
            (self.top_k >= 0, f"top-k must be 0 (off) or more, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top-p must be in (0, 1], got {self.top_p:g}"),
            (0 <= self.min_p <= 1, f"min-p must be in [0, 1], got {self.min_p:g}"),
            (self.repeat_penalty > 0, f"repeat-penalty must be positive (1: off), got {self.repeat_penalty:g}"),
            (self.repeat_last_n >= 0, f"repeat-last-n must be 0 or more, got {self.repeat_last_n}"),
        )
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


class Sampler:
    """Owns one llama_sampler chain; `sample()` picks and accepts the next token."""

    def __init__(self, rt, p: SamplingParams):
        self.rt = rt
        sp = ll.llama_sampler_chain_default_params()
        self.chain = ll.llama_sampler_chain_init(sp)
        add = lambda s: ll.llama_sampler_chain_add(self.chain, s)  # noqa: E731
        if p.grammar is not None:  # first, as llama.cpp's common sampler applies it: the rest pick among what it allows
            add(grammar_sampler(rt, p.grammar))
        if p.ignore_eos:
            eog = [t for t in range(rt.n_vocab) if rt.is_eog(t)]
            bias = (ll.llama_logit_bias * len(eog))(*[ll.llama_logit_bias(t, float("-inf")) for t in eog])
            add(ll.llama_sampler_init_logit_bias(rt.n_vocab, len(eog), bias))
        if p.repeat_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
            # this llama.cpp's penalties sampler takes n_vocab first (llama.h of the vendored version)
            add(ll.llama_sampler_init_penalties(rt.n_vocab, p.repeat_last_n, p.repeat_penalty, p.frequency_penalty,
                                                p.presence_penalty))
        if p.temperature <= 0:
            add(ll.llama_sampler_init_greedy())
        else:
            if p.top_k > 0:
                add(ll.llama_sampler_init_top_k(p.top_k))
            if p.top_p < 1.0:
                add(ll.llama_sampler_init_top_p(p.top_p, 1))
            if p.min_p > 0:
                add(ll.llama_sampler_init_min_p(p.min_p, 1))
            add(ll.llama_sampler_init_temp(p.temperature))
            add(ll.llama_sampler_init_dist(p.seed & 0xFFFFFFFF))

    def sample(self) -> int:
        return int(ll.llama_sampler_sample(self.chain, self.rt.ctx, -1))

    def close(self) -> None:
        if self.chain:
            ll.llama_sampler_free(self.chain)
            self.chain = None


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (raw logits, before any sampler, as OpenAI
    and llama.cpp's server report it) and the `top` most likely tokens at its position."""

    token: bytes
    logprob: float
    top: list[tuple[bytes, float]]


def token_logprob(logits: np.ndarray, token: int, k: int, token_bytes: Callable[[int], bytes]) -> TokenLogprob:
    x = np.asarray(logits, dtype=np.float32)
    m = float(x.max())
    lse = m + float(np.log(np.exp(x - m).sum(dtype=np.float64)))  # log-softmax's normaliser, one pass
    top = _top_k(x, m, min(k, len(x)))
    return TokenLogprob(token_bytes(token), float(x[token]) - lse, [(token_bytes(int(t)), float(x[t]) - lse) for t in top])


def _top_k(x: np.ndarray, m: float, k: int) -> np.ndarray:
    """Indices of the k largest x, largest first. The likeliest tokens sit far above the rest of a large
    vocabulary, so a partition of the few within 16 of the maximum replaces one of the whole vocabulary
    (2 ms on 262k logits)."""
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    top = np.flatnonzero(x >= m - 16.0)
    if not k <= len(top) <= len(x) // 8:
        top = np.argpartition(x, len(x) - k)[len(x) - k:]
    elif len(top) > k:
        top = top[np.argpartition(-x[top], k - 1)[:k]]
    return top[np.argsort(-x[top], kind="stable")]


def grammar_sampler(rt, grammar: str):
    """llama.cpp's grammar sampler for GBNF text; ValueError if llama.cpp cannot parse it."""
    g = ll.llama_sampler_init_grammar(rt.vocab, grammar.encode("utf-8"), b"root")
    if not g:
        raise ValueError("the grammar does not parse (llama.cpp's GBNF, root rule 'root')")
    return g


def check_grammar(rt, grammar: str) -> None:
    """ValueError unless llama.cpp can parse `grammar` for this model's vocabulary."""
    ll.llama_sampler_free(grammar_sampler(rt, grammar))
