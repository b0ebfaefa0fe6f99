#!/usr/bin/env python3
"""The per-policy table of docs/policies.md from a bench run: per policy, the pass key at the longest context and a budget
(both modes, with the share of the needle kept) and Δ perplexity at every budget.

    python scripts/measure/policy_table.py docs/bench/results.json [--budget 25%]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ea_local.bench.summary import accuracy, ppl_of


def table(res: dict, budget: str) -> str:
    s = res["settings"]
    q = res["quality"]
    longest = max(r["length"] for r in q["passkey"])
    pk = [r for r in q["passkey"] if r["length"] == longest]
    ppl_full = ppl_of(res, "full", "full")

    def found(p: str, mode: str) -> str:
        hit, n = accuracy(pk, p, budget, mode)
        kept = [r["needle_kept"] for r in pk if r["policy"] == p and r["budget"] == budget and r["mode"] == mode
                and r["needle_kept"] is not None]
        return f"{hit}/{n}" + (f" ({100 * sum(kept) / len(kept):.0f}%)" if kept else "") if n else "–"

    def dppl(p: str, b: str) -> str:
        r = ppl_of(res, p, b)
        return f"{r['ppl']:.2f} ({r['delta_ppl']:+.2f})" if r and "ppl" in r else "–"

    modes = [m for m in ("agnostic", "question") if m in s["modes"]]
    head = ["policy"] + [f"pass key {longest} tokens → {budget}, {m}" for m in modes] + \
        [f"perplexity {b} (Δ)" for b in s["budgets"]]
    hit, n = accuracy(pk, "full", "full")
    rows = [["full cache"] + [f"{hit}/{n}"] * len(modes) + [f"{ppl_full['ppl']:.2f}" if ppl_full else "–"] * len(s["budgets"])]
    rows += [[f"`{p}`"] + [found(p, m) for m in modes] + [dppl(p, b) for b in s["budgets"]] for p in s["policies"]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", type=Path)
    ap.add_argument("--budget", default="25%")
    a = ap.parse_args()
    print(table(json.loads(a.results.read_text()), a.budget))


if __name__ == "__main__":
    main()
