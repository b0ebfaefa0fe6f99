"""`none`: the full cache, no eviction — the reference every policy is measured against.

The session sizes its context to the budget (budget = the context the user asked for) and
refuses, with a BudgetError, any token that would not fit, as llama.cpp does with context
shift disabled (`--no-context-shift`); nothing is ever scored.
"""
from __future__ import annotations

import numpy as np

from ea_local.policies.base import CellView, Policy


def score(view: CellView) -> np.ndarray:
    """Never called by the engine (Policy.evicts is False): there is nothing to score."""
    raise ValueError("the 'none' policy keeps every cell: it has nothing to score")


POLICY = Policy(
    name="none",
    description="full cache, no eviction: refuses to run past its context (= the budget)",
    paper="baseline (llama.cpp with --no-context-shift)",
    score=score,
    needs_keys=False,
    evicts=False,
)
