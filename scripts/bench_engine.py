#!/usr/bin/env python3
"""Decode speed with a long history: the full cache vs a budgeted session, in one run.

Full: a context as long as the history, prefilled, then N decoded tokens. Budgeted: the same
history through `Session` (compressing while prefilling), then N tokens through the session's
decode loop, compressions included; the share of decode time spent scoring and evicting is
reported. Prints one JSON summary.

    python scripts/bench_engine.py MODEL --history 32768 --budget 8192 --tokens 1024 [--ngl 99]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ea_local.engine.runtime import ContextConfig, Runtime  # noqa: E402  (libllama before numpy)
from ea_local.engine.session import Session, SessionConfig  # noqa: E402
import numpy as np  # noqa: E402


def tokens(n: int, vocab: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [1] + rng.integers(3, min(vocab, 30000), size=n - 1).tolist()


def full_cache(a, hist: list[int]) -> dict:
    rt = Runtime(a.model, ContextConfig(n_ctx=len(hist) + a.tokens + 256, n_batch=a.chunk,
                                        cache_type=a.cache, n_gpu_layers=a.ngl))
    t = time.perf_counter()
    rt.decode(hist, list(range(len(hist))))
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    for j in range(a.tokens):
        rt.decode([3 + j % 1000], [len(hist) + j])
    dt = time.perf_counter() - t
    rt.close()
    return {"prefill_tok_s": len(hist) / prefill, "decode_tok_s": a.tokens / dt}


def budgeted(a, hist: list[int]) -> dict:
    s = Session(a.model, SessionConfig(budget=a.budget, policy=a.policy, chunk=a.chunk, step=a.step,
                                       cache_type=a.cache, n_gpu_layers=a.ngl))
    t = time.perf_counter()
    s.prefill(hist)
    prefill = time.perf_counter() - t
    n_prefill_ev = len(s.stats.evictions)
    t = time.perf_counter()
    for j in range(a.tokens):
        s._decode([3 + j % 1000])
        if s.n_cells > a.budget:
            s.compress(a.budget - a.step, phase="decode")
    dt = time.perf_counter() - t
    ev = s.stats.evictions[n_prefill_ev:]
    comp = sum(e.score_s + e.evict_s for e in ev)
    pre = s.stats.evictions[:n_prefill_ev]
    s.close()
    return {"prefill_tok_s": len(hist) / prefill, "decode_tok_s": a.tokens / dt, "decode_compressions": len(ev),
            "compression_share_of_decode": comp / dt, "compression_event_s": comp / max(1, len(ev)),
            "prefill_compressions": len(pre), "prefill_compression_s": sum(e.score_s + e.evict_s for e in pre)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--history", type=int, default=32768)
    ap.add_argument("--budget", type=int, default=8192)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--step", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--policy", default="expected-attention")
    ap.add_argument("--cache", default="f16")
    ap.add_argument("--ngl", type=int, default=0)
    ap.add_argument("--json")
    a = ap.parse_args()
    rt = Runtime(a.model, ContextConfig(n_ctx=256, n_gpu_layers=0))
    vocab = rt.n_vocab
    rt.close()
    hist = tokens(a.history, vocab)
    f = full_cache(a, hist)
    b = budgeted(a, hist)
    out = {"model": a.model, "history": a.history, "budget": a.budget, "policy": a.policy, "tokens": a.tokens,
           "step": a.step, "cache": a.cache, "ngl": a.ngl, "full": f, "budgeted": b,
           "decode_speedup": b["decode_tok_s"] / f["decode_tok_s"]}
    print("SUMMARY " + json.dumps(out), flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
