#!/usr/bin/env python3
"""Pass key through `ea-local summarize FILE --prompt`: one CLI run per trial, as a user types it.

    EA_LOCAL_THREADS=1 .venv/bin/python scripts/bench/summarize_passkey.py --model smollm2-135m --tokens 1000 \\
        --budget 256 --texts reporting --seeds 0,1,2,3 --out results.jsonl

The haystack, needle and trials are serve_passkey.py's (the same keys for the same depths and seeds);
the document goes to a file, the question is `--prompt`, greedy, 16 tokens. `--policy none` with a
budget above the document's length is the full cache.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from ea_local.engine.runtime import ContextConfig, Runtime  # ea_local first: libllama before numpy
from ea_local.bench.data import answered
from ea_local.bench.stats import fmt_rate
from ea_local.model.embedded import resolve_model

import serve_passkey as sp  # this folder: run as a script


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=1000, help="haystack tokens")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--policy", default="expected-attention")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--seeds", default="0,1", help="one trial per depth and seed, keyed as serve_passkey.py's")
    ap.add_argument("--haystack", choices=["filler", "prose"], default="prose")
    ap.add_argument("--texts", choices=sorted(sp.PROSE), default="reporting")
    ap.add_argument("--out", default=None, help="JSON lines, one per trial")
    a = ap.parse_args()
    rt = Runtime(str(resolve_model(a.model)), ContextConfig(n_ctx=64, n_threads=1))
    sents = sp.haystack(rt, a.haystack, a.tokens, a.texts)
    rt.close()
    depths = [float(x) for x in a.depths.split(",")]
    plan = [t for s in a.seeds.split(",") for t in sp.trials(int(s), depths)]
    out = open(a.out, "a") if a.out else None
    found = 0
    with tempfile.TemporaryDirectory() as tmp:
        doc = Path(tmp) / "document.txt"
        for depth, key in plan:
            doc.write_text(sp.document(sents, depth, key))
            r = subprocess.run([sys.executable, "-m", "ea_local.cli", "summarize", str(doc), "--model", a.model,
                                "--prompt", sp.CHAT_QUESTION.strip(), "--budget", str(a.budget), "--policy", a.policy,
                                "--temperature", "0", "--max-tokens", "16", "--threads", "1"],
                               capture_output=True, text=True, timeout=1800)
            if r.returncode != 0:
                print(f"summarize exited {r.returncode}: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                return 1
            row = {"model": a.model, "path": "summarize", "haystack": a.haystack, "texts": a.texts,
                   "tokens": a.tokens, "budget": a.budget, "policy": a.policy, "depth": depth, "key": key,
                   "found": answered(str(key), r.stdout), "answer": r.stdout.strip()}
            found += row["found"]
            print(json.dumps(row), flush=True)
            if out:
                out.write(json.dumps(row) + "\n")
                out.flush()
    print(f"summarize, {a.policy}, {a.budget} cells: {fmt_rate(found, len(plan))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
