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

The helpers it shares with the attention-based baselines (``softmax``, ``use_layers``,
``aggregate_scores``, ``pool1d``, ``kv_group``) live in ``common.py``.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from ea_local.policies.base import CellView, Policy, RopeSpec
from ea_local.policies.common import aggregate_scores, kv_group, newest_query_index, pool1d, softmax, use_layers
from ea_local.model.rope import mean_rotate


def query_statistics(q: np.ndarray, use_covariance: bool = True, weights: np.ndarray | None = None,
                     dtype: type = np.float64) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-head mean (n_head, d) and covariance divided by N (n_head, d, d) of q (m, n_head, d).

    weights (m,): a weighted sample (normalised here); the statistics of the mixture of the
    weighted windows, μ = Σ w q, Σ = Σ w (q - μ)(q - μ)ᵀ. dtype: of the computation and the result."""
    q = np.asarray(q, dtype=dtype)
    if q.ndim != 3 or q.shape[0] == 0:
        raise ValueError(f"queries must be (m>0, n_head, d), got {q.shape}")
    w = np.full(q.shape[0], 1.0 / q.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (q.shape[0],) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be ({q.shape[0]},) non-negative with a positive sum")
    w = (w / w.sum()).astype(dtype)
    mu = np.tensordot(w, q, axes=1)
    if not use_covariance:
        return mu, None
    c = (q - mu).transpose(1, 0, 2)  # (n_head, m, d)
    return mu, (c.transpose(0, 2, 1) @ (c * w[None, :, None]))  # batched GEMM: Σ_h = c_hᵀ diag(w) c_h


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


def query_factor(q: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, bool]:
    """Per-head mean μ (n_head, d) and an operand M for the quadratic term, and whether it is a factor.

    With m ≤ d queries, M (n_head, m, d) is the weighted, centred queries, a factor of the
    covariance (Σ_h = M_hᵀ M_h, so kᵀΣk = ‖M k‖², m columns instead of d); with more, M = Σ
    itself (n_head, d, d), which ``expected_logits_fast`` factors (Cholesky) into at most d columns.
    float32 throughout, as the scoring GEMM: the scores only rank cells, and float64 statistics of a
    512-query window cost as much as the GEMM (measured: z within 1e-5 of the float64 statistics')."""
    q = np.asarray(q, dtype=np.float32)
    m, _, d = q.shape
    if m > d:
        mu, cov = query_statistics(q, True, weights, np.float32)
        return mu, cov, False
    mu, _ = query_statistics(q, False, weights, np.float32)
    w = np.full(m, 1.0 / m) if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)
    return mu, ((q - mu) * np.sqrt(w).astype(np.float32)[:, None, None]).transpose(1, 0, 2), True


def cholesky_factor(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower-triangular L_h (float32) with L_h L_hᵀ = Σ_h + δ_h I, and δ (n_head,), for symmetric PSD cov.

    The jitter δ_h (from 1e-6 of Σ_h's mean eigenvalue, ×10 while float32 rounding leaves Σ a little
    indefinite) makes a singular Σ factorable (a window that never used a direction, RoPE's averaging
    shrinking a pair to nothing); kᵀΣk = ‖L_hᵀk‖² − δ_h‖k‖² stays exact."""
    c = cov.astype(np.float64)
    if not np.isfinite(c).all():
        raise ValueError("query covariance is not finite (non-finite queries)")
    d = c.shape[-1]
    base = np.maximum(np.trace(c, axis1=1, axis2=2) / d, np.finfo(np.float32).tiny)
    for rel in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2):
        delta = rel * base
        try:
            return np.linalg.cholesky(c + delta[:, None, None] * np.eye(d)).astype(np.float32), delta
        except np.linalg.LinAlgError:
            continue
    raise ValueError("query covariance is not positive semi-definite")


def expected_logits_fast(mu: np.ndarray, op: np.ndarray | None, factored: bool, keys: np.ndarray,
                         scale: float, block: int = 32, chunk: int = 2048) -> np.ndarray:
    """z (n_head, n) = s μ'·k + ½ s² kᵀΣ'k, the same z as ``expected_logits``, with the rotated operand
    of ``query_factor`` (op None: no covariance term).

    keys (n, n_kv_head, d) float32, in float32 (the scores only rank cells; float64 doubles the time of
    the largest product). A factor M: kᵀΣ'k = ‖M k‖², one GEMM per KV group against its heads' μ' and
    factors stacked. A full Σ': kᵀΣ'k = ‖Lᵀk‖² with L its Cholesky factor; L is lower-triangular, so
    column block b of k L needs only k's columns from b on. In blocks of ``block`` columns that is
    (nb + 1) / 2nb of the dense product's flops (56% at d = 256), with every product a plain GEMM;
    ``chunk`` cells at a time keep each block's product in cache for the sum of squares."""
    n_head, d = mu.shape
    n_kv, n = keys.shape[1], keys.shape[0]
    g = kv_group(n_head, n_kv)
    z = np.empty((n_head, n))
    if op is not None and not factored:
        chol, delta = cholesky_factor(op)
    for j in range(n_kv):
        heads = slice(j * g, (j + 1) * g)
        k = keys[:, j, :]
        mean_cols = mu[heads].T.astype(np.float32)
        if op is None:
            z[heads] = scale * (k @ mean_cols).T
            continue
        if factored:  # (row offset, operand): μ' with the first block, then the quadratic term's blocks
            blocks = [(0, np.concatenate([mean_cols, op[heads].reshape(g * op.shape[1], d).T.astype(np.float32)], 1))]
        else:
            lower = chol[heads]  # (g, d, d)
            blocks = [(lo, lower[:, lo:, lo:lo + block].transpose(1, 0, 2).reshape(d - lo, -1)) for lo in range(0, d, block)]
            blocks[0] = (0, np.concatenate([mean_cols, blocks[0][1]], axis=1))
        quad = np.zeros((g, n), dtype=np.float32)
        for c0 in range(0, n, chunk):
            kc, part = k[c0:c0 + chunk], slice(c0, c0 + chunk)
            for lo, o in blocks:
                y = kc[:, lo:] @ o
                if lo == 0:
                    z[heads, part] = scale * y[:, :g].T
                    y = y[:, g:]
                y = y.reshape(y.shape[0], g, -1)
                quad[:, part] += np.einsum("ngc,ngc->gn", y, y)
        if not factored:
            quad -= delta[heads, None].astype(np.float32) * np.einsum("nc,nc->n", k, k)[None, :]
        z[heads] += 0.5 * scale**2 * quad
    return z


def expected_attention_layer(
    queries: np.ndarray,
    keys: np.ndarray,
    value_norms: np.ndarray | None,
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

    queries (m, n_head, d) pre-RoPE; keys (n, n_kv_head, d) post-RoPE; value_norms (n, n_kv_head),
    the L2 norms of the value rows (needed only with use_vnorm); scale None -> 1/sqrt(d).
    """
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    d = keys.shape[-1]
    s = 1.0 / np.sqrt(d) if scale is None else float(scale)
    # statistics of the rotated queries R̄q are μ' = R̄μ and Σ' = R̄ΣR̄ᵀ; rotating the m queries is O(m d)
    queries = mean_rotate(np.asarray(queries, dtype=np.float32), rope, next_pos, n_future_positions)
    if use_covariance:
        mu, op, factored = query_factor(queries, weights)
    else:
        (mu, op), factored = query_statistics(queries, False, weights), False
    a = softmax(expected_logits_fast(mu, op, factored, keys, s), axis=-1)  # (n_head, n)
    n_kv = keys.shape[1]
    a = a.reshape(n_kv, -1, keys.shape[0]).mean(axis=1)  # heads j*g .. j*g+g-1 -> KV head j
    if use_vnorm:
        if value_norms is None:
            raise ValueError("use_vnorm needs the value norms")
        return (a + epsilon) * np.asarray(value_norms, dtype=np.float64).T  # (n_kv, n)
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
    newest_query: bool = True,
) -> np.ndarray:
    """(n,) Expected Attention per cell, aggregated over the chosen layers and KV heads.

    ``aggregate`` "union" (default): kvpress evicts each layer and KV head on its own; with cells
    shared by every layer, a cell is kept if any layer ranks it high. Measured against "mean" on the
    default model (docs/quality.md, "Levers"): pass key 8k -> 25% question-agnostic 5/5 vs 4/5
    (held-out depths 3/4 vs 2/4), perplexity the same within noise at 25% and 12.5%.

    ``kernel_size`` > 1 max-pools the scores over that many neighbouring live cells (SnapKV's
    pooling, not in kvpress' EA): a fact spans several tokens, and keeping the whole span is
    what lets the model read it back. The session sets 7 on models whose every layer is evicted,
    where the report preset measured it to help (docs/bench-report.md, "Pooling over 5 cells" and
    "Pooling over 7 cells").
    ``layers`` None: every layer with keys, queries and rope in the view (and values if use_vnorm).
    Queries at positions < ``n_sink`` are left out of the statistics.

    Cells at positions < ``n_sink`` (the sinks, kept by the engine anyway) are left out of the
    softmax and get every row's maximum + 1 afterwards, as kvpress pads them after scoring
    (``sinks_in_softmax`` False). Inside the softmax (True) they would take a share of each query
    head's mass that varies by head, and so reweight the heads of a KV group against each other.

    ``newest_query`` (not in kvpress' EA): the newest query the model read (the context's last token,
    or a probed question's last one) adds its own rows, the same formula with that one query (no
    covariance), to the rows being aggregated. A Gaussian fitted to a window of hundreds of queries
    averages away what the newest one looks for: in a haystack of filler every query but the last
    reads the filler, and the needles' digits rank low. Measured on the multi-key needle
    (docs/bench-report.md, "The newest query"): question-agnostic on Gemma 3, 8/80 -> 33/80 at 25%.
    """
    chosen = use_layers(view, layers, ["keys", "queries", "rope"])
    if use_vnorm:
        missing = [l for l in chosen if not view.has_vnorms(l)]
        if missing and layers is not None:
            raise ValueError(f"layers {missing} have no values in the view")
        chosen = [l for l in chosen if view.has_vnorms(l)]
        if not chosen:
            raise ValueError("the view has no layer with keys, queries, rope and values")
    positions = np.asarray(view.positions)
    sinks = np.zeros(positions.shape[0], dtype=bool) if sinks_in_softmax else positions < n_sink
    k0 = int(sinks.sum())
    # cells come in position order, so the sinks are first: a slice, not a copy of every layer's keys
    scored = slice(k0, None) if not sinks[k0:].any() else ~sinks
    newest = newest_query_index(view) if newest_query else None

    def rows(l: int, q: np.ndarray, w: np.ndarray | None, covariance: bool) -> np.ndarray:
        """(n_kv_head, n) scores of layer l from queries q, the sinks padded above the rest."""
        out = np.zeros((view.keys[l].shape[1], positions.shape[0]))
        if not sinks.all():
            out[:, scored] = expected_attention_layer(
                q, np.asarray(view.keys[l])[scored], view.vnorms(l)[scored] if use_vnorm else None,
                view.rope[l], view.next_pos, n_future_positions=n_future_positions, use_covariance=covariance,
                use_vnorm=use_vnorm, epsilon=epsilon, scale=view.attn_scale, weights=w)
        out[:, sinks] = out.max(axis=1, keepdims=True) + 1.0
        return out

    per_layer = []
    for l in chosen:
        per_layer.append(rows(l, *_stat_queries(view, l, n_sink), use_covariance))
        if newest is not None:
            per_layer.append(rows(l, np.asarray(view.queries[l])[[newest]], None, False))
    evictable = positions >= n_sink
    scores = aggregate_scores(per_layer, aggregate, evictable=evictable)
    if kernel_size != 1:  # pooled among the evictable cells, so the sinks' padding does not spread to their neighbours
        scores[evictable] = pool1d(scores[evictable], kernel_size, "max")
    return scores


POLICY = Policy(
    name="expected-attention",
    description="expected attention of future queries (Gaussian queries, averaged RoPE), times value norm",
    paper="Devoto, Jeblick & Jégou 2025, Expected Attention, arXiv 2510.00636 (kvpress ExpectedAttentionPress)",
    score=score,
    needs_value_norms=True,
    needs_queries=True,
)
