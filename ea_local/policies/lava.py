"""LAVa (Shen, Yuan, Zhang, Wang, Jiang & Nguyen 2025, "LAVa: Layer-wise KV Cache Eviction with
Dynamic Budget Allocation", arXiv 2509.09754): its cache-entry score, which bounds the loss an
eviction causes in the layer's attention output (hence in the residual stream), computed per
token.

Per layer and query head h, as the authors' code (``LavaKVCluster.calcul_attn_score``):

    s_h(i) = pool_k( mean_{q in window} a^h_qi ) · max_t ‖v^h_t‖₁

the window queries' mean causal attention, max-pooled over ``kernel_size`` = 7 cells, scaled
by the head's largest value L1 norm (the bound on ‖W_o v‖ that makes heads comparable); a KV
group takes the max over its query heads. ``value_norm="token"`` uses the cell's own ‖v_i‖₁
instead (a per-token variant, not the paper's).

How this differs from LAVa. LAVa evicts per head with *dynamic budgets*: inside a layer it
takes the top entries of the flattened (head, token) scores, so a head gets as many cells as
it wins, and across layers it sizes budgets from the entropy of each layer's scores. llama.cpp
cells are shared by all heads and layers, so neither budget can be moved here. What is kept:
the cross-head comparison, as the max over a layer's KV heads (a cell ranks where its best
head would place it in the layer's flattened top-k). What is lost: the layer budgets; each
layer's scores are normalised to sum 1 (raw scores of different layers are never compared by
LAVa) and layers are reduced with ``aggregate`` (mean by default).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from ea_local.policies.base import CellView, Policy, RopeSpec
from ea_local.policies.snapkv import group_attention, over_window, pool1d

VALUE_NORMS = ("head", "token")


def lava_layer(
    queries: np.ndarray,
    query_positions: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
    key_positions: np.ndarray,
    rope: RopeSpec,
    *,
    kernel_size: int = 7,
    pooling: str = "max",
    value_norm: str = "head",
    scale: float | None = None,
) -> np.ndarray:
    """(n_kv_head, n) LAVa scores of one layer (before the cross-head max and the layer normalisation)."""
    if value_norm not in VALUE_NORMS:
        raise ValueError(f"unknown value_norm {value_norm!r}; choose from: {', '.join(VALUE_NORMS)}")
    vn = np.abs(np.asarray(values, dtype=np.float64)).sum(axis=-1)  # (n, n_kv) L1 norms
    out = np.empty((keys.shape[1], keys.shape[0]))
    for j, attn in group_attention(queries, query_positions, keys, key_positions, rope, scale):
        pooled = pool1d(attn.mean(axis=1), kernel_size, pooling)  # (group, n)
        weight = vn[:, j].max() if value_norm == "head" else vn[:, j]
        out[j] = pooled.max(axis=0) * weight
    return out


def score(
    view: CellView,
    *,
    window_size: int | None = 32,
    kernel_size: int = 7,
    pooling: str = "max",
    value_norm: str = "head",
    aggregate: str = "mean",
    layers: Iterable[int] | None = None,
) -> np.ndarray:
    """(n,) per layer: max over KV heads, normalised to sum 1; then ``aggregate`` over layers."""

    def layer_score(l: int, q: np.ndarray, qpos: np.ndarray) -> np.ndarray:
        s = lava_layer(q, qpos, view.keys[l], view.values[l], view.positions, view.rope[l], kernel_size=kernel_size,
                       pooling=pooling, value_norm=value_norm, scale=view.attn_scale).max(axis=0)
        total = s.sum()
        return s / total if total > 0 else s

    return over_window(view, window_size, layers, ["keys", "values", "queries", "rope"], aggregate, layer_score)


POLICY = Policy(
    name="lava",
    description="LAVa's residual-stream loss score: pooled window attention times the head's max value norm",
    paper="Shen et al. 2025, LAVa: Layer-wise KV Cache Eviction with Dynamic Budget Allocation, arXiv 2509.09754",
    score=score,
    needs_values=True,
    needs_queries=True,
)
