#!/usr/bin/env python3
"""Cost of the KV-cell hooks: decode tok/s of stock llama.cpp vs the patched build with hooks idle
vs with pre-RoPE query capture of every layer on every token (copied to host after each token,
pulled into Python once per round as the engine does); and time to read K/V of all layers.

Ratios are measured side by side in one run: worker processes for the stock and the patched
library alternate, and inside the patched worker the idle and capture modes alternate.

    python scripts/bench/bench_hooks.py MODEL.gguf --stock-lib DIR --patched-lib DIR [--ngl 99] [--history 4096]
    python scripts/bench/bench_hooks.py MODEL.gguf --worker            # one worker, the library in LLAMA_CPP_LIB_PATH

The pure-Python llama_cpp package must be importable in both cases (LLAMA_CPP_LIB_PATH picks the library).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def worker(a: argparse.Namespace) -> dict:
    # imported here, in the worker, with LLAMA_CPP_LIB_PATH set; llama_cpp before numpy
    # (DESIGN.md: the CUDA build crashed at model load with the other order)
    import llama_cpp.llama_cpp as ll
    import numpy as np

    try:
        from ea_local.engine.runtime import ContextConfig, Runtime
        patched = True
    except ImportError as e:
        if e.name == "ea_local":  # ea_local itself must import (installed, or the repository on PYTHONPATH)
            raise
        patched = False
    rng = np.random.default_rng(0)
    hist = [1] + rng.integers(3, 500, size=a.history - 1).tolist()
    out: dict = {"lib": os.environ.get("LLAMA_CPP_LIB_PATH", ""), "patched": patched, "history": a.history}
    if patched:
        rt = Runtime(a.model, ContextConfig(n_ctx=a.history + a.tokens + 256, n_batch=2048, cache_type=a.cache,
                                            n_gpu_layers=a.ngl, flash_attn=True))
        ctx = rt.ctx
        decode = rt.decode
    else:  # stock llama-cpp-python: the same calls, made directly
        mp = ll.llama_model_default_params()
        mp.n_gpu_layers = a.ngl
        model = ll.llama_model_load_from_file(a.model.encode(), mp)
        cp = ll.llama_context_default_params()  # the same context parameters as ea_local's Runtime
        cp.n_ctx, cp.n_batch, cp.n_ubatch = a.history + a.tokens + 256, 2048, 2048
        cp.n_seq_max, cp.kv_unified = 2, True
        cp.n_threads = cp.n_threads_batch = max(1, os.cpu_count() or 2)
        cp.type_k = cp.type_v = {"f16": 1, "q8_0": 8, "q4_0": 2}[a.cache]
        cp.flash_attn_type = 1
        ctx = ll.llama_init_from_model(model, cp)
        batch = ll.llama_batch_init(2048, 0, 1)

        def decode(toks, pos, seq=0):
            for s in range(0, len(toks), 2048):
                ch = toks[s:s + 2048]
                batch.n_tokens = len(ch)
                for i, t in enumerate(ch):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, pos[s + i], 1
                    batch.seq_id[i][0], batch.logits[i] = seq, 0
                batch.logits[len(ch) - 1] = 1
                assert ll.llama_decode(ctx, batch) == 0
    t0 = time.perf_counter()
    decode(hist, list(range(len(hist))))
    ll.llama_synchronize(ctx)
    out["prefill_tok_s"] = len(hist) / (time.perf_counter() - t0)
    mem = ll.llama_get_memory(ctx)
    n_layer = ll.llama_model_n_layer(ll.llama_get_model(ctx))
    if patched:
        from ea_local.model.info import read_model_info

        info = read_model_info(a.model)
        q_row = {il: info.n_head_per_layer[il] * info.head_dims(il)[0] for il in range(info.n_layers)}  # floats per row

    def round_(capture: bool) -> float:
        if patched:
            rt.capture_layers(list(range(n_layer)) if capture else [])
            rt.capture(capture)
            decode([3], [a.history])  # untimed: a mode switch rebuilds the graph and re-plans its memory
            rt.capture_clear()
            ll.llama_memory_seq_rm(mem, 0, a.history, -1)
        t = time.perf_counter()
        for j in range(a.tokens):
            decode([3 + j % 490], [a.history + j])
        if capture:  # as the engine does: queries are captured every token and pulled in a batch
            for il in range(n_layer):
                rt.captured(il, q_row[il])
            rt.capture_clear()
        ll.llama_synchronize(ctx)
        dt = time.perf_counter() - t
        ll.llama_memory_seq_rm(mem, 0, a.history, -1)
        return a.tokens / dt

    modes = ["idle", "capture"] if patched else ["stock"]
    round_(False)  # warm-up
    speeds: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(a.rounds):
        for m in modes:
            speeds[m].append(round_(m == "capture"))
    out["decode_tok_s"] = {m: statistics.median(v) for m, v in speeds.items()}
    out["decode_tok_s_all"] = speeds
    if patched:
        rt.capture_layers([])
        times = []
        for _ in range(2):
            t = time.perf_counter()
            for il in range(n_layer):
                rt.kv_read(il)
            times.append(time.perf_counter() - t)
        out["kv_read_all_layers_s"] = min(times)
        out["kv_read_cells"] = rt.kv_count(0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--stock-lib")
    ap.add_argument("--patched-lib")
    ap.add_argument("--ngl", type=int, default=0)
    ap.add_argument("--history", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--processes", type=int, default=2, help="worker pairs, alternating stock/patched")
    ap.add_argument("--cache", default="f16")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a)), flush=True)
        return
    args = [sys.executable, __file__, a.model, "--worker", "--ngl", str(a.ngl), "--history", str(a.history),
            "--tokens", str(a.tokens), "--rounds", str(a.rounds), "--cache", a.cache]
    res = []
    for _ in range(a.processes):
        for lib in (a.stock_lib, a.patched_lib):
            env = dict(os.environ, LLAMA_CPP_LIB_PATH=lib)
            p = subprocess.run(args, env=env, capture_output=True, text=True)
            if p.returncode != 0:
                sys.exit(f"worker failed ({lib}):\n{p.stderr[-3000:]}")
            r = json.loads(p.stdout.strip().splitlines()[-1])
            print(json.dumps(r), flush=True)
            res.append(r)
    stock = statistics.median(r["decode_tok_s"]["stock"] for r in res if not r["patched"])
    idle = statistics.median(r["decode_tok_s"]["idle"] for r in res if r["patched"])
    cap = statistics.median(r["decode_tok_s"]["capture"] for r in res if r["patched"])
    kv = min(r["kv_read_all_layers_s"] for r in res if r["patched"])
    summary = {"model": a.model, "history": a.history, "ngl": a.ngl, "cache": a.cache,
               "stock_tok_s": stock, "idle_tok_s": idle, "capture_tok_s": cap,
               "idle_vs_stock": idle / stock, "capture_vs_stock": cap / stock,
               "kv_read_all_layers_ms": 1000 * kv, "cells": res[-1]["kv_read_cells"]}
    print("SUMMARY " + json.dumps(summary), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"summary": summary, "workers": res}, f, indent=1)


if __name__ == "__main__":
    main()
