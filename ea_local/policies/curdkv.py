"""CurDKV (Sengupta, Chaudhary & Chakraborty 2025, "Value-Guided KV Compression for LLMs via
Approximated CUR Decomposition", arXiv 2509.15038; as NVIDIA kvpress' ``CURPress``): keep the
rows that a CUR decomposition of the keys and values would select, by their leverage.

Per layer and KV head, the CUR row-sampling leverage of a matrix X (keys or values) is
approximated by its squared row norms, ℓ_i = ‖x_i‖² / Σ_j ‖x_j‖² (optionally after a
Gaussian projection X G, G (d, r) ~ N(0, 1/r): ``projection_dim`` r, kvpress' 20 when on);
with ``local_window`` w (16 by default, as kvpress) the normalisation runs over consecutive
blocks of w cells instead of all of them. The key and value scores are combined by
``combine`` ("kv_product" ℓ^K·ℓ^V by default, "kv_avg", "key", "value") and normalised to
sum 1. Queries are not used. Norms are rotation invariant, so post-RoPE keys serve.
Layers and KV heads are reduced with ``aggregate``.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from ea_local.policies.base import CellView, Policy
from ea_local.policies.common import aggregate_scores, use_layers

COMBINES = ("kv_product", "kv_avg", "key", "value")


def row_leverage(x: np.ndarray, local_window: int | None = 16, proj: np.ndarray | None = None) -> np.ndarray:
    """(n,) squared row norms of x (n, d) (or of x @ proj), normalised over blocks of ``local_window`` rows."""
    x = np.asarray(x, dtype=np.float64)
    if proj is not None:
        x = x @ proj
    r = np.einsum("nd,nd->n", x, x)
    n = r.shape[0]
    w = n if not local_window else int(local_window)
    starts = np.arange(0, n, w)
    tot = np.add.reduceat(r, starts) if n else r
    tot = np.repeat(tot, np.diff(np.append(starts, n)))
    return r / np.where(tot > 0, tot, 1.0)


def curdkv_head(
    keys: np.ndarray,
    values: np.ndarray,
    *,
    combine: str = "kv_product",
    local_window: int | None = 16,
    proj_k: np.ndarray | None = None,
    proj_v: np.ndarray | None = None,
) -> np.ndarray:
    """(n,) CurDKV score of one KV head from its keys (n, d_k) and values (n, d_v); sums to 1."""
    if combine not in COMBINES:
        raise ValueError(f"unknown combine {combine!r}; choose from: {', '.join(COMBINES)}")
    if combine == "key":
        s = row_leverage(keys, local_window, proj_k)
    elif combine == "value":
        s = row_leverage(values, local_window, proj_v)
    else:
        k2, v2 = row_leverage(keys, local_window, proj_k), row_leverage(values, local_window, proj_v)
        s = k2 * v2 if combine == "kv_product" else (k2 + v2) / 2
    tot = s.sum()
    return s / tot if tot > 0 else s


def score(
    view: CellView,
    *,
    combine: str = "kv_product",
    local_window: int | None = 16,
    projection_dim: int | None = None,
    aggregate: str = "mean",
    layers: Iterable[int] | None = None,
) -> np.ndarray:
    """(n,) CurDKV score per cell, aggregated over layers and KV heads."""
    rng = np.random.default_rng(view.seed)
    per_layer = []
    for l in use_layers(view, layers, ["keys", "values"]):
        k, v = np.asarray(view.keys[l]), np.asarray(view.values[l])
        pk = pv = None
        if projection_dim is not None:
            r = int(projection_dim)
            pk = rng.standard_normal((k.shape[-1], r)) / np.sqrt(r)
            pv = rng.standard_normal((v.shape[-1], r)) / np.sqrt(r)
        per_layer.append(np.stack([
            curdkv_head(k[:, j], v[:, j], combine=combine, local_window=local_window, proj_k=pk, proj_v=pv)
            for j in range(k.shape[1])
        ]))
    return aggregate_scores(per_layer, aggregate)


POLICY = Policy(
    name="curdkv",
    description="CUR leverage (squared row norms, local blocks) of keys times that of values",
    paper="Sengupta, Chaudhary & Chakraborty 2025, Value-Guided KV Compression for LLMs via Approximated CUR Decomposition (CurDKV), arXiv 2509.15038 (kvpress CURPress)",
    score=score,
    needs_values=True,
)
