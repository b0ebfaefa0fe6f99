#!/usr/bin/env python3
"""Perplexity of each policy against StreamingLLM's on the same windows (paired bootstrap), from a
bench results.json: the increase over the full cache as a multiple of StreamingLLM's, and the
difference with its 95% interval.

    .venv/bin/python scripts/measure/ppl_pairs.py docs/bench-report/perplexity/smollm2-135m/results.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ea_local.bench.stats import delta_ppl_interval


def main(path: str) -> None:
    res = json.loads(Path(path).read_text())
    rows = res["quality"]["perplexity"]
    full = next(r for r in rows if r["policy"] == "full")["ppl"]
    for b in res["settings"]["budgets"]:
        by = {r["policy"]: r for r in rows if r["budget"] == b and "windows" in r}
        sl = by["streaming-llm"]
        for p, r in by.items():
            if p == "streaming-llm":
                continue
            d, lo, hi = delta_ppl_interval([w["nll_sum"] for w in r["windows"]],
                                           [w["nll_sum"] for w in sl["windows"]], [w["n"] for w in r["windows"]])
            print(f"{b} {p}: perplexity {r['ppl']:.3f}, increase {r['ppl'] - full:+.3f} = "
                  f"{(r['ppl'] - full) / (sl['ppl'] - full):.2f}x streaming-llm's {sl['ppl'] - full:+.3f}; "
                  f"{p} - streaming-llm {d:+.3f} [{lo:+.3f}, {hi:+.3f}]")


if __name__ == "__main__":
    main(sys.argv[1])
