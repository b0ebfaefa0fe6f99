#!/usr/bin/env python3
"""One policy in two bench runs of the same trials (two settings of the engine, two commits), paired:
exact McNemar for the one-shot tasks, a paired bootstrap for perplexity. The full cache's rows of
both runs are compared first: they must agree, else the runs did not make the same trials.
--policy-b pairs another policy of run B (a changed engine against a baseline of the unchanged one).

    .venv/bin/python scripts/measure/pair_runs.py A/results.json B/results.json [--policy expected-attention] [--policy-b P]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ea_local.bench.stats import delta_ppl_interval, fmt_p, fmt_rate, mcnemar_exact, pair

TRIAL_KEYS = ("length", "depth", "seed", "sample", "haystack", "question", "budget", "mode")


def _key(r: dict) -> tuple:
    return tuple(r.get(k) for k in TRIAL_KEYS)


def _one_shot(task: str, a: list[dict], b: list[dict], policy: str, policy_b: str) -> None:
    fa = {_key(r): r["found"] for r in a if r["policy"] == "full"}
    fb = {_key(r): r["found"] for r in b if r["policy"] == "full"}
    same = sum(fa[k] == fb[k] for k in fa.keys() & fb.keys())
    print(f"\n### {task}\n\nfull cache: {sum(fa.values())}/{len(fa)} in A, {sum(fb.values())}/{len(fb)} in B, "
          f"{same} of {len(fa.keys() & fb.keys())} shared trials agree\n")
    print("| budget | mode | haystack | A | B | only A / only B | p |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    ra = [r for r in a if r["policy"] == policy]
    rb = [r for r in b if r["policy"] == policy_b]
    groups = sorted({(r["budget"], r["mode"], r["haystack"]) for r in ra}, key=str)
    for budget, mode, hay in groups + sorted({(r["budget"], r["mode"], "all") for r in ra}, key=str):
        sel = lambda rows: [r for r in rows if r["budget"] == budget and r["mode"] == mode  # noqa: E731
                            and hay in ("all", r["haystack"])]
        xa, xb = pair(sel(ra), sel(rb), _key)
        m = mcnemar_exact(xa, xb)
        print(f"| {budget} | {mode} | {hay} | {fmt_rate(m.a_hits, m.n)} | {fmt_rate(m.b_hits, m.n)} "
              f"| {m.a_only} / {m.b_only} | {fmt_p(m.p_value)} |")


def _perplexity(a: list[dict], b: list[dict], policy: str, policy_b: str) -> None:
    print("\n### perplexity\n\n| budget | A | B | B - A, paired 95% |\n| --- | --- | --- | --- |")
    full = next(r for r in a if r["policy"] == "full")["ppl"]
    print(f"| full | {full:.3f} | {next(r for r in b if r['policy'] == 'full')['ppl']:.3f} | |")
    for ra in (r for r in a if r["policy"] == policy and "windows" in r):
        rb = next(r for r in b if r["policy"] == policy_b and r["budget"] == ra["budget"])
        d, lo, hi = delta_ppl_interval([w["nll_sum"] for w in rb["windows"]], [w["nll_sum"] for w in ra["windows"]],
                                       [w["n"] for w in ra["windows"]])
        print(f"| {ra['budget']} | {ra['ppl']:.3f} (Δ {ra['ppl'] - full:+.3f}) | {rb['ppl']:.3f} "
              f"(Δ {rb['ppl'] - full:+.3f}) | {d:+.3f} [{lo:+.3f}, {hi:+.3f}] |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--policy", default="expected-attention")
    ap.add_argument("--policy-b", default=None, help="run B's policy (default: --policy)")
    args = ap.parse_args()
    policy_b = args.policy_b or args.policy
    qa = json.loads(Path(args.a).read_text())["quality"]
    qb = json.loads(Path(args.b).read_text())["quality"]
    for task in ("passkey", "multikey", "variable_tracking", "perplexity"):
        if task in qa and task in qb:
            if task == "perplexity":
                _perplexity(qa[task], qb[task], args.policy, policy_b)
            else:
                _one_shot(task, qa[task], qb[task], args.policy, policy_b)


if __name__ == "__main__":
    main()
