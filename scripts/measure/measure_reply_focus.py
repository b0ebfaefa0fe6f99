#!/usr/bin/env python3
"""Does the question's share of Expected Attention's statistics (`question_weight`) hurt a long reply?

A chat reply's compressions are steered by the user's message (the focus window) and by the reply's
own recent queries (the statistics window); `question_weight` splits the weight between the two.
Here real text is the reply: each window of the text set is read after a user message asking for it
(rendered with the model's chat template), streamed through the budget, and its second half scored
(teacher-forced NLL) under each weight. Paired bootstrap over the windows for the difference.

    .venv/bin/python scripts/measure/measure_reply_focus.py --model smollm2-135m --weights 0.5,1.0 \\
        --budgets 0.25,0.125 --tokens 2048 --windows 8 --texts reporting --out rows.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ea_local.bench.options import BenchOptions  # ea_local first: libllama before numpy
from ea_local.bench.quality import perplexity
from ea_local.bench.stats import delta_ppl_interval, ppl_interval
from ea_local.bench.suites.common import session_cfg
from ea_local.bench.suites.quality import ppl_windows
from ea_local.engine.runtime import ContextConfig, Runtime
from ea_local.model.chat_template import resolve_template
from ea_local.model.embedded import resolve_model
from ea_local.model.info import read_model_info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--weights", default="0.5,1.0")
    ap.add_argument("--budgets", default="0.25,0.125", help="shares of message + reply")
    ap.add_argument("--tokens", type=int, default=2048, help="reply tokens per window (second half scored)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--texts", choices=["tuning", "reporting"], default="reporting")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--table", type=Path, default=None, help="print the table of saved rows")
    a = ap.parse_args()
    if a.table:
        print(table(json.loads(a.table.read_text())))
        return
    if a.out is None:
        ap.error("--out is required to measure")
    model = str(resolve_model(a.model))
    o = BenchOptions(model=model, out=a.out.parent, suites=["perplexity"], policies=[], budgets=[],
                     ppl_tokens=a.tokens, ppl_docs=a.windows, texts=a.texts)
    windows = ppl_windows(o)
    rt = Runtime(model, ContextConfig(n_ctx=64, n_gpu_layers=0))
    tmpl, _ = resolve_template(read_model_info(model), rt)
    has_bos = rt.add_bos()
    prompts = [rt.prompt_tokens(tmpl.render([{"role": "user", "content": f"Write out the text of {doc}."}]))
               for doc, _ in windows]
    rt.close()
    rows = []
    for i, ((doc, toks), msg) in enumerate(zip(windows, prompts)):
        reply = toks[1:] if has_bos else toks  # the message carries BOS
        for frac in [float(x) for x in a.budgets.split(",")]:
            cells = round(frac * (len(msg) + len(reply)))
            cfg = session_cfg(o, cells)  # the bench's recent window and step for this budget
            for w in [float(x) for x in a.weights.split(",")]:
                r = perplexity(model, "expected-attention", cells, len(reply) - 1, len(reply) // 2,
                               chunk=min(256, max(32, cells // 2)), tokens=reply, prefix=msg,
                               question_weight=w, recent=cfg.recent, step=cfg.step,
                               n_threads=a.threads)
                rows.append({"window": i, "doc": doc, "budget": frac, "cells": cells, "question_weight": w,
                             "nll_sum": r.nll * sum(r.chunk_n), "n": sum(r.chunk_n), "ppl": r.ppl})
                print(json.dumps(rows[-1]), flush=True)
                a.out.write_text(json.dumps(rows, indent=1))
    print(table(rows))


def table(rows: list[dict]) -> str:
    weights = sorted({r["question_weight"] for r in rows})
    out = ["| budget | question_weight | perplexity [95% bootstrap] | Δ vs the first weight [95%, paired] |",
           "| --- | --- | --- | --- |"]
    for b in sorted({r["budget"] for r in rows}, reverse=True):
        base = {r["window"]: r for r in rows if r["budget"] == b and r["question_weight"] == weights[0]}
        for w in weights:
            sel = [r for r in rows if r["budget"] == b and r["question_weight"] == w and r["window"] in base]
            ci = ppl_interval([r["nll_sum"] for r in sel], [r["n"] for r in sel])
            d, lo, hi = delta_ppl_interval([r["nll_sum"] for r in sel], [base[r["window"]]["nll_sum"] for r in sel],
                                           [r["n"] for r in sel])
            out.append(f"| {100 * b:g}% | {w} | {ci.ppl:.3f} [{ci.lo:.3f}–{ci.hi:.3f}] | {d:+.3f} [{lo:+.3f}, {hi:+.3f}] |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
