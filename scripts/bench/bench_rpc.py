#!/usr/bin/env python3
"""What the RPC hop costs, on loopback: decode tok/s and K/V read time of the same model run locally
and with its layers on a ggml-rpc-server on 127.0.0.1 (docs/rpc.md).

    nice -n 5 python scripts/bench/bench_rpc.py --history 1024 --tokens 64 --out docs/rpc/loopback.json

Three runs of one process each, in turn (the server is started here and stopped at the end):
  local  every layer on this process's CPU backend (n_gpu_layers 0)
  split  the last --split layers (and output) on the server, the rest local
  remote every layer on the server (n_gpu_layers -1)
The server and the client share this machine's cores, so the compute is the same ggml CPU code on
both sides; the difference is the RPC traffic (graph, activations, tensor reads) through the kernel.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from ea_local import rpc  # ea_local first: it loads libllama before numpy
from ea_local.engine.runtime import ContextConfig, Runtime
from ea_local.model.info import read_model_info
from ea_local.model.embedded import default_model_path
from ea_local.apps.placement import parse

import numpy as np


def run(model: str, a, endpoints: tuple[str, ...], ngl: int | None, layers: list[int]) -> dict:
    cfg = ContextConfig(n_ctx=a.history + a.tokens + 64, n_batch=256, cache_type=a.cache, flash_attn=a.fa,
                        swa_full=False, n_threads=a.threads, n_gpu_layers=ngl, rpc=endpoints)
    t0 = time.perf_counter()
    rt = Runtime(model, cfg)
    load_s = time.perf_counter() - t0
    try:
        place = parse(rt.load_log)
        rng = np.random.default_rng(0)
        hist = [rt.bos()] + rng.integers(100, 20000, size=a.history - 1).tolist()
        t0 = time.perf_counter()
        rt.decode(hist, list(range(len(hist))))
        prefill_s = time.perf_counter() - t0
        pos = len(hist)
        tok = int(np.argmax(rt.logits()))
        t0 = time.perf_counter()
        for i in range(a.tokens):
            rt.decode([tok], [pos + i])
            tok = int(np.argmax(rt.logits()))
        decode_s = time.perf_counter() - t0
        reads = {}
        for il in layers:
            ts = []
            for _ in range(a.reads):
                t0 = time.perf_counter()
                p, k, v = rt.kv_read(il)
                ts.append(time.perf_counter() - t0)
            assert len(p) == len(hist) + a.tokens
            reads[il] = {"device": place.layer_device.get(il, "?"), "median_ms": 1e3 * statistics.median(ts)}
        return {"n_gpu_layers": ngl, "load_s": load_s, "prefill_tok_s": len(hist) / prefill_s,
                "decode_tok_s": a.tokens / decode_s, "kv_read": reads,
                "devices": sorted(set(place.layer_device.values()))}
    finally:
        rt.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF (default: the embedded Gemma 3 270M)")
    ap.add_argument("--history", type=int, default=1024, help="tokens in the cache before decoding")
    ap.add_argument("--tokens", type=int, default=64, help="tokens decoded (timed)")
    ap.add_argument("--reads", type=int, default=5, help="K/V reads per layer (median reported)")
    ap.add_argument("--split", type=int, default=10, help="n_gpu_layers of the split run")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="client threads and server threads")
    ap.add_argument("--cache", default="f16")
    ap.add_argument("--fa", action="store_true", help="flash attention (V stored untransposed: one read per layer)")
    ap.add_argument("--rounds", type=int, default=2, help="local/split/remote rounds, interleaved (median reported)")
    ap.add_argument("--out", type=Path, help="write the figures as JSON")
    a = ap.parse_args()
    model = a.model or str(default_model_path())
    info = read_model_info(model)
    layers = list(info.global_layers)
    res: dict = {"model": Path(model).name, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                 "cpu_count": os.cpu_count()}
    res["load_avg_start"] = os.getloadavg()[0]
    rounds: dict[str, list[dict]] = {"local": [], "split": [], "remote": []}
    # interleaved rounds: on a shared machine the load changes while this runs
    with rpc.LocalServer(threads=a.threads) as srv:
        for _ in range(a.rounds):
            rounds["local"].append(run(model, a, (), 0, layers))
            rounds["split"].append(run(model, a, (srv.endpoint,), a.split, layers))
            rounds["remote"].append(run(model, a, (srv.endpoint,), -1, layers))
    res["load_avg_end"] = os.getloadavg()[0]
    for name, rs in rounds.items():
        r = dict(rs[0])
        r["decode_tok_s"] = statistics.median(x["decode_tok_s"] for x in rs)
        r["prefill_tok_s"] = statistics.median(x["prefill_tok_s"] for x in rs)
        r["kv_read"] = {il: {"device": v["device"],
                             "median_ms": statistics.median(x["kv_read"][il]["median_ms"] for x in rs)}
                        for il, v in rs[0]["kv_read"].items()}
        r["rounds"] = rs
        res[name] = r
    base = res["local"]
    print(f"{res['model']}: {a.history} tokens of history, {a.tokens} decoded, KV {a.cache}, fa={a.fa}, "
          f"{a.threads} threads each side, median of {a.rounds} rounds, load average "
          f"{res['load_avg_start']:.1f} -> {res['load_avg_end']:.1f} on {os.cpu_count()} cores")
    print(f"{'run':<8} {'devices':<14} {'decode tok/s':>12} {'ratio':>6}   K/V read ms per global layer (ratio)")
    for name in ("local", "split", "remote"):
        r = res[name]
        ratio = r["decode_tok_s"] / base["decode_tok_s"]
        reads = ", ".join(f"L{il}@{x['device']} {x['median_ms']:.1f} ({x['median_ms'] / base['kv_read'][il]['median_ms']:.2f}x)"
                          for il, x in r["kv_read"].items())
        print(f"{name:<8} {'+'.join(r['devices']):<14} {r['decode_tok_s']:12.1f} {ratio:6.2f}   {reads}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
