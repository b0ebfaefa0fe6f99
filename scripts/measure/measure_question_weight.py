#!/usr/bin/env python3
"""The question's share of Expected Attention's statistics (`SessionConfig.question_weight`) as a lever,
on the bench's one-shot question-known multi-key needle or pass key (docs/bench-report.md, "question weight").

Runs the bench's own task code (`ea_local.bench.suites.quality`) with every session's question_weight
set to --weight, at the report preset's sizes unless --samples says otherwise; the rows (one per
question, policy and budget) go to --out as JSON.

    .venv/bin/python scripts/measure/measure_question_weight.py --weight 1.0 --texts tuning --budgets 12.5% --samples 5 \
        --out docs/bench-report/question_weight/tuning_w1.0.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ea_local.bench import options  # ea_local first: libllama before numpy
from ea_local.bench.suites import common, quality
from ea_local.model.embedded import resolve_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weight", type=float, required=True)
    ap.add_argument("--task", choices=["multikey", "passkey"], default="multikey")
    ap.add_argument("--model", default=None)
    ap.add_argument("--texts", choices=["tuning", "reporting"], default="tuning")
    ap.add_argument("--budgets", default="12.5%")
    ap.add_argument("--policies", default="expected-attention")
    ap.add_argument("--samples", type=int, default=10, help="documents per haystack (filler and prose)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()

    def weighted_cfg(*args, **kw):
        cfg = common.session_cfg(*args, **kw)
        cfg.question_weight = a.weight
        return cfg

    quality.session_cfg = weighted_cfg  # the sessions one_shot_task opens
    o = options.from_flags(out=str(a.out.parent), suite=a.task, policies=a.policies, budgets=a.budgets,
                           modes="question", texts=a.texts, cache_type="f16", threads=a.threads, n_gpu_layers=None,
                           seed=0, rpc=(), command="", preset="report", haystack="filler,prose", samples=a.samples)
    o.model = str(resolve_model(a.model))
    tick = lambda _: None  # noqa: E731
    rows = quality.passkey(o, tick) if a.task == "passkey" else quality.one_shot_task(o, "multikey", tick)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps([{**r, "question_weight": a.weight} for r in rows]))
    for pol in ["full", *o.policies]:
        for b in {r["budget"] for r in rows if r["policy"] == pol}:
            sel = [r for r in rows if r["policy"] == pol and r["budget"] == b]
            print(f"weight {a.weight} {pol} {b}: {sum(r['found'] for r in sel)}/{len(sel)}")


if __name__ == "__main__":
    main()
