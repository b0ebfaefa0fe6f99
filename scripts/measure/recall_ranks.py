#!/usr/bin/env python3
"""Where the asked fact ranks among the archived cells, per recall score variant (docs/recall.md,
"Why 12.5% failed"): the bench's multi-turn chats (seed 0) streamed through the budget, then each
question prefilled and the archive scored by the message's share, by the share over the baseline's
(two floors), and by the max over the mean share of the message's queries; prints the rank of the
fact's best cell and how many of the fact turn's cells are among the budget/4 best.

    python scripts/measure/recall_ranks.py 0.125 0,2 [policy]
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy is loaded
from ea_local import kvhooks  # noqa: E402,F401  (loads llama.cpp before numpy)
import numpy as np
from ea_local.bench.options import BenchOptions
from ea_local.engine.snapshot import checkpoint as take, rewind as restore
from ea_local.bench.suites.common import session_cfg
from ea_local.bench.suites.quality import _chat_tokens
from ea_local.engine.runtime import ContextConfig, Runtime
from ea_local.engine.session import Session
from ea_local.engine.recall import message_scores
from ea_local.engine.archive import pool_spans
from ea_local.model.embedded import resolve_model

model = str(resolve_model('smollm2-135m'))
frac = float(sys.argv[1]); chats = [int(x) for x in sys.argv[2].split(',')]
pol = sys.argv[3] if len(sys.argv) > 3 else 'expected-attention'
o = BenchOptions(out=Path("/dev/null"), suites=["multi_turn"], policies=[], budgets=[], model=model,
                 task_length=2048, cache_type='f16', threads=1, seed=0)
rt = Runtime(model, ContextConfig(n_ctx=64, n_gpu_layers=0))
cs = [(_chat_tokens(rt, o, i), i) for i in chats]
rt.close()
for (turns, qs), i in cs:
    total = sum(map(len, turns)); cells = round(total * frac)
    starts = np.cumsum([0] + [len(t) for t in turns])
    cfg = session_cfg(o, cells, pol, chunk=min(256, max(32, cells // 2)))
    cfg.recall = True
    s = Session(model, cfg)
    for t in turns: s.prefill(t, turn=True)
    snap = take(s)
    base_q = {il: s.focus.q[il].copy() for il in s.layers}; base_pos = s.focus.pos.copy()
    for qi, (qt, ans) in enumerate(qs):
        restore(s, snap)
        start = s.next_pos
        s.prefill(qt, turn=True)
        q, qp = s.message_queries(start)
        a = s.archive
        lp = None; lk = {}
        for il in s.layers:
            lp, lk[il], _ = s.rt.kv_read(il, values=False)
        keys = {il: np.concatenate([lk[il], a.digest[il].astype(np.float32)]) for il in s.layers}
        sm = message_scores(q, qp, keys, s.rope, s.info.kq_scale)
        m = len(qp)
        bq = {il: base_q[il][-m:] for il in s.layers}
        sb = message_scores(bq, base_pos[-m:], keys, s.rope, s.info.kq_scale)
        n_live = len(lp)
        lo, hi = starts[qi], starts[qi + 1]
        fm = (a.pos >= lo) & (a.pos < hi)
        from ea_local.engine.recall import rotate_queries
        from ea_local.policies.common import kv_group
        mean = None
        for il, k in keys.items():
            qr = rotate_queries(q[il], qp, s.rope[il]); mm, h, d = qr.shape; g = kv_group(h, k.shape[1])
            sc_ = s.info.kq_scale or 1/np.sqrt(d)
            acc = np.zeros(len(k))
            for j in range(k.shape[1]):
                z = (qr[:, j*g:(j+1)*g].reshape(mm*g, d) @ k[:, j].T) * sc_
                z -= z.max(axis=1, keepdims=True); e = np.exp(z); a_ = e / e.sum(axis=1, keepdims=True)
                acc += a_.mean(axis=0)
            mean = acc if mean is None else mean + acc
        mean /= len(keys) * k.shape[1]
        for name, sc in (("msg", sm), ("msg/base e-3", sm / (sb + 1e-3)), ("msg/base e-2", sm / (sb + 1e-2)), ("max/mean e-4", sm / (mean + 1e-4)), ("max/mean e-3", sm / (mean + 1e-3))):
            ar = pool_spans(a.pos, sc[n_live:], 8)
            order = np.argsort(-ar)
            rk = np.flatnonzero(fm[order])
            top = np.sort(a.pos[order[:cells // 4]])
            print(f" q{qi} {name}: fact rank {rk[:3]} top in fact {int(((top>=lo)&(top<hi)).sum())}, spans {top[np.r_[0, np.flatnonzero(np.diff(top) > 1) + 1]][:12]}")
    s.close()
