#!/usr/bin/env python3
"""Pass key through the server's path: one `/v1/completions` request per depth, greedy, the
question at the end of the prompt after a blank line, as a user of `ea-local serve` would ask it.

    EA_LOCAL_THREADS=1 .venv/bin/python scripts/bench/serve_passkey.py --model smollm2-135m --tokens 2048 \\
        --budget 512 --policies expected-attention,streaming-llm,none --haystack filler --out results.jsonl

Each policy gets its own server (`--no-reuse`: every request is read from scratch); `none` is the
full cache (its budget is the prompt plus the answer). A depth counts as found when the key's
digits appear in the 8-token answer. Prints found/n per policy with a Wilson 95% interval.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from ea_local.engine.runtime import ContextConfig, Runtime  # ea_local first: libllama before numpy
from ea_local.bench.stats import wilson
from ea_local.model.embedded import resolve_model

from serve_process import ServerProcess  # this folder: run as a script

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PROSE = Path("/usr/share/common-licenses/MPL-2.0")  # real English prose no setting was tuned on
INTRO = "There is important info hidden inside a lot of irrelevant text. Find it and memorize it. "
QUESTION = "\n\nWhat is the pass key? The pass key is"


def haystack(rt: Runtime, kind: str, n_tokens: int) -> list[str]:
    """Sentences of the haystack, enough for n_tokens."""
    if kind == "filler":
        unit = FILLER.split(". ")
        sents = [s.strip().rstrip(".") + ". " for s in unit if s.strip()]
    else:
        sents = [s.strip() + ". " for s in " ".join(PROSE.read_text().split()).split(". ") if s.strip()]
    out, n, i = [], 0, 0
    per = {s: len(rt.tokenize(s, add_bos=False, special=False)) for s in set(sents)}
    while n < n_tokens:
        s = sents[i % len(sents)]
        out.append(s)
        n += per[s]
        i += 1
    return out


def prompt(sents: list[str], depth: float, key: int) -> str:
    cut = int(len(sents) * depth)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    return INTRO + "".join(sents[:cut]) + needle + "".join(sents[cut:]).rstrip() + QUESTION


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=2048, help="haystack tokens")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--depths", default="0.05,0.2,0.35,0.5,0.65,0.8")
    ap.add_argument("--policies", default="expected-attention,streaming-llm,none")
    ap.add_argument("--agnostic", action="store_true", help="also expected-attention with question_agnostic")
    ap.add_argument("--haystack", choices=["filler", "prose"], default="filler")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON lines, one per request")
    a = ap.parse_args()
    path = str(resolve_model(a.model))
    rt = Runtime(path, ContextConfig(n_ctx=64, n_threads=1))
    sents = haystack(rt, a.haystack, a.tokens)
    rt.close()
    depths = [float(x) for x in a.depths.split(",")]
    keys = [random.Random(a.seed * 1000 + i).randint(10000, 99999) for i in range(len(depths))]
    runs = [(p, False) for p in a.policies.split(",")] + ([("expected-attention", True)] if a.agnostic else [])
    out = open(a.out, "a") if a.out else None
    summary = []
    for policy, agnostic in runs:
        budget = a.budget if policy != "none" else a.tokens + 512
        srv = ServerProcess(path, "--budget", str(budget), "--policy", policy, "--parallel", "1", "--no-reuse",
                            start_timeout=600)
        srv.client.timeout = 3600
        found = 0
        try:
            for depth, key in zip(depths, keys):
                body = {"prompt": prompt(sents, depth, key), "max_tokens": 8, "temperature": 0}
                if agnostic:
                    body["kv_compression"] = {"question_agnostic": True}
                t0 = time.perf_counter()
                r = srv.client.post("/v1/completions", json=body)
                row = {"model": a.model, "haystack": a.haystack, "tokens": a.tokens, "budget": budget,
                       "policy": policy, "agnostic": agnostic, "depth": depth, "key": key, "status": r.status_code,
                       "seconds": round(time.perf_counter() - t0, 1)}
                if r.status_code == 200:
                    j = r.json()
                    row.update(answer=j["choices"][0]["text"], found=str(key) in j["choices"][0]["text"],
                               prompt_tokens=j["usage"]["prompt_tokens"], kv_cache=j["kv_cache"])
                else:
                    row.update(found=False, error=r.text[:300])
                found += row["found"]
                print(json.dumps(row), flush=True)
                if out:
                    out.write(json.dumps(row) + "\n")
                    out.flush()
        finally:
            srv.stop()
        lo, hi = wilson(found, len(depths))
        name = policy + (" (question-agnostic)" if agnostic else "")
        summary.append(f"{name}: {found}/{len(depths)} found (95% CI {lo:.2f}-{hi:.2f})")
        print(summary[-1], flush=True)
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
