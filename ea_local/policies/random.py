"""Random eviction: the floor every policy must beat.

Scores are drawn from a generator seeded by (``seed`` or ``view.seed``, ``view.next_pos``):
reproducible for a given seed, and fresh at each eviction event (the next position differs).
"""
from __future__ import annotations

import numpy as np

from ea_local.policies.base import CellView, Policy


def score(view: CellView, *, seed: int | None = None) -> np.ndarray:
    """(n,) uniform scores in [0, 1)."""
    s = view.seed if seed is None else seed
    rng = np.random.default_rng([int(s), int(view.next_pos)])
    return rng.random(view.n)


POLICY = Policy(
    name="random",
    description="uniformly random scores (seeded): the floor to beat",
    paper="baseline",
    score=score,
    needs_keys=False,
)
