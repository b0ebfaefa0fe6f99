"""Windows of captured queries: per scored layer the pre-RoPE queries (m, n_head, d_k), with their
positions, oldest first.

A session keeps three (engine/session.py): the statistics window (the context's newest queries),
the focus (the user's newest message, or the probed question) and the baseline (the focus the newest
message replaced: what recall contrasts the message with). Positions of queries whose cells a
compaction dropped become -1.

Pure numpy: no llama.cpp here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np


@dataclass
class QueryWindow:
    q: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> (m, n_head, d_k)
    pos: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.pos)

    def covers(self, layers: Iterable[int]) -> bool:
        return all(il in self.q for il in layers)

    def push(self, q: dict[int, np.ndarray], pos: np.ndarray, keep: int, extend: bool = True) -> None:
        """New queries, after the window's own when `extend`; the last `keep` stay."""
        for il, new in q.items():
            old = self.q.get(il)
            self.q[il] = _tail(np.concatenate([old, new]) if extend and old is not None else new, keep)
        self.pos = _tail(np.concatenate([self.pos, pos]) if extend else np.asarray(pos, dtype=np.int64), keep)

    def last(self, n: int) -> "QueryWindow":
        """A copy of the newest n."""
        return QueryWindow({il: _tail(q, n).copy() for il, q in self.q.items()}, _tail(self.pos, n).copy())

    def keep(self, mask: np.ndarray) -> None:
        self.q = {il: q[mask] for il, q in self.q.items()}
        self.pos = self.pos[mask]

    def truncate(self, pos: int) -> None:
        """Forget the queries at positions >= pos."""
        self.keep(self.pos < pos)

    def remap(self, mapping: dict[int, int]) -> None:
        """Positions renumbered by a compaction; those it dropped become -1."""
        self.pos = np.array([mapping.get(int(p), -1) for p in self.pos], dtype=np.int64)

    def copy(self, layers: Iterable[int] | None = None) -> "QueryWindow":
        keep = None if layers is None else set(layers)
        return QueryWindow({il: q.copy() for il, q in self.q.items() if keep is None or il in keep}, self.pos.copy())


def _tail(x: np.ndarray, n: int) -> np.ndarray:
    return x[len(x) - n:] if 0 < n < len(x) else x if n > 0 else x[:0]
