#!/usr/bin/env python3
"""Issue-6 table: every registered policy on the default model, same texts, same seeds, one run.

    nice -n 5 .venv/bin/python scripts/measure_policies.py --out docs/policies [--length 4096]
        [--depths 0.1,0.3,0.5,0.7,0.9] [--fraction 0.25] [--ppl-tokens 4096] [--policies a,b] [--threads N]

Pass key (ea_local.quality.passkey: chunked prefill through the budget, greedy 8-token answer)
and perplexity of GPL-3/GPL-2 tokens [n/2, n) (ea_local.quality.perplexity) at one budget
fraction; "full" is the `none` policy with room for everything. Rows are appended to
rows.jsonl as they finish (a long run keeps what it measured); results.json at the end.
`measure_policies.py --render ROWS.jsonl...` prints the markdown table of docs/policies.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from ea_local.quality import as_dict, passkey, perplexity  # loads libllama first
from ea_local.engine.session import BudgetError
from ea_local.models import default_model_path
from ea_local.policies import POLICIES
import numpy as np  # noqa: E402  (after llama_cpp, as everywhere)


def render(paths: list[Path]) -> str:
    """Markdown table (one row per policy) from rows.jsonl files: pass keys found per depth, needle kept, perplexity."""
    rows = [json.loads(line) for p in paths for line in p.read_text().splitlines() if line.strip()]
    pols = list(dict.fromkeys(r["policy"] for r in rows))
    depths = sorted({r["depth"] for r in rows if r["kind"] == "passkey" and "depth" in r})
    full_ppl = next((r["ppl"] for r in rows if r["kind"] == "ppl" and r["policy"] == "full"), None)
    head = ["policy"] + [f"pass key @{d:.0%}" for d in depths] + ["found", "needle kept (mean)", "perplexity", "Δ vs full"]
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for pol in pols:
        pk = {r["depth"]: r for r in rows if r["kind"] == "passkey" and r["policy"] == pol and "depth" in r}
        refused = any("refused" in r for r in rows if r["policy"] == pol)
        cells = [f"`{pol}`"]
        for d in depths:
            r = pk.get(d)
            cells.append("—" if r is None else f"{'**found**' if r['found'] else 'no'} ({r['needle_kept']:.0%})")
        done = [r for r in pk.values()]
        cells.append(f"{sum(r['found'] for r in done)}/{len(done)}" if done else ("refused" if refused else "—"))
        cells.append(f"{np.mean([r['needle_kept'] for r in done]):.0%}" if done else "—")
        pp = next((r for r in rows if r["kind"] == "ppl" and r["policy"] == pol), None)
        if pp is None or "ppl" not in pp:
            cells += ["refused" if pp is not None else "—", ""]
        else:
            cells += [f"{pp['ppl']:.2f}", "" if pol == "full" or full_ppl is None else f"{pp['ppl'] - full_ppl:+.2f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    if sys.argv[1:2] == ["--render"]:
        print(render([Path(p) for p in sys.argv[2:]]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("docs/policies"))
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--skip", default="", help="passkey,ppl,full")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all cores)")
    a = ap.parse_args()
    model = str(default_model_path())
    pols = [p for p in a.policies.split(",") if p]
    depths = [float(d) for d in a.depths.split(",")]
    a.out.mkdir(parents=True, exist_ok=True)
    rows_path = a.out / "rows.jsonl"
    res = {"model": model, "machine": platform.platform(), "cmd": " ".join(sys.argv), "passkey": [], "ppl": []}
    t0 = time.time()

    def emit(kind: str, row: dict) -> None:
        row["kind"] = kind
        res[kind].append(row)
        with rows_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    def timed(fn, label: str, **kw) -> dict:
        t = time.time()
        try:
            row = as_dict(fn(**kw))
        except BudgetError as e:  # `none` under a budget smaller than the text: the refusal is the result
            row = {"policy": kw["policy"], "budget": kw["budget"], "refused": str(e)}
        row["policy"], row["seconds"] = label, round(time.time() - t, 1)
        return row

    budget = int(a.length * a.fraction)
    if "passkey" not in a.skip:
        runs = ([] if "full" in a.skip else [("full", "none", a.length + 512)]) + [(p, p, budget) for p in pols]
        for d in depths:  # depth-major: an interrupted run still has every policy at the first depths
            for label, pol, b in runs:
                emit("passkey", timed(passkey, label, model=model, policy=pol, budget=b, length=a.length,
                                      depth=d, seed=0, n_threads=a.threads))
    if "ppl" not in a.skip:
        n = a.ppl_tokens
        runs = ([] if "full" in a.skip else [("full", "none", n + 512)]) + [(p, p, int(n * a.fraction)) for p in pols]
        for label, pol, b in runs:
            row = timed(perplexity, label, model=model, policy=pol, budget=b, n_tokens=n, eval_from=n // 2,
                        n_threads=a.threads)
            row["fraction"] = None if label == "full" else a.fraction
            emit("ppl", row)
    res["seconds"] = time.time() - t0
    (a.out / "results.json").write_text(json.dumps(res, indent=1))
    print(f"done in {res['seconds']:.0f} s")


if __name__ == "__main__":
    main()
