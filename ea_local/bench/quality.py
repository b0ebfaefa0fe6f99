"""Quality measurements under a budget: pass-key retrieval and perplexity of real text.

Both go through the real engine (chunked prefill with compression after each chunk, as
kvpress compresses while prefilling), so what is measured is what users run.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field

import numpy as np

from .data import real_text  # GPL-3 + GPL-2, Debian base-files
from .data import passkey_prompt
from ..engine.session import Session, SessionConfig


@dataclass
class PasskeyResult:
    policy: str
    budget: int
    length: int
    depth: float
    found: bool
    answer: str
    needle_kept: float
    query_aware: bool = False
    prose: bool = False


def passkey(model: str, policy: str, budget: int, length: int, depth: float, seed: int,
            one_shot: bool = False, query_aware: bool = False, prose: bool = False, **cfg) -> PasskeyResult:
    """one_shot: kvpress' main protocol — prefill the whole context, compress once to `budget`
    (statistics: the last prefill chunk's queries), then ask. Otherwise memory stays bounded:
    compression after every chunk. query_aware: the question is known before the context is
    compressed (Session.set_question); otherwise it is asked after. prose: the needle is hidden in
    real text (GPL-3 + GPL-2) instead of the repetitive filler."""
    room = length + 1024 if one_shot else budget
    s = Session(model, SessionConfig(budget=room, policy=policy, seed=seed, **cfg))
    key = random.Random(seed * 1000 + int(depth * 100)).randint(10000, 99999)
    hay = s.rt.tokenize(real_text(), add_bos=False, special=False) if prose else None
    ctx, question, span = passkey_prompt(s.rt, length, depth, key, haystack=hay)
    if query_aware:
        s.set_question(question)
    s.prefill(ctx)
    if one_shot:
        s.set_one_shot_budget(budget)
        s.compress(budget, phase="prefill")
    kept = sum(1 for p in range(*span) if p in s.live) / (span[1] - span[0])
    answer = "".join(s.generate(question, max_tokens=8)).strip()
    s.close()
    return PasskeyResult(policy, budget, len(ctx), depth, str(key) in answer, answer, kept, query_aware, prose)


@dataclass
class PplResult:
    policy: str
    budget: int
    n_tokens: int
    eval_from: int
    nll: float  # mean negative log-likelihood of tokens [eval_from, n_tokens)
    chunk_nll: list[float] = field(default_factory=list)  # summed NLL of the scored tokens of each chunk
    chunk_n: list[int] = field(default_factory=list)  # scored tokens of each chunk (bootstrap units)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


def perplexity(model: str, policy: str, budget: int, n_tokens: int, eval_from: int, chunk: int = 256,
               text: str | None = None, tokens: list[int] | None = None, prefix: list[int] | None = None,
               **cfg) -> PplResult:
    """Teacher-forced NLL of real text (default: real_text(); or `tokens`, BOS included) streamed
    through the budgeted engine (chunked prefill). prefix: read first as the user's message, so its
    queries are the focus window of every compression, as when the text is a chat reply to it."""
    s = Session(model, SessionConfig(budget=budget, policy=policy, chunk=chunk, **cfg))
    if prefix:
        s.prefill(prefix, turn=True)
    if tokens is None:
        tokens = ([s.rt.bos()] if s.rt.add_bos() else []) + s.rt.tokenize(text if text is not None else real_text())
    toks = list(tokens[:n_tokens + 1])
    if len(toks) <= n_tokens:
        raise ValueError(f"reference text has only {len(toks)} tokens, need {n_tokens + 1}")
    total, count = 0.0, 0
    chunk_nll: list[float] = []
    chunk_n: list[int] = []
    for start in range(0, n_tokens, chunk):
        part = toks[start:min(start + chunk, n_tokens)]  # token n_tokens is only a target
        if start + len(part) <= eval_from:  # nothing scored here: same prefill and compression, no vocab-wide logits
            s.prefill(part)
            continue
        logits = s.prefill_scored(part)  # (len(part), vocab) before compression
        targets = np.array(toks[start + 1:start + 1 + len(part)])
        # NLL = logsumexp(row) - logit[target], the max subtracted in place: no second vocab-sized copy
        # (gemma's 262k vocabulary makes this a third of a scored chunk's time otherwise)
        rows = np.arange(len(targets))
        top = logits.max(-1)
        picked = logits[rows, targets] - top
        logits -= top[:, None]
        np.exp(logits, out=logits)
        nll = np.log(logits.sum(-1)) - picked
        pos = np.arange(start, start + len(targets))
        sel = pos >= eval_from
        total += float(nll[sel].sum())
        count += int(sel.sum())
        chunk_nll.append(float(nll[sel].sum()))
        chunk_n.append(int(sel.sum()))
    s.close()
    return PplResult(policy, budget, n_tokens, eval_from, total / count, chunk_nll, chunk_n)


def as_dict(r) -> dict:
    d = asdict(r)
    if isinstance(r, PplResult):
        d["ppl"] = r.ppl
    return d
