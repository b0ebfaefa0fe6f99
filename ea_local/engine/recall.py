"""Scoring cells against a new message, for recall from the archive (engine/archive.py).

A new user message knows what it needs: its own queries, rotated at their positions, are dotted with
the keys of the live cells and of the archived cells together (one softmax over both, per query and
head, as attention would see them if every cell were in the cache). A cell's score is the largest
attention share any of the message's queries gives it, over heads and scored layers: a fact the
message asks about gets a high share from the few queries that look for it, even if the average
query ignores it (the exact per-query attention, not Expected Attention's Gaussian average, which
dilutes a question's few decisive queries). That share is then divided by the share the queries just
before the message gave the cell (`contrast`): without it the recent past and the turn markers, which
every message's local heads attend, outrank the fact a message asks about.

Pure numpy: no llama.cpp here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from ..policies.common import kv_group
from ..model.rope import apply_rope

if TYPE_CHECKING:
    from ..policies.base import RopeSpec


def rotate_queries(q: np.ndarray, positions: np.ndarray, spec: RopeSpec) -> np.ndarray:
    """(m, n_head, d) pre-RoPE queries rotated at their positions, as llama.cpp rotates Qcur."""
    return np.swapaxes(apply_rope(np.swapaxes(q, 0, 1), positions, spec), 0, 1)


def max_attention_share(q_rot: np.ndarray, keys: np.ndarray | Sequence[np.ndarray], scale: float) -> np.ndarray:
    """(n,) max over queries and heads of softmax_n(scale * q . k): q_rot (m, n_head, d) post-RoPE,
    keys (n, n_kv_head, d) post-RoPE, or a sequence of such blocks (the live cells and the archive) scored
    under one softmax as if concatenated; query head h reads KV head h // (n_head / n_kv_head) (llama.cpp)."""
    blocks = [keys] if isinstance(keys, np.ndarray) else list(keys)
    m, h, d = q_rot.shape
    n = sum(len(b) for b in blocks)
    if n == 0 or m == 0:
        return np.zeros(n)
    g = kv_group(h, blocks[0].shape[1])
    best = np.zeros(n, dtype=np.float32)
    edges = np.cumsum([0] + [len(b) for b in blocks])
    for j in range(blocks[0].shape[1]):
        qj = np.ascontiguousarray(q_rot[:, j * g:(j + 1) * g].reshape(m * g, d), dtype=np.float32) * np.float32(scale)
        zs = [qj @ np.asarray(b[:, j], dtype=np.float32).T for b in blocks]  # (m*g, n_b) each
        top = np.max([z.max(axis=1) for z in zs], axis=0)[:, None]
        total = np.zeros((m * g, 1), dtype=np.float32)
        for z in zs:  # in place: these are the big arrays
            z -= top
            np.exp(z, out=z)
            total += z.sum(axis=1, keepdims=True)
        inv = 1.0 / total
        for z, a, b in zip(zs, edges[:-1], edges[1:]):
            z *= inv
            np.maximum(best[a:b], z.max(axis=0), out=best[a:b])
    return best.astype(np.float64)


def message_scores(queries: Mapping[int, np.ndarray], q_pos: np.ndarray,
                   keys: Mapping[int, np.ndarray | Sequence[np.ndarray]], rope: Mapping[int, RopeSpec],
                   scale: float | None) -> np.ndarray:
    """(n,) per-cell score: max over the layers in `keys` of max_attention_share of the message's
    queries (pre-RoPE, (m, n_head, d) per layer, at positions q_pos) against keys (n, n_kv_head, d),
    or blocks of them under one softmax."""
    out = None
    for il, k in keys.items():
        q = queries[il]
        s = scale if scale is not None else 1.0 / np.sqrt(q.shape[-1])
        share = max_attention_share(rotate_queries(q, q_pos, rope[il]), k, s)
        out = share if out is None else np.maximum(out, share)
    if out is None:
        raise ValueError("no layer to score")
    return out


# a share below this counts as no attention in the baseline: 1e-3 is ~2 cells' uniform share of a 2k
# cache; set on the tuning chats (docs/recall.md), with 1e-2 ranking the facts lower
CONTRAST_FLOOR = 1e-3


def contrast(message: np.ndarray, baseline: np.ndarray, floor: float = CONTRAST_FLOOR) -> np.ndarray:
    """How much more the message attends each cell than the queries just before it did:
    message / (baseline + floor). Cells every turn attends (sinks, the recent past, the turn markers)
    score about 1 whatever their share; a cell only this message looks for scores high (the lift of
    the message over the conversation, as in pointwise mutual information)."""
    return np.asarray(message, dtype=np.float64) / (np.asarray(baseline, dtype=np.float64) + floor)


def asked_scores(queries: Mapping[int, np.ndarray], q_pos: np.ndarray, base_queries: Mapping[int, np.ndarray],
                 base_pos: np.ndarray, keys: Mapping[int, np.ndarray | Sequence[np.ndarray]],
                 rope: Mapping[int, RopeSpec], scale: float | None) -> np.ndarray:
    """(n,) what a message asks for: message_scores of its queries, over those of the queries just
    before it (`contrast`) when there are any."""
    scores = message_scores(queries, q_pos, keys, rope, scale)
    if not len(base_pos):
        return scores
    return contrast(scores, message_scores(base_queries, base_pos, keys, rope, scale))
