"""Every token a session was fed, in order, with the position it was decoded at (evicted ones included).

A server slot matches a new request's prompt against it, keeps the common prefix as compressed and
prefills only the rest (serve/slots.py; Session.keep_prefix cuts the cache to it).

Pure Python: no llama.cpp here.
"""
from __future__ import annotations

import bisect


class Transcript:
    def __init__(self, tokens: list[int] | None = None, positions: list[int] | None = None) -> None:
        self.tokens: list[int] = list(tokens or [])
        self.positions: list[int] = list(positions or [])  # never decreasing

    def copy(self) -> "Transcript":
        return Transcript(self.tokens, self.positions)

    def __len__(self) -> int:
        return len(self.tokens)

    def record(self, tokens: list[int], start: int) -> None:
        """Tokens decoded at start, start + 1, ..."""
        self.tokens.extend(tokens)
        self.positions.extend(range(start, start + len(tokens)))

    def renumber(self, old: list[int]) -> None:
        """A compaction renumbered the cells at positions `old` (sorted) 0..n-1. An evicted token's
        position becomes the rank of the next kept cell, which keeps "every token from index i on" a
        position threshold."""
        self.positions = [bisect.bisect_left(old, p) for p in self.positions]

    def truncate(self, pos: int) -> None:
        """Forget the tokens at positions >= pos."""
        k = bisect.bisect_left(self.positions, pos)
        del self.tokens[k:]
        del self.positions[k:]
