"""Lookahead Q-Cache (LAQ; Wang et al. 2025, "Lookahead Q-Cache: Achieving More Consistent KV
Cache Eviction via Pseudo Query", arXiv 2505.20334): prefill-time queries are a poor proxy for
the queries of decoding, so a few cheap greedy decode steps are taken first and *their* queries
are the observation window of a SnapKV-style vote (causal attention summed over the window,
pooled over neighbouring cells, mean over query heads of a KV group and over layers).

The engine does the lookahead (Policy.lookahead steps, see Session._lookahead): it decodes
greedily from the current logits with query capture on, hands the pseudo queries to the view at
their positions (>= view.next_pos), then removes those cells and restores the logits, so the
lookahead leaves no trace. Defaults as the authors' script (noforit/Lookahead_Q-Cache,
run_LAQ.sh): 8 lookahead tokens, max pooling over 7 cells; there the pseudo tokens are generated
on a cache first compressed to the budget by SnapKV (window 32), for speed; here they are
generated on the current cache, which the budget already keeps small. ``local_window`` > 0 adds
the last real queries to the window (the authors' stage-2 window, 8 for LAQ++, 0 for LAQ).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from ea_local.policies.base import CellView, Policy
from ea_local.policies.common import aggregate_scores, use_layers
from ea_local.policies.snapkv import snapkv_layer


def window_indices(view: CellView, local_window: int = 0) -> np.ndarray:
    """Indices of the pseudo queries (positions >= next_pos), plus the last ``local_window`` real ones."""
    if view.query_positions is None:
        raise ValueError("laq needs query_positions to apply RoPE to the captured queries")
    qpos = np.asarray(view.query_positions)
    ahead = np.flatnonzero(qpos >= view.next_pos)
    if len(ahead) == 0:
        raise ValueError("laq needs lookahead queries (positions >= next_pos): run it through the engine")
    real = np.flatnonzero(qpos < view.next_pos)
    real = real[np.argsort(qpos[real], kind="stable")][len(real) - min(len(real), int(local_window)):]
    return np.concatenate([real, ahead])


def score(
    view: CellView,
    *,
    local_window: int = 0,
    kernel_size: int = 7,
    pooling: str = "max",
    aggregate: str = "mean",
    layers: Iterable[int] | None = None,
) -> np.ndarray:
    """(n,) SnapKV votes of the lookahead (pseudo) queries, aggregated over layers and KV heads."""
    idx = window_indices(view, local_window)
    qpos = np.asarray(view.query_positions)[idx]
    per_layer = [snapkv_layer(np.asarray(view.queries[l])[idx], qpos, view.keys[l], view.positions, view.rope[l],
                              kernel_size=kernel_size, pooling=pooling, scale=view.attn_scale)
                 for l in use_layers(view, layers, ["keys", "queries", "rope"])]
    return aggregate_scores(per_layer, aggregate)


POLICY = Policy(
    name="laq",
    description="Lookahead Q-Cache: SnapKV votes of the queries of 8 greedy pseudo-decode steps (then undone)",
    paper="Wang et al. 2025, Lookahead Q-Cache: Achieving More Consistent KV Cache Eviction via Pseudo Query, arXiv 2505.20334",
    score=score,
    needs_queries=True,
    lookahead=8,
)
