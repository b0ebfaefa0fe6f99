"""Helpers every attention-based policy shares: a stable softmax, the layers to score, the
reduction of per-layer scores to one per cell, pooling along the cells, and the GQA grouping.

They are not part of any one formula; each policy module imports what it needs from here.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ea_local.policies.base import CellView

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


def window(view: CellView, window_size: int | None) -> np.ndarray:
    """Indices of the captured queries to use: the last ``window_size`` by position (all if None)."""
    if view.query_positions is None:
        raise ValueError("this policy needs query_positions to apply RoPE to the captured queries")
    order = np.argsort(np.asarray(view.query_positions), kind="stable")
    return order if window_size is None else order[-int(window_size):]


def newest_query_index(view: CellView) -> int:
    """Index of the newest captured query the model read: the probed question's answer tokens
    (``CellView.pseudo_queries``, the newest) are skipped unless they are all there is."""
    order = window(view, None)
    return int(order[-1 - view.pseudo_queries] if len(order) > view.pseudo_queries else order[-1])


def aggregate_scores(per_layer: Sequence[np.ndarray], how: str = "mean",
                     evictable: np.ndarray | None = None) -> np.ndarray:
    """Reduce per-layer (n_kv_head, n) (or (n,)) scores to (n,) over layers and heads.

    "mean", "max"; "share": the mean of each row divided by its sum over the `evictable` cells (all
    if None), so that every layer and head votes with the same weight. Without it, a layer whose
    attention goes mostly to the sinks (kept anyway), or whose values are small, hardly counts.
    "union": the best rank a cell has in any row (rank / n, ties share a rank), so keeping the top k
    keeps the union of every layer's and head's own best cells — what evicting each layer on its own
    (as kvpress does) would keep, when all layers must share one set of cells. Below a budget that holds
    every row's favourites the best ranks tie, and the engine evicts the older of equal cells: breaking
    the ties by the mean rank instead lost pass keys (docs/bench-report.md, "Ties in the union").
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
    if x.shape[-1] == 0:  # nothing to pool (a view of sinks only); the window view needs kernel_size cells
        return np.array(x, dtype=np.float64)
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
