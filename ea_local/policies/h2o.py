"""H2O, Heavy-Hitter Oracle (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient
Generative Inference of Large Language Models", arXiv 2306.14048): keep the "heavy hitters",
the cells with the largest attention accumulated over the queries seen so far.

True H2O accumulates, per head, the attention every decoded query paid to each cell, over
the whole generation. Policies here are stateless functions of one view, so this is the
window approximation: the sum over the view's captured queries (the observation window) of
their real causal attention, softmax(s q·k) with RoPE'd queries, with no pooling. Per layer
the query heads of a KV group are averaged (GQA), then layers and KV heads are reduced with
``aggregate`` (mean by default). Like H2O (and unlike kvpress' ``ObservedAttentionPress``)
the sum is not divided by the number of queries that could see a cell, so older cells,
visible to every window query, collect more. This is SnapKV's vote with ``kernel_size=1``;
the computation is snapkv's, reused.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from ea_local.policies.base import CellView, Policy
from ea_local.policies.snapkv import score as snapkv_score


def score(
    view: CellView,
    *,
    window_size: int | None = None,
    aggregate: str = "mean",
    layers: Iterable[int] | None = None,
) -> np.ndarray:
    """(n,) sum over the last ``window_size`` captured queries (all if None) of their attention to each cell."""
    return snapkv_score(view, window_size=window_size, kernel_size=1, aggregate=aggregate, layers=layers)


POLICY = Policy(
    name="h2o",
    description="heavy hitters: attention summed over the observation-window queries (window approximation)",
    paper="Zhang et al. 2023, H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models, arXiv 2306.14048",
    score=score,
    needs_queries=True,
)
