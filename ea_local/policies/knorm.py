"""KNorm: keep the keys with LOW L2 norm (Devoto, Zhao, Scardapane & Minervini 2024,
"A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression", arXiv 2406.11430).

kvpress (``KnormPress``) scores -‖k‖ per head; llama.cpp cells are shared, so we take
minus the mean key norm over the chosen layers and KV heads.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from ea_local.policies.base import CellView, Policy
from ea_local.policies.common import use_layers


def score(view: CellView, *, layers: Iterable[int] | None = None) -> np.ndarray:
    """(n,) -mean_{layers, kv heads} ‖k‖₂; higher = smaller key norm = keep."""
    norms = [np.linalg.norm(np.asarray(view.keys[l], dtype=np.float64), axis=-1) for l in use_layers(view, layers, ["keys"])]
    return -np.mean(np.concatenate(norms, axis=1), axis=1)


POLICY = Policy(
    name="knorm",
    description="keep the keys with the lowest L2 norm",
    paper="Devoto et al. 2024, A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression, arXiv 2406.11430",
    score=score,
)
