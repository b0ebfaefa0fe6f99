"""TOVA (Oren et al. 2024, "Transformers are Multi-State RNNs", arXiv 2401.06104): keep the
cells the LAST query attends to most, attention averaged over all heads of a layer (as
TOVA and kvpress' ``TOVAPress``), then averaged over layers.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from ea_local.policies.base import CellView, Policy, RopeSpec
from ea_local.policies.common import aggregate_scores, newest_query_index, use_layers
from ea_local.policies.snapkv import group_attention


def tova_layer(
    query: np.ndarray,
    query_position: int,
    keys: np.ndarray,
    key_positions: np.ndarray,
    rope: RopeSpec,
    scale: float | None = None,
) -> np.ndarray:
    """(n,) attention of one pre-RoPE query (n_head, d) at ``query_position``, mean over all heads."""
    q = np.asarray(query)[None]
    qpos = np.asarray([query_position])
    heads = [attn[:, 0, :] for _, attn in group_attention(q, qpos, keys, key_positions, rope, scale)]
    return np.concatenate(heads, axis=0).mean(axis=0)


def score(view: CellView, *, aggregate: str = "mean", layers: Iterable[int] | None = None) -> np.ndarray:
    """(n,) TOVA score per cell. With a probed question the last query is the question's last token,
    as in kvpress, where the question ends the context. The engine's greedy answer tokens after it
    (``CellView.pseudo_queries``) are skipped: the last of them comes after the answer and no longer
    looks for it (the multi-key needle: 13/80 with it, 53/80 without, docs/bench-report.md)."""
    last = newest_query_index(view)
    qpos = int(np.asarray(view.query_positions)[last])
    per_layer = [
        tova_layer(np.asarray(view.queries[l])[last], qpos, view.keys[l], view.positions, view.rope[l], view.attn_scale)
        for l in use_layers(view, layers, ["keys", "queries", "rope"])
    ]
    return aggregate_scores(per_layer, aggregate)


POLICY = Policy(
    name="tova",
    description="attention of the last query, averaged over heads",
    paper="Oren et al. 2024, Transformers are Multi-State RNNs (TOVA), arXiv 2401.06104",
    score=score,
    needs_queries=True,
)
