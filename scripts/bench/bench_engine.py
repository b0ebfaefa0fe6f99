#!/usr/bin/env python3
"""Decode speed with a long history: the full cache vs a budgeted session, in one run.

A thin wrapper over the bench's speed suite (`ea_local/bench/suites/speed.py`, which
`ea-local bench --suite speed` runs for every policy and budget) with the knobs the GPU check
needs: one history, a step and a chunk of its own, GPU layers. Prints one JSON summary.

    python scripts/bench/bench_engine.py MODEL --history 32768 --budget 8192 --tokens 1024 [--ngl 99]
"""
from __future__ import annotations

import argparse
import json

from ea_local.bench.options import BenchOptions, Budget
from ea_local.bench.suites.speed import profile


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
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json")
    a = ap.parse_args()
    o = BenchOptions(model=a.model, out="", suites=["speed"], policies=[a.policy], budgets=[Budget(str(a.budget), cells=a.budget)],
                     histories=[a.history], decode_tokens=a.tokens, cache_type=a.cache, n_gpu_layers=a.ngl,
                     threads=a.threads)
    quiet = lambda _: None  # noqa: E731
    f = profile(o, "streaming-llm", a.history + a.tokens + 2 * a.chunk, quiet, chunk=a.chunk)[0]
    b = profile(o, a.policy, a.budget, quiet, step=a.step, chunk=a.chunk)[0]
    dec, pre = b["decode_compressions"], b["prefill_compressions"]
    out = {"model": a.model, "history": a.history, "budget": a.budget, "policy": a.policy, "tokens": a.tokens,
           "step": a.step, "cache": a.cache, "ngl": a.ngl,
           "full": {"prefill_tok_s": f["prefill_tok_s"], "decode_tok_s": f["decode_tok_s"]},
           "budgeted": {"prefill_tok_s": b["prefill_tok_s"], "decode_tok_s": b["decode_tok_s"],
                        "decode_compressions": dec["n"], "compression_share_of_decode": dec["total_s"] / b["decode_s"],
                        "compression_event_s": dec["total_s"] / max(1, dec["n"]),
                        "prefill_compressions": pre["n"], "prefill_compression_s": pre["total_s"]},
           "decode_speedup": b["decode_tok_s"] / f["decode_tok_s"]}
    print("SUMMARY " + json.dumps(out), flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
