#!/usr/bin/env python3
"""The tables of docs/ea-paths.md from the bench's results.json files and serve_passkey.py's rows.

    .venv/bin/python scripts/measure/ea_paths_tables.py passkey OUT/results.json [...]   # pass key, per haystack
    .venv/bin/python scripts/measure/ea_paths_tables.py serve docs/ea-paths/serve-*.jsonl
    .venv/bin/python scripts/measure/ea_paths_tables.py ppl OUT/results.json             # ΔPPL, EA / StreamingLLM

Pass key: found k/n with its 95% Wilson interval per policy, mode and budget, then Expected
Attention against every other policy on the same trials (exact McNemar). Perplexity: ΔPPL against
the full cache with its paired bootstrap interval over the scored chunks, and the ratio of EA's
increase to StreamingLLM's with a bootstrap interval over the same resampled chunks.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from ea_local.bench.stats import delta_ppl_interval, fmt_p, fmt_rate, mcnemar_exact, pair  # loads libllama before numpy

import numpy as np

EA = "expected-attention"


def _rows(paths: list[str], part: str) -> list[dict]:
    return [r for p in paths for r in json.loads(Path(p).read_text())["quality"][part]]


def _trial(r: dict) -> tuple:
    return r.get("haystack"), r.get("length"), r.get("seed"), r.get("depth"), r.get("question")


def passkey(paths: list[str]) -> str:
    rows = _rows(paths, "passkey")
    out = []
    for hay in dict.fromkeys(r.get("haystack") for r in rows):
        sel = [r for r in rows if r.get("haystack") == hay]
        length = sorted({r["context"] for r in sel})
        budgets = list(dict.fromkeys(r["budget"] for r in sel if r["budget"] != "full"))
        full = [r for r in sel if r["policy"] == "full"]
        out += [f"### {hay}, context {min(length)}–{max(length)} tokens", "",
                f"Full cache: {fmt_rate(sum(r['found'] for r in full), len(full))}", "",
                "| policy | mode | " + " | ".join(budgets) + " |", "| --- | --- |" + " --- |" * len(budgets)]
        pols = list(dict.fromkeys(r["policy"] for r in sel if r["policy"] != "full"))
        for pol in pols:
            for mode in ("question", "agnostic"):
                cells = []
                for b in budgets:
                    c = [r for r in sel if r["policy"] == pol and r["mode"] == mode and r["budget"] == b]
                    cells.append(fmt_rate(sum(r["found"] for r in c), len(c)))
                out.append(f"| {pol} | {mode} | " + " | ".join(cells) + " |")
        out += ["", "Expected Attention against each policy on the same trials (exact McNemar: EA only / other only, p):", "",
                "| other | mode | " + " | ".join(budgets) + " |", "| --- | --- |" + " --- |" * len(budgets)]
        for other in ["full"] + [p for p in pols if p != EA]:
            for mode in ("question", "agnostic"):
                cells = []
                for b in budgets:
                    a = [r for r in sel if r["policy"] == EA and r["mode"] == mode and r["budget"] == b]
                    o = full if other == "full" else [r for r in sel if r["policy"] == other and r["mode"] == mode
                                                      and r["budget"] == b]
                    m = mcnemar_exact(*pair(a, o, _trial))
                    cells.append(f"{m.a_only}/{m.b_only}, p {fmt_p(m.p_value)}")
                out.append(f"| {other} | {mode} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def serve(paths: list[str]) -> str:
    rows = [json.loads(line) for p in paths for line in Path(p).read_text().splitlines() if line.strip()]
    out = ["| model | haystack | prompt tokens | budget | policy | mode | found | HTTP status |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        mode = "full" if r["policy"] == "none" else ("agnostic" if r["agnostic"] else "question")
        groups.setdefault((r["model"], r["haystack"], r["budget"], r["policy"], mode), []).append(r)
    for (model, hay, budget, pol, mode), rs in groups.items():
        toks = sorted(r.get("prompt_tokens", 0) for r in rs)
        codes = sorted({r["status"] for r in rs})
        out.append(f"| {model} | {hay} | {toks[0]}–{toks[-1]} | {budget if pol != 'none' else '–'} | "
                   f"{'full' if pol == 'none' else pol} | {mode} | {fmt_rate(sum(r['found'] for r in rs), len(rs))} | "
                   f"{', '.join(map(str, codes))} |")
    return "\n".join(out)


def _chunks(r: dict, like: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(nll sums, token counts) per scored chunk; with `like` (the full cache's counts), smaller
    chunks (a smaller budget streams in smaller steps) are summed into the same units."""
    nll = np.concatenate([w["chunk_nll"] for w in r["windows"]])
    n = np.concatenate([w["chunk_n"] for w in r["windows"]])
    if like is None or np.array_equal(n, like):
        return nll, n
    edges = np.searchsorted(np.cumsum(n), np.cumsum(like))  # index of the last small chunk of each unit
    if not np.array_equal(np.cumsum(n)[edges], np.cumsum(like)):
        raise ValueError(f"{r['policy']} {r['budget']}: its chunks do not nest in the full cache's")
    return np.add.reduceat(nll, np.r_[0, edges[:-1] + 1]), like


def ppl(paths: list[str], n_boot: int = 2000) -> str:
    rows = _rows(paths, "perplexity")
    full = next(r for r in rows if r["policy"] == "full")
    f_nll, n = _chunks(full)
    out = [f"Full cache: perplexity {full['ppl']:.2f} over {int(n.sum())} scored tokens ({len(n)} chunks).", "",
           "| budget | policy | perplexity | Δ vs full (95% CI) |", "| --- | --- | --- | --- |"]
    budgets = list(dict.fromkeys(r["budget"] for r in rows if r["budget"] != "full"))
    ratios = []
    for b in budgets:
        by = {}
        for r in rows:
            if r["budget"] == b and r["policy"] in (EA, "streaming-llm") and r.get("mode", "agnostic") != "question":
                by[r["policy"]] = _chunks(r, n)[0]
                d, lo, hi = delta_ppl_interval(by[r["policy"]], f_nll, n)
                out.append(f"| {b} | {r['policy']} | {r['ppl']:.2f} | {d:+.2f} ({lo:+.2f} to {hi:+.2f}) |")
        if len(by) == 2:  # the ratio of the increases, resampling the same chunks for all three
            idx = np.random.default_rng(0).integers(0, len(n), size=(n_boot, len(n)))
            tok = n[idx].sum(1)

            def p(x: np.ndarray) -> np.ndarray:
                return np.exp(x[idx].sum(1) / tok)

            boot = (p(by[EA]) - p(f_nll)) / (p(by["streaming-llm"]) - p(f_nll))
            point = (math.exp(by[EA].sum() / n.sum()) - full["ppl"]) / (math.exp(by["streaming-llm"].sum() / n.sum())
                                                                       - full["ppl"])
            lo, hi = np.quantile(boot, [0.025, 0.975], method="inverted_cdf")
            ratios.append(f"| {b} | {point:.2f} ({lo:.2f} to {hi:.2f}) |")
    out += ["", "| budget | EA's increase / StreamingLLM's (95% bootstrap CI) |", "| --- | --- |"] + ratios
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] not in ("passkey", "serve", "ppl"):
        sys.exit("usage: ea_paths_tables.py passkey|serve|ppl FILE...")
    print({"passkey": passkey, "serve": serve, "ppl": ppl}[sys.argv[1]](sys.argv[2:]))


if __name__ == "__main__":
    main()
