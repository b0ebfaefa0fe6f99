"""Compactor (Chari & Van Durme 2025, "Compactor: Calibrated Query-Agnostic KV Cache Compression
with Approximate Leverage Scores", arXiv 2507.08143; as NVIDIA kvpress' ``CompactorPress`` =
``LeverageScorePress`` + ``NonCausalAttnPress``, written by the first author).

Per layer and KV head:

    leverage   K = pre-RoPE keys, centred over the cells; right Gaussian sketch X = K Φ,
               Φ (d, k) ~ N(0, 1/k) (``sketch_dimension`` k = 48; None: X = K, exact);
               ℓ_i = x_iᵀ (XᵀX)⁺ x_i via the eigendecomposition of XᵀX (kvpress: a Cholesky solve)
    attention  A_i = Σ_q a_qi over the window queries, mean over the KV group's query heads,
               times ‖v_i‖, average-pooled over 3 cells
    score      z(A) + blending · z(ℓ)          z: z-score over all (head, cell) of the layer

kvpress blends with the compression ratio (0.35 when unknown); the engine's ratio is not
known to a policy, so ``blending`` defaults to 0.35. The paper's attention term is
non-causal chunked attention of every context query over its chunk; here it is the causal
attention of the captured window queries (``attention=False``: leverage only, fully
query-agnostic). As kvpress, the first ``n_sink`` cells are left out of both statistics and
get the layer's top score. Keys are un-rotated with the layer's RoPE (``unrotate``). Layers and
KV heads are reduced with ``aggregate``; the sketch is drawn from ``view.seed``.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from ea_local.policies.base import CellView, Policy, RopeSpec
from ea_local.policies.common import aggregate_scores, use_layers, window
from ea_local.policies.snapkv import group_attention, pool1d
from ea_local.model.rope import apply_rope, magnitude, pair_indices


def leverage_scores(
    x: np.ndarray,
    sketch_dimension: int | None = None,
    rng: np.random.Generator | None = None,
    rtol: float = 1e-10,
) -> np.ndarray:
    """(n,) statistical leverage of the rows of the centred x (n, d), optionally right-sketched to k columns.

    ℓ_i = x_iᵀ (XᵀX)⁺ x_i from the eigendecomposition XᵀX = V Λ Vᵀ (k x k, far cheaper than an
    SVD of X): ℓ_i = Σ_r (x_i·v_r)² / λ_r over λ_r > rtol · λ_max (smaller ones count as null).
    """
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=0)
    if sketch_dimension is not None:
        rng = np.random.default_rng(0) if rng is None else rng
        x = x @ (rng.standard_normal((x.shape[1], int(sketch_dimension))) / np.sqrt(sketch_dimension))
    lam, vec = np.linalg.eigh(x.T @ x)
    if lam.size == 0 or lam[-1] <= 0:
        return np.zeros(x.shape[0])
    keep = lam > rtol * lam[-1]
    y = x @ vec[:, keep]
    return np.einsum("nr,nr->n", y, y / lam[keep])


def unrotate(keys: np.ndarray, positions: np.ndarray, spec: RopeSpec) -> np.ndarray:
    """Pre-RoPE keys (..., n, d) from cached ones at `positions`.

    llama.cpp caches m R(p) k on the rotated pairs, m = ``rope.magnitude`` (YaRN's mscale times the
    file's attention factor, ``rope_model``); R(-p) applied the same way scales by m again, so the
    rotated pairs are divided by m², while dimensions past n_dims (partial rotary) were never scaled.
    Exact leverage would not see a stray m² (it is invariant to rescaling the dimensions), but the
    sketch K Φ does wherever m² reweights some dimensions against others (a partial rotary)."""
    out = apply_rope(keys, -np.asarray(positions), spec)
    m2 = magnitude(spec) ** 2
    if m2 != 1.0:
        a, b = pair_indices(spec)
        out[..., a] /= m2
        out[..., b] /= m2
    return out


def zscore(x: np.ndarray) -> np.ndarray:
    """(x - mean) / std over the whole array (std floored at 1e-6, as kvpress)."""
    return (x - x.mean()) / max(float(x.std()), 1e-6)


def score(
    view: CellView,
    *,
    sketch_dimension: int | None = 48,
    attention: bool = True,
    blending: float = 0.35,
    window_size: int | None = None,
    n_sink: int = 8,
    aggregate: str = "mean",
    layers: Iterable[int] | None = None,
) -> np.ndarray:
    """(n,) Compactor score per cell: z(window attention · ‖v‖) + blending · z(key leverage)."""
    rng = np.random.default_rng(view.seed)
    pos = np.asarray(view.positions)
    sel = pos >= n_sink
    if attention:
        idx = window(view, window_size)
        qpos = np.asarray(view.query_positions)[idx]
    per_layer = []
    for l in use_layers(view, layers, ["keys", "rope"] + (["values", "queries"] if attention else [])):
        keys = np.asarray(view.keys[l], dtype=np.float64)[sel]
        n_kv = keys.shape[1]
        out = np.zeros((n_kv, view.n))
        if sel.any():
            pre = unrotate(keys.transpose(1, 0, 2), pos[sel], view.rope[l])  # (n_kv, n', d)
            lev = np.stack([leverage_scores(pre[j], sketch_dimension, rng) for j in range(n_kv)])
            layer = blending * zscore(lev) if attention else zscore(lev)
            if attention:
                vnorm = np.linalg.norm(np.asarray(view.values[l], dtype=np.float64)[sel], axis=-1)  # (n', n_kv)
                att = np.empty_like(lev)
                for j, a in group_attention(np.asarray(view.queries[l])[idx], qpos, keys, pos[sel],
                                            view.rope[l], view.attn_scale):
                    att[j] = pool1d(a.sum(axis=1).mean(axis=0) * vnorm[:, j], 3, "avg")
                layer = layer + zscore(att)
            out[:, sel] = layer
            out[:, ~sel] = layer.max()
        per_layer.append(out)
    return aggregate_scores(per_layer, aggregate)


POLICY = Policy(
    name="compactor",
    description="approximate leverage of the pre-RoPE keys, blended with window attention times value norm",
    paper="Chari & Van Durme 2025, Compactor: Calibrated Query-Agnostic KV Cache Compression with Approximate Leverage Scores, arXiv 2507.08143 (kvpress CompactorPress)",
    score=score,
    needs_values=True,
    needs_queries=True,
)
