"""Expected Attention (Devoto, Jeblick & Jégou, arXiv 2510.00636).

Formula as NVIDIA kvpress computes it (``kvpress/presses/expected_attention_press.py``,
``ExpectedAttentionPress``; re-implemented here in numpy, not copied):

    μ = mean(q), Σ = (q - μ)ᵀ(q - μ) / N          pre-RoPE queries, per query head
    R̄ = mean_{j < n_future} R(p + j)              RoPE averaged over the next positions
    μ' = R̄ μ,  Σ' = R̄ Σ R̄ᵀ
    z_k = s μ'·k + ½ s² kᵀ Σ' k                    log E[exp(s q'·k)] for q' ~ N(μ', Σ')
    a = softmax_k(z), averaged over the query heads of a KV group
    score = (a + ε) ‖v‖                            (use_vnorm; kvpress adds ε only there)

kvpress uses s = 1/√d; we use the model's softmax scale when the engine knows it
(``CellView.attn_scale``), which is the same for most models. kvpress starts R̄ at the
prompt length; we start it at the true next position (``CellView.next_pos``).

llama.cpp cells are shared by all layers and heads, so ``score`` reduces the per-layer,
per-KV-head scores to one per cell (``aggregate``: "union", the default, "mean", "max" or "share"). Sinks and the
recent window are protected by the engine, not here.

The helpers ``softmax``, ``use_layers``, ``aggregate_scores`` and ``pool1d`` are shared with the
attention-based baselines.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ea_local.policies.base import CellView, RopeSpec
from ea_local.rope import mean_rotation

AGGREGATES = ("mean", "max", "share", "union")
POOLINGS = ("max", "avg")


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax; entries at -inf get 0, an all -inf row gives all 0."""
    z = np.asarray(z, dtype=np.float64)
    zmax = np.max(z, axis=axis, keepdims=True)
    zmax = np.where(np.isfinite(zmax), zmax, 0.0)
    e = np.exp(z - zmax)
    tot = np.sum(e, axis=axis, keepdims=True)
    return e / np.where(tot > 0, tot, 1.0)


def use_layers(view: CellView, layers: Iterable[int] | None, need: Sequence[str]) -> list[int]:
    """The layers to score: ``layers`` if given, else every layer present in all of ``need``.

    ``need`` names CellView mappings ("keys", "values", "queries", "rope").
    """
    maps = [getattr(view, name) for name in need]
    if layers is None:
        chosen = sorted(set.intersection(*(set(m) for m in maps)))
    else:
        chosen = [int(l) for l in layers]
        for name, m in zip(need, maps):
            missing = [l for l in chosen if l not in m]
            if missing:
                raise ValueError(f"layers {missing} have no {name} in the view")
    if not chosen:
        raise ValueError(f"the view has no layer with all of: {', '.join(need)}")
    return chosen


def aggregate_scores(per_layer: Sequence[np.ndarray], how: str = "mean",
                     evictable: np.ndarray | None = None) -> np.ndarray:
    """Reduce per-layer (n_kv_head, n) (or (n,)) scores to (n,) over layers and heads.

    "mean", "max"; "share": the mean of each row divided by its sum over the `evictable` cells (all
    if None), so that every layer and head votes with the same weight. Without it, a layer whose
    attention goes mostly to the sinks (kept anyway), or whose values are small, hardly counts.
    "union": the best rank a cell has in any row (rank / n, ties share a rank), so keeping the top k
    keeps the union of every layer's and head's own best cells — what evicting each layer on its own
    (as kvpress does) would keep, when all layers must share one set of cells.
    """
    if how not in AGGREGATES:
        raise ValueError(f"unknown aggregate {how!r}; choose from: {', '.join(AGGREGATES)}")
    rows = np.concatenate([np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in per_layer], axis=0)
    if how == "union":
        ranks = np.stack([np.searchsorted(np.sort(r), r, side="left") for r in rows])
        return ranks.max(axis=0) / rows.shape[1]
    if how == "share":
        mass = rows.sum(axis=1, keepdims=True) if evictable is None else rows[:, evictable].sum(axis=1, keepdims=True)
        rows = rows / np.where(mass > 0, mass, 1.0)
    return rows.max(axis=0) if how == "max" else rows.mean(axis=0)


def pool1d(x: np.ndarray, kernel_size: int, how: str = "max") -> np.ndarray:
    """Stride-1 pooling along the last axis, same length (padding kernel_size // 2).

    "max" ignores the padding; "avg" counts it as zeros (torch avg_pool1d's default).
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
    if how not in POOLINGS:
        raise ValueError(f"unknown pooling {how!r}; choose from: {', '.join(POOLINGS)}")
    p = kernel_size // 2
    width = [(0, 0)] * (x.ndim - 1) + [(p, p)]
    padded = np.pad(x, width, constant_values=-np.inf if how == "max" else 0.0)
    win = sliding_window_view(padded, kernel_size, axis=-1)
    return win.max(axis=-1) if how == "max" else win.mean(axis=-1)


def kv_group(n_head: int, n_kv_head: int) -> int:
    """Query heads per KV head (GQA); query head h reads KV head h // group."""
    if n_kv_head <= 0 or n_head % n_kv_head:
        raise ValueError(f"n_head {n_head} is not a multiple of n_kv_head {n_kv_head}")
    return n_head // n_kv_head


def query_statistics(q: np.ndarray, use_covariance: bool = True,
                     weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-head mean (n_head, d) and covariance divided by N (n_head, d, d) of q (m, n_head, d).

    weights (m,): a weighted sample (normalised here); the statistics of the mixture of the
    weighted windows, μ = Σ w q, Σ = Σ w (q - μ)(q - μ)ᵀ."""
    q = np.asarray(q, dtype=np.float64)
    if q.ndim != 3 or q.shape[0] == 0:
        raise ValueError(f"queries must be (m>0, n_head, d), got {q.shape}")
    w = np.full(q.shape[0], 1.0 / q.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (q.shape[0],) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be ({q.shape[0]},) non-negative with a positive sum")
    w = w / w.sum()
    mu = np.tensordot(w, q, axes=1)
    if not use_covariance:
        return mu, None
    c = (q - mu).transpose(1, 0, 2)  # (n_head, m, d)
    return mu, (c.transpose(0, 2, 1) @ (c * w[None, :, None]))  # batched GEMM: Σ_h = c_hᵀ diag(w) c_h


def rotate_cov(cov: np.ndarray, r: np.ndarray) -> np.ndarray:
    """R Σ_h Rᵀ for every head of a symmetric cov (n_head, d, d), as two flat GEMMs."""
    h, d, _ = cov.shape
    y = (cov.reshape(h * d, d) @ r.T).reshape(h, d, d)  # Σ_h Rᵀ
    return (y.transpose(0, 2, 1).reshape(h * d, d) @ r.T).reshape(h, d, d)  # (Σ_h Rᵀ)ᵀ Rᵀ = R Σ_h Rᵀ


def expected_logits(mu: np.ndarray, cov: np.ndarray | None, keys: np.ndarray, scale: float) -> np.ndarray:
    """z (n_head, n) = s μ'·k + ½ s² kᵀΣ'k for rotated stats mu (n_head, d), cov, keys (n, n_kv_head, d)."""
    n_head = mu.shape[0]
    n_kv = keys.shape[1]
    g = kv_group(n_head, n_kv)
    z = np.empty((n_head, keys.shape[0]))
    for j in range(n_kv):
        k = keys[:, j, :]
        heads = slice(j * g, (j + 1) * g)
        z[heads] = scale * (mu[heads] @ k.T)
        if cov is not None:
            d = k.shape[1]
            kc = (k @ cov[heads].transpose(1, 0, 2).reshape(d, g * d)).reshape(-1, g, d)  # k Σ'_h, one GEMM
            z[heads] += 0.5 * scale**2 * (kc * k[:, None, :]).sum(-1).T
    return z


def expected_attention_layer(
    queries: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray | None,
    rope: RopeSpec,
    next_pos: int,
    *,
    n_future_positions: int = 512,
    use_covariance: bool = True,
    use_vnorm: bool = True,
    epsilon: float = 0.0,
    scale: float | None = None,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """(n_kv_head, n) Expected Attention scores of one layer.

    queries (m, n_head, d) pre-RoPE; keys (n, n_kv_head, d) post-RoPE; values (n, n_kv_head, d_v)
    (needed only with use_vnorm); scale None -> 1/sqrt(d).
    """
    keys = np.asarray(keys, dtype=np.float64)
    d = keys.shape[-1]
    s = 1.0 / np.sqrt(d) if scale is None else float(scale)
    mu, cov = query_statistics(queries, use_covariance, weights)
    r = mean_rotation(rope, next_pos, n_future_positions, head_dim=d)
    mu = mu @ r.T
    if cov is not None:
        cov = rotate_cov(cov, r)
    a = softmax(expected_logits(mu, cov, keys, s), axis=-1)  # (n_head, n)
    n_kv = keys.shape[1]
    a = a.reshape(n_kv, -1, keys.shape[0]).mean(axis=1)  # heads j*g .. j*g+g-1 -> KV head j
    if use_vnorm:
        if values is None:
            raise ValueError("use_vnorm needs the values")
        vnorm = np.linalg.norm(np.asarray(values, dtype=np.float64), axis=-1).T  # (n_kv, n)
        return (a + epsilon) * vnorm
    return a + epsilon


def _stat_queries(view: CellView, layer: int, n_sink: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The layer's captured queries and their weights, minus those at positions < n_sink (kvpress
    drops the first n_sink)."""
    q = np.asarray(view.queries[layer])
    w = view.query_weights
    if view.query_positions is None or n_sink <= 0:
        return q, w
    keep = np.asarray(view.query_positions) >= n_sink
    if not keep.any():  # only sink queries captured: use them rather than nothing
        return q, w
    return q[keep], None if w is None else np.asarray(w)[keep]


def score(
    view: CellView,
    *,
    n_future_positions: int = 512,
    use_covariance: bool = True,
    use_vnorm: bool = True,
    epsilon: float = 0.0,
    n_sink: int = 4,
    aggregate: str = "union",
    layers: Iterable[int] | None = None,
    kernel_size: int = 1,
    sinks_in_softmax: bool = False,
) -> np.ndarray:
    """(n,) Expected Attention per cell, aggregated over the chosen layers and KV heads.

    ``aggregate`` "union" (default): kvpress evicts each layer and KV head on its own; with cells
    shared by every layer, a cell is kept if any layer ranks it high. Measured against "mean" on the
    default model (docs/quality.md, "Levers"): pass key 8k -> 25% question-agnostic 5/5 vs 4/5
    (held-out depths 3/4 vs 2/4), perplexity the same within noise at 25% and 12.5%.

    ``kernel_size`` > 1 max-pools the scores over that many neighbouring live cells (SnapKV's
    pooling, not in kvpress' EA): a fact spans several tokens, and keeping the whole span is
    what lets the model read it back (docs/query_aware.md measures it).
    ``layers`` None: every layer with keys, queries and rope in the view (and values if use_vnorm).
    Queries at positions < ``n_sink`` are left out of the statistics.

    Cells at positions < ``n_sink`` (the sinks, kept by the engine anyway) are left out of the
    softmax and get every row's maximum + 1 afterwards, as kvpress pads them after scoring
    (``sinks_in_softmax`` False). Inside the softmax (True) they would take a share of each query
    head's mass that varies by head, and so reweight the heads of a KV group against each other.
    """
    need = ["keys", "queries", "rope"] + (["values"] if use_vnorm else [])
    positions = np.asarray(view.positions)
    scored = np.ones(positions.shape[0], dtype=bool) if sinks_in_softmax else positions >= n_sink
    per_layer = []
    for l in use_layers(view, layers, need):
        q, w = _stat_queries(view, l, n_sink)
        rest = np.zeros((view.keys[l].shape[1], positions.shape[0]))
        if scored.any():
            rest[:, scored] = expected_attention_layer(
                q, np.asarray(view.keys[l])[scored], np.asarray(view.values[l])[scored] if use_vnorm else None,
                view.rope[l], view.next_pos, n_future_positions=n_future_positions, use_covariance=use_covariance,
                use_vnorm=use_vnorm, epsilon=epsilon, scale=view.attn_scale, weights=w)
        rest[:, ~scored] = rest.max(axis=1, keepdims=True) + 1.0
        per_layer.append(rest)
    scores = aggregate_scores(per_layer, aggregate, evictable=positions >= n_sink)
    return scores if kernel_size == 1 else pool1d(scores, kernel_size, "max")
