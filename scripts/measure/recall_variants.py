#!/usr/bin/env python3
"""Recall variants on the `/v1/completions` path, in process: each trial is read once as a slot reads a
long completion (`Slot.run`: the question probed, the prompt read with `turn=False`), checkpointed, and
every variant recalls from that checkpoint and answers (8 greedy tokens).

    EA_LOCAL_THREADS=1 .venv/bin/python scripts/measure/recall_variants.py --budget 128 \\
        --texts Apache-2.0,Artistic,MPL-2.0 --out rows.jsonl

Variants: `answers` (the question's words and the probe's 8 greedy answer tokens ask), `words` (the
words only), `cap2x` (answers, twice the recall_max), `fwd4-12` / `fwd2-14` (answers, spans pooled
4 / 2 positions back and 12 / 14 ahead of a cell instead of 8 each way: a fact follows its cue),
`words-fwd4-12` (words, those spans), `words-rawtie` (words; cells tied on their pooled score, a span's
plateau, ranked by their own score, so that a cap that ends inside a span keeps its best cells).
A rewound checkpoint is not bit-identical to the read it copies (llama.cpp lays the cells out anew), so
a trial at the edge can answer otherwise than through the server; the variants share that.
The prompts and keys are serve_passkey.py's (scripts/bench).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ea_local.engine.sampling import SamplingParams  # ea_local first: libllama before numpy's BLAS
from ea_local.engine import session as session_mod
from ea_local.engine.session import Session
from ea_local.engine.snapshot import checkpoint, rewind
from ea_local.bench.data import answered
from ea_local.model.embedded import resolve_model
from ea_local.engine.question import completion_question_text, question_length

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import serve_passkey as sp  # noqa: E402

VARIANTS = {"answers": {}, "words": {"words": True}, "cap2x": {"cap": 2},
            "fwd4-12": {"span": (4, 12)}, "fwd2-14": {"span": (2, 14)},
            "words-fwd4-12": {"words": True, "span": (4, 12)}, "words-rawtie": {"words": True, "rawtie": True}}


def pool_ahead(pos: np.ndarray, scores: np.ndarray, back: int, ahead: int) -> np.ndarray:
    """Cell c scores the max over cells d with c - ahead <= d <= c + back: a high cell lends its score to
    `ahead` cells after it and `back` before it."""
    order = np.argsort(pos, kind="stable")
    p, s = np.asarray(pos)[order], np.asarray(scores, dtype=np.float64)[order]
    lo = np.searchsorted(p, p - ahead, "left")
    hi = np.searchsorted(p, p + back, "right")
    out = np.array([s[a:b].max() for a, b in zip(lo, hi)])
    res = np.empty_like(out)
    res[order] = out
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=1000, help="haystack tokens")
    ap.add_argument("--texts", default="Apache-2.0,Artistic,MPL-2.0", help="licences (bench/corpus.py), comma-separated")
    ap.add_argument("--depths", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,0.95")
    ap.add_argument("--keys", type=int, default=2, help="keys per depth")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policy", default="expected-attention")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", required=True, help="JSON lines, one per trial and variant")
    a = ap.parse_args()
    path = str(resolve_model(a.model))
    srv, cfg = sp.slot_config(path, a.budget, a.policy)
    s = Session(path, cfg)
    count = lambda t: len(s.rt.tokenize(t, add_bos=False, special=False))  # noqa: E731
    pool, cap = session_mod.pool_spans, cfg.recall_max
    with open(a.out, "a") as out:
        for text in a.texts.split(","):
            sents = sp.haystack(s.rt, "prose", a.tokens, text)
            for depth, key in sp.trials(a.seed, [float(x) for x in a.depths.split(",")], a.keys):
                prompt = sp.document(sents, depth, key) + sp.QUESTION
                toks = s.rt.tokenize(prompt, add_bos=True, special=False)
                n_q = question_length(completion_question_text(prompt), len(toks), count, srv.max_question)
                s.reset()
                s.set_question(toks[len(toks) - n_q:] if s.policy.needs_queries else None)  # as Slot.run
                s.prefill(toks, turn=False)
                cp = checkpoint(s)
                for name in a.variants.split(","):
                    v = VARIANTS[name]
                    rewind(s, cp)
                    if v.get("rawtie"):
                        session_mod.pool_spans = lambda p, sc, r: (
                            pool(p, sc, r) + 1e-6 * np.asarray(sc, dtype=np.float64) / (np.abs(sc).max() + 1e-30))
                    if "span" in v:
                        session_mod.pool_spans = lambda p, sc, r, span=v["span"]: pool_ahead(p, sc, *span)
                    s.cfg.recall_max = cfg.budget // 4 * v.get("cap", 1)
                    # recall, not recall_message (which leaves the answer tokens out on all-layer models):
                    # `answers` must ask with them whatever the model
                    n = s.recall(since=s.next_pos - n_q, until=s.next_pos if v.get("words") else None, recent=0)
                    session_mod.pool_spans, s.cfg.recall_max = pool, cap
                    reply = "".join(s.generate([], SamplingParams(temperature=0), max_tokens=8))
                    out.write(json.dumps(dict(variant=name, model=a.model, texts=text, budget=a.budget,
                                              policy=a.policy, depth=depth, key=key, recalled=n, answer=reply,
                                              found=answered(str(key), reply))) + "\n")
                    out.flush()
    s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
