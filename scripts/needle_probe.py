#!/usr/bin/env python3
"""How much of a pass-key needle each scoring keeps, from one full-cache prefill (docs/query_aware.md).

    EA_LOCAL_THREADS=1 .venv/bin/python scripts/needle_probe.py [LENGTH]

Prefills LENGTH tokens of GPL text with a needle at depths 10% and 50%, then scores the cells once
with question weights 0 / 0.5 / 0.9 / 1 (Expected Attention, EA max-pooled over 5 cells, SnapKV) and
prints the share of needle tokens among the top 25% (sinks and the last 64 tokens always kept)."""
from ea_local.engine.session import Session, SessionConfig  # loads libllama before numpy
import random
import sys
import time

import numpy as np
from ea_local.quality import real_text
from ea_local.demo import passkey_prompt
from ea_local.models import default_model_path
from ea_local.policies import expected_attention as ea, snapkv
from ea_local.policies.snapkv import pool1d
m = str(default_model_path())
L = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
for depth in (0.1, 0.5):
    s = Session(m, SessionConfig(budget=L + 600, chunk=512, policy="expected-attention", question_weight=0.5))
    key = random.Random(int(depth*100)).randint(10000, 99999)
    hay = s.rt.tokenize(real_text(), add_bos=False, special=False)
    ctx, q, span = passkey_prompt(s.rt, L, depth, key, haystack=hay)
    t = time.time(); s.prefill(ctx); 
    s.set_question(q)
    budget = L // 4
    res = {}
    for w in (0.0, 0.5, 0.9, 1.0):
        s.cfg.question_weight = w
        v = s.view()
        pos = v.positions
        protected = (pos < 4) | (pos >= s.next_pos - 64)
        for name, fn in [("ea", lambda: ea.score(v)), ("ea_pool5", lambda: pool1d(ea.score(v), 5, "max")),
                         ("snap", lambda: snapkv.score(v))]:
            sc = fn().copy(); sc[protected] = np.inf
            keep = set(pos[np.argsort(-sc)[:budget]].tolist())
            res[(w, name)] = sum(p in keep for p in range(*span)) / (span[1]-span[0])
    print(f"L={L} depth={depth} prefill {time.time()-t:.0f}s", {f"{k[1]}@{k[0]}": round(v,2) for k, v in res.items()}, flush=True)
    s.close()
