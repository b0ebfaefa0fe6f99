"""StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks",
arXiv 2309.17453): keep the attention sinks and the most recent tokens.

The score is the cell's position, so the newest cells rank highest; the engine protects
the sinks (as for every policy).
"""
from __future__ import annotations

import numpy as np

from ea_local.policies.base import CellView, Policy


def score(view: CellView) -> np.ndarray:
    """(n,) the cell positions as float64: higher = more recent = keep."""
    return np.asarray(view.positions, dtype=np.float64).copy()


POLICY = Policy(
    name="streaming-llm",
    description="keep the attention sinks and the most recent tokens",
    paper="Xiao et al. 2023, Efficient Streaming Language Models with Attention Sinks, arXiv 2309.17453",
    score=score,
    needs_keys=False,
)
