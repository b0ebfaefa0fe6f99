"""OBCache, Optimal Brain Cache (Gu, Liang, Zhao & Diao 2025, "OBCache: Optimal Brain KV Cache
Pruning for Efficient Long-Context LLM Inference", arXiv 2510.07651): rank a cell by how much
pruning it perturbs the attention outputs of the observation-window queries (Optimal Brain
Damage on one attention layer), not by its attention alone.

Per query head, with a_qi the causal attention of window query q to cell i, z_qi = s q·k_i
its logit, v_i the value and o_q = Σ_i a_qi v_i the query's output, the closed forms (as in
the authors' code, ``OBCScoreTracker`` with p = 2) are

    value  (drop v_i):          Σ_q a_qi² ‖v_i‖²
    key    (k_i -> 0, 1st order): Σ_q a_qi² z_qi² ‖v_i - o_q‖²
    joint  (drop both):         Σ_q a_qi² ‖v_i + z_qi (v_i - o_q)‖²  = value + key + 2 Σ_q a_qi² z_qi v_i·(v_i - o_q)

``saliency`` picks one ("value", the variant of the authors' example, by default). Sums run
over the window queries (the paper's perturbation window; the authors accumulate them over
decoding, this is the stateless window version). The query heads of a KV group are averaged,
then layers and KV heads are reduced with ``aggregate``.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from ea_local.policies.base import CellView, Policy, RopeSpec
from ea_local.policies.common import kv_group
from ea_local.policies.snapkv import group_attention, over_window
from ea_local.model.rope import apply_rope

SALIENCIES = ("value", "key", "joint")


def obcache_layer(
    queries: np.ndarray,
    query_positions: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
    key_positions: np.ndarray,
    rope: RopeSpec,
    *,
    saliency: str = "value",
    scale: float | None = None,
) -> np.ndarray:
    """(n_kv_head, n) OBCache saliency of one layer; queries (m, n_head, d) pre-RoPE, keys/values per KV head."""
    if saliency not in SALIENCIES:
        raise ValueError(f"unknown saliency {saliency!r}; choose from: {', '.join(SALIENCIES)}")
    keys = np.asarray(keys, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    s = 1.0 / np.sqrt(keys.shape[-1]) if scale is None else float(scale)
    g = kv_group(queries.shape[1], keys.shape[1])
    if saliency != "value":  # the logits z need the RoPE'd queries
        q = apply_rope(np.asarray(queries, dtype=np.float64).transpose(1, 0, 2), query_positions, rope)
    out = np.empty((keys.shape[1], keys.shape[0]))
    for j, a in group_attention(queries, query_positions, keys, key_positions, rope, scale):  # a (g, m, n)
        v = values[:, j, :]
        v2 = np.einsum("nd,nd->n", v, v)
        a2 = a * a
        sal = a2.sum(axis=1) * v2  # value term, (g, n)
        if saliency != "value":
            z = s * (q[j * g:(j + 1) * g] @ keys[:, j, :].T)  # (g, m, n)
            o = a @ v  # (g, m, d_v)
            vo = o @ v.T  # v_i·o_q, (g, m, n)
            vmo2 = np.maximum(v2 + np.einsum("gmd,gmd->gm", o, o)[..., None] - 2.0 * vo, 0.0)  # ‖v_i - o_q‖²
            key_term = (a2 * z * z * vmo2).sum(axis=1)
            sal = key_term if saliency == "key" else sal + key_term + 2.0 * (a2 * z * (v2 - vo)).sum(axis=1)
        out[j] = sal.mean(axis=0)
    return out


def score(
    view: CellView,
    *,
    saliency: str = "value",
    window_size: int | None = None,
    aggregate: str = "mean",
    layers: Iterable[int] | None = None,
) -> np.ndarray:
    """(n,) OBCache saliency per cell over the last ``window_size`` captured queries (all if None)."""
    need = ["keys", "values", "queries", "rope"]
    return over_window(view, window_size, layers, need, aggregate, lambda l, q, qpos: obcache_layer(
        q, qpos, view.keys[l], view.values[l], view.positions, view.rope[l], saliency=saliency, scale=view.attn_scale))


POLICY = Policy(
    name="obcache",
    description="output-aware saliency: attention-output change when a cell's value (or key) is pruned",
    paper="Gu, Liang, Zhao & Diao 2025, OBCache: Optimal Brain KV Cache Pruning for Efficient Long-Context LLM Inference, arXiv 2510.07651",
    score=score,
    needs_values=True,
    needs_queries=True,
)
