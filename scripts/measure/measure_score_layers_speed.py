#!/usr/bin/env python3
"""What scoring more layers costs: prefill and decode speed of an Expected Attention session with
each `max_score_layers` setting, side by side in one process, runs interleaved (A B A B ...) so that
a busy machine slows both alike. Each run: the bench's speed profile (real text read up to the
history, then teacher-forced decoding through the engine's loop, compressions included).

    .venv/bin/python scripts/measure/measure_score_layers_speed.py --model smollm2-135m --layers 8,15 \
        --budgets 1024,512 --history 4096 --tokens 512 --repeats 2 --threads 1

Prints a markdown table: median tok/s per setting, the ratio to the first setting, mean compression
event during decoding.
"""
from __future__ import annotations

import argparse
import statistics

from ea_local.bench.options import BenchOptions, Budget  # ea_local first: libllama before numpy
from ea_local.bench.suites.speed import profile
from ea_local.model.embedded import resolve_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", default="8,15")
    ap.add_argument("--budgets", default="1024,512")
    ap.add_argument("--history", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    layers = [int(x) for x in a.layers.split(",")]
    budgets = [int(x) for x in a.budgets.split(",")]
    o = BenchOptions(model=str(resolve_model(a.model)), out="", suites=["speed"], policies=["expected-attention"],
                     budgets=[Budget(str(b), cells=b) for b in budgets], histories=[a.history],
                     decode_tokens=a.tokens, threads=a.threads)
    quiet = lambda _: None  # noqa: E731
    runs: dict[tuple[int, int], list[dict]] = {}
    for rep in range(a.repeats):
        for b in budgets:
            for n in layers:  # interleaved: each repeat measures every setting once
                p = profile(o, "expected-attention", b, quiet, score_layers=n)[0]
                runs.setdefault((b, n), []).append(p)
                print(f"repeat {rep} budget {b} layers {n}: prefill {p['prefill_tok_s']:.1f} tok/s, "
                      f"decode {p['decode_tok_s']:.1f} tok/s", flush=True)
    med = lambda ps, k: statistics.median(q[k] for q in ps)  # noqa: E731
    print(f"\n{a.model}, history {a.history}, {a.tokens} decoded tokens, {a.repeats} runs each (median)\n")
    print("| budget | scored layers | prefill tok/s | ratio | decode tok/s | ratio | decode compression (mean s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for b in budgets:
        ref = runs[(b, layers[0])]
        for n in layers:
            ps = runs[(b, n)]
            ev = [q["decode_compressions"]["mean_s"] for q in ps if q["decode_compressions"]["mean_s"] is not None]
            print(f"| {b} | {n} | {med(ps, 'prefill_tok_s'):.1f} | {med(ps, 'prefill_tok_s') / med(ref, 'prefill_tok_s'):.2f} "
                  f"| {med(ps, 'decode_tok_s'):.1f} | {med(ps, 'decode_tok_s') / med(ref, 'decode_tok_s'):.2f} "
                  f"| {statistics.median(ev) if ev else float('nan'):.3f} |")


if __name__ == "__main__":
    main()
