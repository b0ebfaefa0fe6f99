"""The one interface every eviction policy shares.

A policy is a function of numpy arrays: it receives a `CellView` (what the engine
read from the KV cache and the query capture) and returns one importance score per
live cell; the engine keeps the highest-scoring cells. Policies never see llama.cpp.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from ..model.rope import RopeSpec  # noqa: F401  (a CellView carries each layer's)


@dataclass
class CellView:
    """Everything a policy may look at, for the live cells of one sequence.

    Layers are model layer indices; only the layers the engine chose to read are present.
    """

    positions: np.ndarray  # (n,) int64, ascending: position of each live cell
    keys: Mapping[int, np.ndarray] = field(default_factory=dict)  # layer -> (n, n_kv_head, d_k) post-RoPE
    values: Mapping[int, np.ndarray] = field(default_factory=dict)  # layer -> (n, n_kv_head, d_v)
    value_norms: Mapping[int, np.ndarray] = field(default_factory=dict)  # layer -> (n, n_kv_head), read without the rows
    queries: Mapping[int, np.ndarray] = field(default_factory=dict)  # layer -> (m, n_head, d_k) PRE-RoPE
    query_positions: np.ndarray | None = None  # (m,) positions of the captured queries
    query_weights: np.ndarray | None = None  # (m,) summing to 1 (None: equal); the focus window's share, see Session
    rope: Mapping[int, RopeSpec] = field(default_factory=dict)  # layer -> its RoPE
    next_pos: int = 0  # position the next token will take
    attn_scale: float | None = None  # softmax scale; None -> 1/sqrt(d_k)
    seed: int = 0
    # the newest `pseudo_queries` queries are greedy answer tokens the engine decoded after a probed
    # question (Session._probe_question), not text the model read; a policy of "the last query" skips them
    pseudo_queries: int = 0

    @property
    def n(self) -> int:
        return int(self.positions.shape[0])

    def vnorms(self, layer: int) -> np.ndarray:
        """(n, n_kv_head) L2 norms of the value rows."""
        if layer in self.value_norms:
            return np.asarray(self.value_norms[layer])
        return np.linalg.norm(self.values[layer], axis=-1)

    def has_vnorms(self, layer: int) -> bool:
        return layer in self.value_norms or layer in self.values


ScoreFn = Callable[..., np.ndarray]


@dataclass(frozen=True)
class Policy:
    name: str
    description: str  # one line, shown by `ea-local policies`
    paper: str  # citation / arXiv id
    score: ScoreFn  # score(view, **options) -> (n,) float64, higher = keep
    needs_keys: bool = True
    needs_values: bool = False
    needs_value_norms: bool = False  # only the rows' L2 norms: the engine reads them without the rows
    needs_queries: bool = False
    # engine hooks; the defaults are what every scoring policy gets (evict the lowest scores of the
    # global cache down to budget - step, positions untouched, no extra decoding)
    evicts: bool = True  # False ("none"): never evict; the session refuses tokens past its budget
    target: Callable[[int, int, int], int] | None = None  # (n_cells, n_keep, budget) -> cells left
    shift: bool = False  # evict from every cache, then renumber positions contiguously (context shift)
    lookahead: int = 0  # greedy pseudo-decode steps whose queries join the view, then undone (LAQ)

    @property
    def options(self) -> dict[str, object]:
        """The policy's options and their defaults: the score function's keyword-only arguments,
        so the function is the one place they are declared (`SessionConfig.policy_options` sets them)."""
        return {name: p.default for name, p in inspect.signature(self.score).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty}
