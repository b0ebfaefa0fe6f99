#!/usr/bin/env python3
"""Quality figures on the default model with options the bench does not take (docs/quality.md, docs/query_aware.md):
pass key at 8k compressed to 25% with chunked prefill, perplexity at 50/25/12.5%.

    .venv/bin/python scripts/measure/measure_quality.py --out docs/quality [--policies expected-attention,streaming-llm]
Writes results.json and report.md into --out.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from ea_local.bench.quality import as_dict, passkey, perplexity
from ea_local.model.embedded import default_model_path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("docs/quality"))
    ap.add_argument("--policies", default="expected-attention,streaming-llm")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--ppl-fracs", default="0.5,0.25,0.125")
    ap.add_argument("--skip", default="", help="passkey,ppl,full (full: no full-cache pass-key baseline)")
    ap.add_argument("--recent", type=int, default=64)
    ap.add_argument("--query-aware", action="store_true",
                    help="pass key: the question is known before compression (docs/query_aware.md)")
    ap.add_argument("--prose", action="store_true", help="pass key: hide the needle in real text, not filler")
    ap.add_argument("--question-weight", type=float, default=0.5)
    ap.add_argument("--answer-lookahead", type=int, default=0,
                    help="query-aware: greedy answer tokens probed after the question (their queries join the focus)")
    ap.add_argument("--seed", type=int, default=0, help="pass key: picks the keys (the depths pick the positions)")
    ap.add_argument("--budget-frac", type=float, default=0.25)
    ap.add_argument("--ea-kernel", type=int, default=1, help="expected-attention: max-pool scores over K cells")
    ap.add_argument("--one-shot", action="store_true",
                    help="pass key: prefill everything, compress once (kvpress' main protocol) instead of per chunk")
    a = ap.parse_args()
    model = str(default_model_path())
    pols = a.policies.split(",")

    def opts(pol: str) -> dict:
        return {"kernel_size": a.ea_kernel} if pol == "expected-attention" else {}

    depths = [float(d) for d in a.depths.split(",")]
    a.out.mkdir(parents=True, exist_ok=True)
    res = {"model": model, "machine": platform.platform(), "cmd": " ".join(__import__("sys").argv),
           "passkey": [], "ppl": []}
    t0 = time.time()
    if "passkey" not in a.skip:
        budget = int(a.length * a.budget_frac)
        runs = ([] if "full" in a.skip else [("full", a.length + 512)]) + [(p, budget) for p in pols]
        for d in depths:
            for pol, b in runs:
                r = passkey(model, "streaming-llm" if pol == "full" else pol, b, a.length, d, seed=a.seed,
                            one_shot=a.one_shot and pol != "full", recent=a.recent,
                            query_aware=a.query_aware and pol != "full", prose=a.prose,
                            question_weight=a.question_weight, answer_lookahead=a.answer_lookahead,
                            policy_options=opts(pol))
                row = as_dict(r)
                row["policy"] = pol
                row["ea_kernel"] = a.ea_kernel if pol == "expected-attention" else 1
                row["question_weight"] = a.question_weight
                row["answer_lookahead"] = a.answer_lookahead
                row["seed"] = a.seed
                res["passkey"].append(row)
                print(json.dumps(row), flush=True)
    if "ppl" not in a.skip:
        n = a.ppl_tokens
        full = perplexity(model, "streaming-llm", n + 512, n, n // 2, recent=a.recent) if "full" not in a.skip else None
        if full is not None:
            row = as_dict(full)
            row["policy"] = "full"
            res["ppl"].append(row)
            print(json.dumps(row), flush=True)
        for frac in [float(f) for f in a.ppl_fracs.split(",")]:
            for p in pols:
                row = as_dict(perplexity(model, p, int(n * frac), n, n // 2, recent=a.recent, policy_options=opts(p)))
                row["ea_kernel"] = a.ea_kernel if p == "expected-attention" else 1
                row["fraction"] = frac
                res["ppl"].append(row)
                print(json.dumps(row), flush=True)
    res["seconds"] = time.time() - t0
    (a.out / "results.json").write_text(json.dumps(res, indent=1))
    print(f"done in {res['seconds']:.0f} s")


if __name__ == "__main__":
    main()
