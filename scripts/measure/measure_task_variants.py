"""Full-cache accuracy of the multi-key needle and variable-tracking variants on a model: a task
the full cache fails says nothing about eviction, so the bench's report preset uses variants the
full cache solves. One prefill per document, every question asked from a restored snapshot.

    .venv/bin/python scripts/measure/measure_task_variants.py --docs 10 --length 2048 --out docs/bench-report/task_variants.json
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time

from ea_local.engine.session import Session  # libllama before numpy
from ea_local.bench import data
from ea_local.bench.options import BenchOptions
from ea_local.engine.snapshot import checkpoint, rewind
from ea_local.bench.stats import fmt_rate
from ea_local.bench.suites.common import ask, session_cfg
from ea_local.bench.suites.quality import _haystack
from ea_local.model.embedded import default_model_path

VARIANTS = {  # name: (task, generator kwargs)
    "multikey-4": ("multikey", {"n_keys": 4}),
    "multikey-2": ("multikey", {"n_keys": 2}),
    "vt-4x2-question": ("variable_tracking", {"n_hops": 4, "n_chains": 2, "style": "question"}),
    "vt-2x1-question": ("variable_tracking", {"n_hops": 2, "n_chains": 1, "style": "question"}),
    "vt-2x1-completion": ("variable_tracking", {"n_hops": 2, "n_chains": 1, "style": "completion"}),
    "vt-1x1-completion": ("variable_tracking", {"n_hops": 1, "n_chains": 1, "style": "completion"}),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--docs", type=int, default=10)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--haystacks", default="filler,prose")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    model = a.model or str(default_model_path())
    o = BenchOptions(model=model, out="", suites=[], policies=[], budgets=[], threads=1)
    cfg = session_cfg(o, a.length + 512, policy="streaming-llm")
    cfg.prefill_stats = None
    s = Session(model, cfg)
    bos = [s.rt.bos()] if s.rt.add_bos() else []
    rows = []
    t0 = time.time()
    for hay_kind in a.haystacks.split(","):
        for name in a.variants.split(","):
            task_name, kw = VARIANTS[name]
            for i in range(a.docs):
                rng = random.Random(f"{task_name}-variant-{i}")
                hay = _haystack(s.rt, hay_kind, a.length - 128, start=i)
                task = (data.multikey_needle(rng, hay, **kw) if task_name == "multikey"
                        else data.variable_tracking(rng, hay, **kw))
                s.prefill(bos + s.rt.tokenize(task.context))
                snap = checkpoint(s)
                for qi, q in enumerate(task.questions):
                    rewind(s, snap)
                    reply = ask(s, s.rt.tokenize(q.prompt), 8)
                    rows.append({"variant": name, "haystack": hay_kind, "doc": i, "question": qi,
                                 "found": data.answered(q.answer, reply), "answer": reply, "expected": q.answer})
                s.reset()
            sel = [r for r in rows if r["variant"] == name and r["haystack"] == hay_kind]
            print(f"{hay_kind:7s} {name:20s} full cache {fmt_rate(sum(r['found'] for r in sel), len(sel))}"
                  f"  ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    s.close()
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"model": model, "length": a.length, "docs": a.docs, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
