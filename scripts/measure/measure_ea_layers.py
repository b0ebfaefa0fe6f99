#!/usr/bin/env python3
"""Which layers Expected Attention scores and how their rankings become one set of cells, on an
all-layer model (docs/ea-layers.md).

    .venv/bin/python scripts/measure/measure_ea_layers.py --model smollm2-135m --seed 1 \
        --depths 0.05,0.15,0.25,0.35,0.45,0.55,0.65,0.75,0.85,0.95 --out docs/ea-layers/tune.jsonl

The question-agnostic one-shot pass key of `ea-local bench --suite passkey --modes agnostic`
(filler, the context prefilled in full, its last chunk's queries as the statistics, compressed once
to the budget, then asked): one prefill per depth captures every layer's queries, and every setting
and budget is a restored snapshot of it. "ea N agg" scores N evenly spaced layers (the engine's rule
for `max_score_layers`) and combines them with `aggregate`; the baselines score the 8 layers the
engine's default reads, as the bench does. One JSON line per trial, appended to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # BLAS threads spinning on a busy 2-core machine made scoring 3.5x slower

from ea_local.engine.snapshot import checkpoint, rewind  # noqa: E402  (ea_local first: libllama before numpy)
from ea_local.bench.suites.common import ask  # noqa: E402
from ea_local.bench.data import answered, passkey_prompt  # noqa: E402
from ea_local.bench.suites.quality import _prose_tokens  # noqa: E402
from ea_local.bench.stats import wilson  # noqa: E402
from ea_local.engine.session import Session, SessionConfig, scored_layers as spaced  # noqa: E402
from ea_local.engine.windows import QueryWindow  # noqa: E402
from ea_local.model.embedded import resolve_model  # noqa: E402
import numpy as np  # noqa: E402
from rows import jsonl_emitter  # noqa: E402  (scripts/measure/rows.py)


def settings(glob: list[int], only: set[str]) -> dict[str, tuple[str, dict]]:
    """name -> (policy, options); an EA option "stats": N keeps only the window's last N queries."""
    l8, l15 = spaced(glob, 8), spaced(glob, 15)
    out: dict[str, tuple[str, dict]] = {}
    for n, ls in ((8, l8), (len(glob), glob)):
        for agg in ("union", "mean", "share", "max"):
            out[f"ea {n} {agg}"] = ("expected-attention", {"layers": ls, "aggregate": agg})
    out["ea 15 union"] = ("expected-attention", {"layers": l15, "aggregate": "union"})
    for k in (3, 5):  # max-pooled over k neighbouring cells: a key's digits kept as one span
        out[f"ea {len(glob)} union pool {k}"] = ("expected-attention", {"layers": glob, "kernel_size": k})
    out[f"ea {len(glob)} union no newest"] = ("expected-attention", {"layers": glob, "newest_query": False})
    # the all-layer default (15 layers, pooled over 5 cells) and its neighbours
    for n, ls in ((8, l8), (15, l15), (len(glob), glob)):
        out[f"ea {n} union pool 5"] = ("expected-attention", {"layers": ls, "kernel_size": 5})
    for agg in ("mean", "share"):
        out[f"ea 15 {agg} pool 5"] = ("expected-attention", {"layers": l15, "aggregate": agg, "kernel_size": 5})
    for k in (7, 9, 11):
        out[f"ea 15 union pool {k}"] = ("expected-attention", {"layers": l15, "kernel_size": k})
    out["ea 15 union pool 5 stats all"] = ("expected-attention", {"layers": l15, "kernel_size": 5, "stats": "all"})
    for nf in (64, 2048):
        out[f"ea 15 union pool 5 future {nf}"] = ("expected-attention", {"layers": l15, "kernel_size": 5,
                                                                          "n_future_positions": nf})
    out["ea 8 union sinks in softmax"] = ("expected-attention", {"layers": l8, "sinks_in_softmax": True})
    for n, ls in ((8, l8), (15, l15), (len(glob), glob)):
        out[f"ea {n} union stats 128"] = ("expected-attention", {"layers": ls, "stats": 128})
        # kvpress' statistics: every query of the context but the sinks', not the last chunk's
        out[f"ea {n} union stats all"] = ("expected-attention", {"layers": ls, "stats": "all"})
        out[f"ea {n} union eps 0.02"] = ("expected-attention", {"layers": ls, "epsilon": 0.02})  # kvpress' default
    for nf in (1, 16, 64):  # RoPE averaged over fewer coming positions (kvpress: 512, the default)
        out[f"ea 8 union future {nf}"] = ("expected-attention", {"layers": l8, "n_future_positions": nf})
    for n, ls in ((8, l8), (15, l15), (len(glob), glob)):
        for pol in ("tova", "snapkv"):
            out[f"{pol} {n}"] = (pol, {"layers": ls})
    out["knorm"] = ("knorm", {"layers": l8})
    out["streaming-llm"] = ("streaming-llm", {})
    return {k: v for k, v in out.items() if not only or k in only}


def load(paths: list[Path]) -> list[dict]:
    """The trials of every depth that ran to its end (a run stopped mid-depth leaves a partial one)."""
    rows = [json.loads(line) for p in paths for line in p.read_text().splitlines() if line.strip()]
    count: dict[tuple, int] = {}
    for r in rows:
        count[(r["depth"], r["seed"])] = count.get((r["depth"], r["seed"]), 0) + 1
    full = max(count.values(), default=0)
    return [r for r in rows if count[(r["depth"], r["seed"])] == full]


def table(paths: list[Path]) -> str:
    """Markdown: found k/n with its Wilson interval and the mean share of needle tokens kept, per
    setting and budget, over the trials in `paths`."""
    rows = load(paths)
    fracs = sorted({r["fraction"] for r in rows if "fraction" in r}, reverse=True)
    names = list(dict.fromkeys(r["setting"] for r in rows))
    head = "| setting | " + " | ".join(f"found @ {f:.1%} (95% CI) | needle kept" for f in fracs) + " |"
    out = [head, "|" + " --- |" * (1 + 2 * len(fracs))]
    for name in names:
        cells = []
        for f in fracs if name != "full" else fracs[:1]:
            sel = [r for r in rows if r["setting"] == name and r.get("fraction", f) == f]
            k, n = sum(r["found"] for r in sel), len(sel)
            lo, hi = wilson(k, n)
            kept = [r["needle_kept"] for r in sel if "needle_kept" in r]
            if not n:
                cells += ["–", "–"]
                continue
            cells += [f"{k}/{n} ({lo:.0%}-{hi:.0%})", f"{np.mean(kept):.0%}" if kept else "100%"]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


# two-sided 95% Student t quantiles t_{0.975, df}, df = 1..30 (standard table)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def paired(paths: list[Path], reference: str = "ea 8 union") -> str:
    """Markdown: per setting and budget, the mean difference to `reference` in needle tokens kept and
    in pass keys found, over the same trials (depth, seed), with a 95% t interval of the mean."""
    rows = load(paths)
    key = {(r["setting"], r["fraction"], r["depth"], r["seed"]): r for r in rows if "fraction" in r}
    fracs = sorted({k[1] for k in key}, reverse=True)
    out = ["| setting | budget | n | needle kept − reference (95% CI) | found − reference (95% CI) |",
           "| --- | --- | --- | --- | --- |"]
    for name in dict.fromkeys(k[0] for k in key):
        if name == reference:
            continue
        for f in fracs:
            pairs = [(r, key[(reference, f, d, sd)]) for (nm, ff, d, sd), r in key.items()
                     if nm == name and ff == f and (reference, f, d, sd) in key]
            if len(pairs) < 2:
                continue
            cells = []
            for field in ("needle_kept", "found"):
                diff = np.array([float(a[field]) - float(b[field]) for a, b in pairs])
                half = _T975[min(len(diff), 31) - 2] * diff.std(ddof=1) / np.sqrt(len(diff))
                cells.append(f"{diff.mean():+.2f} ({diff.mean() - half:+.2f} to {diff.mean() + half:+.2f})")
            out.append(f"| {name} | {f:.1%} | {len(pairs)} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", nargs="+", type=Path, help="print the markdown table of these result files and exit")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--fracs", default="0.25,0.125")
    ap.add_argument("--depths", default="0.05,0.15,0.25,0.35,0.45,0.55,0.65,0.75,0.85,0.95")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--haystack", choices=["filler", "prose"], default="filler")
    ap.add_argument("--texts", choices=["tuning", "reporting"], default="tuning",
                    help="real-text set of a prose haystack (settings are chosen on tuning)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", default="", help="comma list of setting names (default: all)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.table:
        print(table(a.table))
        print()
        print(paired(a.table))
        return
    if a.out is None:
        ap.error("--out is required to measure")
    model = str(resolve_model(a.model))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    emit = jsonl_emitter(a.out)

    s = Session(model, SessionConfig(budget=a.length + 256, chunk=512, n_threads=a.threads, seed=a.seed,
                                     max_score_layers=10_000))
    todo = settings(list(s.layers), {x.strip() for x in a.only.split(",") if x.strip()})
    keep_every = any(o.get("stats") == "all" for _, o in todo.values())
    for d in [float(x) for x in a.depths.split(",")]:
        key = random.Random(a.seed * 1000 + int(d * 100) + a.length).randint(10000, 99999)
        hay = _prose_tokens(s.rt, a.texts, a.seed, a.length) if a.haystack == "prose" else None
        ctx, question, span = passkey_prompt(s.rt, a.length, d, key, haystack=hay)
        s.reset()
        s.set_policy("expected-attention")
        split = max(0, len(ctx) - s.cfg.chunk)  # as the bench: the last chunk's queries are the statistics
        blocks = [ctx[i:min(i + s.cfg.chunk, split)] for i in range(0, split, s.cfg.chunk)] + [ctx[split:]]
        every = QueryWindow()  # every chunk's queries, for "stats all"
        for b in blocks:  # the same chunks s.prefill(ctx[:split]) would feed
            s.prefill(b)
            if keep_every:
                every.push(s.queries.q, s.queries.pos, keep=len(ctx))
        every.keep(every.pos >= s.cfg.n_sink)
        snap = checkpoint(s)
        rewind(s, snap)
        emit({"setting": "full", "depth": d, "seed": a.seed, "length": len(ctx), "haystack": a.haystack,
              "found": answered(str(key), ask(s, question, 8))})
        for frac in [float(x) for x in a.fracs.split(",")]:
            cells = int(len(ctx) * frac)
            for name, (pol, opts) in todo.items():
                rewind(s, snap)
                opts = dict(opts)
                n_stats = opts.pop("stats", None)
                if pol == "expected-attention":  # unpooled (kvpress' form): pooling is a lever of its own
                    opts.setdefault("kernel_size", 1)
                s.set_policy(pol, **opts)
                if n_stats == "all":
                    s.set_statistics(every)
                elif n_stats:  # the lever itself: the last n_stats queries of the last chunk as the statistics
                    s.set_statistics(s.queries.last(n_stats))
                s.set_one_shot_budget(cells, recent=min(64, cells // 8))
                t1 = time.perf_counter()
                s.compress(cells, phase="prefill")
                t_comp = time.perf_counter() - t1
                lost = [p - span[0] for p in range(*span) if p not in s.live]
                kept = 1 - len(lost) / (span[1] - span[0])
                reply = ask(s, question, 8)
                emit({"setting": name, "haystack": a.haystack, "fraction": frac, "cells": cells, "depth": d, "seed": a.seed, "length": len(ctx),
                      "found": answered(str(key), reply), "needle_kept": round(kept, 3), "needle_lost": lost, "answer": reply,
                      "compress_s": round(t_comp, 2)})
    s.close()


if __name__ == "__main__":
    main()
