"""SnapKV (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation",
arXiv 2404.14469): the queries of an observation window (the last captured ones) vote for
the keys by their real attention; votes are pooled along the sequence so that neighbours of
an important key are kept with it.

Per layer: RoPE the captured pre-RoPE queries at their positions, causal softmax(s q·k) over
the cells, sum over the window queries, pool over ``kernel_size`` cells (max by default;
kvpress and the SnapKV code default to average pooling: ``pooling="avg"``), then average the
query heads of each KV group (pooling per query head before the group mean, as kvpress).
Layers are aggregated by mean. The engine protects the window itself and the sinks.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np

from ea_local.policies.base import CellView, Policy, RopeSpec
from ea_local.policies.common import aggregate_scores, kv_group, pool1d, softmax, use_layers, window
from ea_local.model.rope import apply_rope

def group_attention(
    queries: np.ndarray,
    query_positions: np.ndarray,
    keys: np.ndarray,
    key_positions: np.ndarray,
    rope: RopeSpec,
    scale: float | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (kv_head, (group, m, n) attention weights) of RoPE'd queries (m, n_head, d) over keys (n, n_kv_head, d).

    A query attends to the cells at positions <= its own (causal mask).
    """
    keys = np.asarray(keys, dtype=np.float64)
    d = keys.shape[-1]
    s = 1.0 / np.sqrt(d) if scale is None else float(scale)
    q = apply_rope(np.asarray(queries, dtype=np.float64).transpose(1, 0, 2), query_positions, rope)  # (H, m, d)
    g = kv_group(q.shape[0], keys.shape[1])
    visible = np.asarray(key_positions)[None, :] <= np.asarray(query_positions)[:, None]  # (m, n)
    for j in range(keys.shape[1]):
        logits = s * (q[j * g : (j + 1) * g] @ keys[:, j, :].T)  # (g, m, n)
        yield j, softmax(np.where(visible, logits, -np.inf), axis=-1)


def snapkv_layer(
    queries: np.ndarray,
    query_positions: np.ndarray,
    keys: np.ndarray,
    key_positions: np.ndarray,
    rope: RopeSpec,
    *,
    kernel_size: int = 5,
    pooling: str = "max",
    scale: float | None = None,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """(n_kv_head, n) SnapKV votes of one layer; weights (m,) weigh the window's queries (None: a plain sum)."""
    out = np.empty((keys.shape[1], keys.shape[0]))
    for j, attn in group_attention(queries, query_positions, keys, key_positions, rope, scale):
        votes = attn.sum(axis=1) if weights is None else np.einsum("gmn,m->gn", attn, np.asarray(weights))
        out[j] = pool1d(votes, kernel_size, pooling).mean(axis=0)
    return out


def over_window(view: CellView, window_size: int | None, layers: Iterable[int] | None, need: list[str],
                aggregate: str, layer_score: Callable[[int, np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """Aggregate ``layer_score(layer, window queries, their positions)`` over the chosen layers."""
    idx = window(view, window_size)
    qpos = np.asarray(view.query_positions)[idx]
    per_layer = [layer_score(l, np.asarray(view.queries[l])[idx], qpos) for l in use_layers(view, layers, need)]
    return aggregate_scores(per_layer, aggregate)


def score(
    view: CellView,
    *,
    window_size: int | None = None,
    kernel_size: int = 5,
    pooling: str = "max",
    aggregate: str = "mean",
    layers: Iterable[int] | None = None,
) -> np.ndarray:
    """(n,) SnapKV score per cell, aggregated over layers (and KV heads).

    With the Session's focus window the votes are weighted (``view.query_weights``), so the user's
    message or question has its share whatever the windows' lengths (query-aware SnapKV)."""
    idx = window(view, window_size)
    qpos = np.asarray(view.query_positions)[idx]
    w = None if view.query_weights is None else np.asarray(view.query_weights)[idx]
    per_layer = [snapkv_layer(np.asarray(view.queries[l])[idx], qpos, view.keys[l], view.positions, view.rope[l],
                              kernel_size=kernel_size, pooling=pooling, scale=view.attn_scale, weights=w)
                 for l in use_layers(view, layers, ["keys", "queries", "rope"])]
    return aggregate_scores(per_layer, aggregate)


POLICY = Policy(
    name="snapkv",
    description="attention of the observation-window queries, pooled over neighbouring cells",
    paper="Li et al. 2024, SnapKV: LLM Knows What You are Looking for Before Generation, arXiv 2404.14469",
    score=score,
    needs_queries=True,
)
