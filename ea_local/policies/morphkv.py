"""MorphKV (Ghadia, Kumar, Jain, Nair & Das 2025, "Dialogue Without Limits: Constant-Sized KV
Caches for Extended Responses in LLMs", ICML 2025, arXiv 2503.00979): at every decoding step
keep the recent window and the distant tokens that the recent window's queries attend to most.

Per layer and query head, as the MorphKV code (``morphkv_mask``) does: the window queries'
attention is a softmax over the *distant* cells only (positions before the first window
query), then fused over the window queries by ``fusion``: "max" (each cell's largest
attention from any window query; the long-response setting of the paper's LongGenBench runs)
or "sum" (its LongBench runs). The query heads of a KV group are averaged (the MorphKV code
instead sums the group's logits before the softmax). The window's own cells are always kept
by MorphKV; here they get the largest score the fusion can give (1 for max, m for sum over m
queries), so they survive even if the engine's protected window is shorter. Layers and KV
heads are reduced with ``aggregate``.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from ea_local.policies.base import CellView, Policy, RopeSpec
from ea_local.policies.snapkv import group_attention, over_window

FUSIONS = ("max", "sum")


def morphkv_layer(
    queries: np.ndarray,
    query_positions: np.ndarray,
    keys: np.ndarray,
    key_positions: np.ndarray,
    rope: RopeSpec,
    *,
    fusion: str = "max",
    scale: float | None = None,
) -> np.ndarray:
    """(n_kv_head, n) fused attention of the window queries (m, n_head, d) over the distant cells."""
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; choose from: {', '.join(FUSIONS)}")
    key_positions = np.asarray(key_positions)
    distant = key_positions < np.min(query_positions)
    out = np.full((keys.shape[1], keys.shape[0]), 1.0 if fusion == "max" else float(len(query_positions)))
    if distant.any():
        # every window query sees every distant cell: the causal softmax over them is MorphKV's restricted one
        for j, attn in group_attention(queries, query_positions, np.asarray(keys)[distant],
                                       key_positions[distant], rope, scale):
            fused = attn.max(axis=1) if fusion == "max" else attn.sum(axis=1)  # (group, n_distant)
            out[j, distant] = fused.mean(axis=0)
    return out


def score(
    view: CellView,
    *,
    window_size: int | None = 32,
    fusion: str = "max",
    aggregate: str = "mean",
    layers: Iterable[int] | None = None,
) -> np.ndarray:
    """(n,) MorphKV score per cell; the window is the last ``window_size`` captured queries (all if None)."""
    return over_window(view, window_size, layers, ["keys", "queries", "rope"], aggregate, lambda l, q, qpos: morphkv_layer(
        q, qpos, view.keys[l], view.positions, view.rope[l], fusion=fusion, scale=view.attn_scale))


POLICY = Policy(
    name="morphkv",
    description="distant cells most attended (max or sum) by the recent-window queries",
    paper="Ghadia et al. 2025, Dialogue Without Limits: Constant-Sized KV Caches for Extended Responses in LLMs (MorphKV), ICML 2025, arXiv 2503.00979",
    score=score,
    needs_queries=True,
)
