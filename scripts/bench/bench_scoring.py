#!/usr/bin/env python3
"""One Expected Attention compression, side by side: what the engine does (read K and the value
norms, rotate the queries by R̄ in O(d), score in float32 through a blocked Cholesky factor of Σ')
vs the explicit form it replaced (read K and V rows, z = s μ'·k + ½ s² kᵀΣ'k with a d×d Σ' per head
in float64).

Prefills a real text to --cells cells once, then alternates the two on the same cache (--rounds
times each) and prints median times, their ratios, and how many cells both would evict. Then one real
compression to 25% times the removal, which both would pay, and the whole compression's speed-up.
The V rows of the explicit form are read through the current library, whose transposed-V read is
itself faster than before: the ratio is a lower bound.

    python scripts/bench/bench_scoring.py                       # default model, 8k cells
    python scripts/bench/bench_scoring.py --model smollm2-135m --cells 4096
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

from ea_local.engine.session import Session, SessionConfig  # ea_local first: libllama before numpy
from ea_local.model.embedded import resolve_model
from ea_local.policies import expected_attention as ea
from ea_local.policies.common import aggregate_scores, softmax, use_layers
from ea_local.model.rope import mean_rotation

import numpy as np


def score_float64(view, n_sink: int = 4) -> np.ndarray:
    """The explicit form, float64 throughout (the reference the fast path is tested against); the sinks
    outside the softmax, as the engine's."""
    sinks = np.asarray(view.positions) < n_sink
    per_layer = []
    for l in use_layers(view, None, ["keys", "queries", "rope", "values"]):
        q, w = ea._stat_queries(view, l, n_sink)
        keys = np.asarray(view.keys[l], dtype=np.float64)[~sinks]
        d = keys.shape[-1]
        mu, cov = ea.query_statistics(q, True, w)
        r = mean_rotation(view.rope[l], view.next_pos, 512, head_dim=d)
        z = ea.expected_logits(mu @ r.T, r @ cov @ r.T, keys, view.attn_scale or 1 / np.sqrt(d))
        a = softmax(z, axis=-1).reshape(keys.shape[1], -1, keys.shape[0]).mean(axis=1)
        full = np.empty((keys.shape[1], len(sinks)))
        full[:, ~sinks] = a * np.linalg.norm(np.asarray(view.values[l], dtype=np.float64)[~sinks], axis=-1).T
        full[:, sinks] = full[:, ~sinks].max(axis=1, keepdims=True) + 1.0
        per_layer.append(full)
    return aggregate_scores(per_layer, "union", evictable=~sinks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="path or embedded model name (default: gemma3-270m)")
    ap.add_argument("--cells", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    s = Session(str(resolve_model(a.model)), SessionConfig(budget=a.cells + 512, n_threads=a.threads))
    text = Path("/usr/share/common-licenses/GPL-3").read_text() + Path("/usr/share/common-licenses/GPL-2").read_text()
    toks = [s.rt.bos()] + s.rt.tokenize(text * 4)
    s.prefill(toks[:a.cells])
    t_view, t_new, t_rows, t_ref = [], [], [], []
    for _ in range(a.rounds):
        t0 = time.perf_counter()
        view = s.view()
        t1 = time.perf_counter()
        new = ea.score(view)
        t2 = time.perf_counter()
        rows = {il: s.rt.kv_read(il) for il in s.layers}
        old = replace(view, keys={il: r[1] for il, r in rows.items()}, values={il: r[2] for il, r in rows.items()},
                      value_norms={})
        t3 = time.perf_counter()
        ref = score_float64(old)
        t4 = time.perf_counter()
        t_view.append(t1 - t0), t_new.append(t2 - t1), t_rows.append(t3 - t2), t_ref.append(t4 - t3)
    k = len(view.positions) // 4  # a compression to 25%: the cells each would evict
    cand = np.asarray(view.positions) >= 4
    ev_new = set(np.flatnonzero(cand)[np.argsort(new[cand], kind="stable")][: len(new) - k].tolist())
    ev_ref = set(np.flatnonzero(cand)[np.argsort(ref[cand], kind="stable")][: len(ref) - k].tolist())
    med = statistics.median
    print(f"model {Path(s.model_path).name if hasattr(s, 'model_path') else a.model}, {len(view.positions)} cells, "
          f"{len(s.layers)} scored layers, {a.rounds} rounds, {a.threads} thread(s)")
    print(f"read K + |v| (view)     median {med(t_view) * 1e3:8.1f} ms")
    print(f"read K + V rows         median {med(t_rows) * 1e3:8.1f} ms")
    print(f"score float32 Cholesky  median {med(t_new) * 1e3:8.1f} ms")
    print(f"score float64 explicit median {med(t_ref) * 1e3:8.1f} ms")
    print(f"scoring speed-up {med(t_ref) / med(t_new):.2f}x; read+score speed-up "
          f"{(med(t_rows) + med(t_ref)) / (med(t_view) + med(t_new)):.2f}x")
    n_ev = len(s.stats.evictions)
    s.compress(len(view.positions) // 4)
    t_rm = s.stats.evictions[n_ev].evict_s
    new_c, ref_c = med(t_view) + med(t_new) + t_rm, med(t_rows) + med(t_ref) + t_rm
    print(f"remove (one call)       {t_rm * 1e3:8.1f} ms")
    print(f"one compression: engine {new_c * 1e3:.1f} ms, explicit form {ref_c * 1e3:.1f} ms, "
          f"speed-up {ref_c / new_c:.2f}x")
    print(f"same evicted cells at 25%: {len(ev_new & ev_ref) / max(1, len(ev_ref)):.4%}; "
          f"max |Δscore| {np.max(np.abs(new - ref)):.2e} (union ranks / n)")


if __name__ == "__main__":
    main()
