#!/usr/bin/env python3
"""Prefill and decode speed of one llama.cpp build on the default model: one JSON line.

Compares builds of the same wheel with different CPU flags: unpack each wheel's llama_cpp/lib/ and
point --lib (LLAMA_CPP_LIB_PATH, which llama-cpp-python honours) at it, then alternate runs:

    python scripts/bench/bench_cpu_build.py --lib /tmp/native/llama_cpp/lib --threads 2
    python scripts/bench/bench_cpu_build.py --lib /tmp/auto/llama_cpp/lib --threads 2

Prefill: one batch of --prefill tokens of real-ish text; decode: --decode tokens one at a time (greedy),
after it. Timed inside the process, after the model is loaded and one warm-up batch has run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", help="directory holding the libllama to load (default: the installed one)")
    ap.add_argument("--model", help="GGUF file or short name (default: the embedded model)")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.lib:
        os.environ["LLAMA_CPP_LIB_PATH"] = a.lib  # read when llama_cpp is first imported, just below
    from ea_local import build_info
    from ea_local.bench.data import FILLER
    from ea_local.engine.runtime import ContextConfig, Runtime
    from ea_local.model.embedded import resolve_model

    import numpy as np

    rt = Runtime(str(resolve_model(a.model)), ContextConfig(n_ctx=a.prefill + a.decode + 64, n_batch=a.prefill,
                                                              n_threads=a.threads))
    text = "The quick brown fox reads a long report about the weather. " + FILLER * (a.prefill // 8)
    toks = ([rt.bos()] if rt.add_bos() else []) + rt.tokenize(text)
    toks = toks[:a.prefill]
    rt.decode(toks[:32], list(range(32)))  # warm-up: first-use allocations and weight repacking
    rt.clear()
    t0 = time.perf_counter()
    rt.decode(toks, list(range(len(toks))))
    t_prefill = time.perf_counter() - t0
    pos = len(toks)
    t0 = time.perf_counter()
    for _ in range(a.decode):
        tok = int(np.argmax(rt.logits()))
        rt.decode([tok], [pos])
        pos += 1
    t_decode = time.perf_counter() - t0
    feats = build_info.read_build_info().cpu_features
    rt.close()
    print(json.dumps({"library": build_info.read_build_info().library, "threads": a.threads,
                      "prefill_tokens": len(toks), "prefill_tps": round(len(toks) / t_prefill, 2),
                      "decode_tokens": a.decode, "decode_tps": round(a.decode / t_decode, 2),
                      "cpu_features": " ".join(k for k in feats)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
