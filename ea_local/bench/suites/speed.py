"""Speed: prefill and decode tok/s as the history grows, full cache vs each policy x budget, and
the latency of compression events — every configuration in the same process and run, so the
ratios compare like with like.

One session per configuration reads real text (GPL, Debian base-files) up to each history length
H, then decodes `decode_tokens` tokens of the same text (teacher-forced: no sampler, identical
work for every configuration) through the engine's decode loop, compressions included. The full
cache is a session whose budget is never reached, with query capture off (hooks idle).
"""
from __future__ import annotations

import time
from typing import Callable

from ...engine.session import Session
from ..quality import real_text
from ..options import BenchOptions, speed_full_cells
from .common import session_cfg, skipped, streaming_floor

Tick = Callable[[str], None]


def _text_tokens(s: Session, n: int) -> list[int]:
    base = s.rt.tokenize(real_text())
    toks = [s.rt.bos()] if s.rt.add_bos() else []
    while len(toks) < n:
        toks += base
    return toks[:n]


def _events(evs) -> dict:
    t = [e.score_s + e.evict_s for e in evs]
    return {"n": len(t), "total_s": sum(t), "mean_s": sum(t) / len(t) if t else None, "max_s": max(t, default=None),
            "cells_evicted": sum(e.n_evicted for e in evs)}


def profile(o: BenchOptions, policy: str, cells: int, tick: Tick, step: int | None = None,
            chunk: int | None = None, score_layers: int | None = None) -> list[dict]:
    """Points at each history length; step/chunk/score_layers override the session's (scripts/bench/)."""
    cfg = session_cfg(o, cells, policy, chunk=chunk or min(512, max(32, cells // 2)))
    if step:
        cfg.step = step
    if score_layers:
        cfg.max_score_layers = score_layers
    s = Session(o.model, cfg)
    hist = o.histories or o.lengths
    toks = _text_tokens(s, max(hist) + o.decode_tokens * len(hist) + 1)
    points, fed = [], 0
    for h in hist:
        ev0 = len(s.stats.evictions)
        t0 = time.perf_counter()
        s.prefill(toks[fed:h])
        t_pre = time.perf_counter() - t0
        ev1 = len(s.stats.evictions)
        t0 = time.perf_counter()
        for tok in toks[h:h + o.decode_tokens]:  # the engine's decode loop (Session.generate) minus sampling
            s._decode([tok])
            if s.n_cells > s.cfg.budget:
                s.compress(s.room_target, phase="decode")
        t_dec = time.perf_counter() - t0
        points.append({"history": h, "prefilled": h - fed, "prefill_s": t_pre, "prefill_tok_s": (h - fed) / t_pre,
                       "decode_tokens": o.decode_tokens, "decode_s": t_dec, "decode_tok_s": o.decode_tokens / t_dec,
                       "cells_after": s.n_cells, "kv_mib": s.kv_bytes() / 2**20,
                       "prefill_compressions": _events(s.stats.evictions[ev0:ev1]),
                       "decode_compressions": _events(s.stats.evictions[ev1:])})
        fed = h + o.decode_tokens
        tick(policy)
    s.close()
    return points


def steps(o: BenchOptions) -> int:
    return len(o.histories or o.lengths) * (1 + len(o.policies) * len(o.budgets))


def run(o: BenchOptions, tick: Tick) -> list[dict]:
    hist = o.histories or o.lengths
    longest = max(hist)
    full = profile(o, "streaming-llm", speed_full_cells(o), tick)
    rows = [{"policy": "full", "budget": "full", "cells": None, "points": full}]
    floor = streaming_floor(o.model)
    for pol in o.policies:
        for b in o.budgets:
            cells = b.resolve(longest)  # a fraction of the longest history
            if why := skipped(floor, cells):
                rows.append({"policy": pol, "budget": b.label, "cells": cells, "skipped": why, "points": []})
                for _ in hist:
                    tick(f"{pol} skipped")
                continue
            pts = profile(o, pol, cells, tick)
            for p, f in zip(pts, full):
                p["prefill_ratio"] = p["prefill_tok_s"] / f["prefill_tok_s"]
                p["decode_ratio"] = p["decode_tok_s"] / f["decode_tok_s"]
            rows.append({"policy": pol, "budget": b.label, "cells": cells, "points": pts})
    return rows
