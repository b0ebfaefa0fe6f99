"""Host archive of evicted KV cells, so that a later message can recall them.

When a compression evicts cells, their raw K/V rows (the cache's own type: f16, q8_0 or q4_0
bytes, quantized K still Walsh-Hadamard-rotated) are copied here for every layer the eviction
touched, with their position, token id and the position their K was rotated for. Putting them back
(Runtime.kv_restore) is then exact. The archive is bounded in tokens and bytes; past a bound the
least recalled cells go first, the oldest among equals (ArkVale, NeurIPS 2024, also keeps evicted
pages in host memory and brings back the ones a new query needs).

Positions follow the sequence: a compaction renumbers archived cells with the live ones (`remap`),
while `rotated_at` keeps the position their K rows were rotated for, so that llama.cpp's K-shift
re-rotates them when they come back.

Pure numpy: no llama.cpp here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass
class Archive:
    layers: tuple[int, ...]  # the layers whose rows are kept (every layer the eviction touches)
    max_tokens: int | None = None
    max_bytes: int | None = None
    pos: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    rotated_at: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    tokens: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int32))
    recalls: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int32))
    stamp: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))  # arrival order
    k: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> (n, K row bytes) uint8
    v: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> (n, V row bytes) uint8
    # the digest a new message is scored against (ArkVale's page digests, here per cell): post-RoPE keys of
    # the scored layers as the float reader returns them (dequantized, Hadamard rotation undone), in float32,
    # the type scoring multiplies in: a float16 copy cost a conversion of the whole archive at every message
    digest: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> (n, n_kv_head, d_k) float32
    dropped: int = 0  # cells dropped past a bound, ever
    _clock: int = 0

    def __len__(self) -> int:
        return len(self.pos)

    @property
    def bytes_per_token(self) -> int:
        raw = sum(self.k[il].shape[1] + self.v[il].shape[1] for il in self.k)
        return raw + sum(int(np.prod(d.shape[1:])) * d.itemsize for d in self.digest.values())

    @property
    def nbytes(self) -> int:
        return len(self) * self.bytes_per_token

    def add(self, pos, tokens, rows: dict[int, tuple[np.ndarray, np.ndarray]], digest: dict[int, np.ndarray],
            rotated_at=None, recalls=None) -> int:
        """Archive cells (positions, token ids, raw rows per layer, digest keys per scored layer). Returns how
        many were dropped to stay within the bounds."""
        pos = np.asarray(pos, dtype=np.int64)
        n = len(pos)
        if n == 0:
            return 0
        if set(rows) != set(self.layers):
            raise ValueError(f"rows for layers {sorted(rows)}, the archive keeps {list(self.layers)}")
        rot = pos if rotated_at is None else np.asarray(rotated_at, dtype=np.int64)
        rec = np.zeros(n, dtype=np.int32) if recalls is None else np.asarray(recalls, dtype=np.int32)
        cap = self.capacity()
        self.pos = _append(self.pos, pos, cap)
        self.rotated_at = _append(self.rotated_at, rot, cap)
        self.tokens = _append(self.tokens, np.asarray(tokens, dtype=np.int32), cap)
        self.recalls = _append(self.recalls, rec, cap)
        self.stamp = _append(self.stamp, np.arange(self._clock, self._clock + n, dtype=np.int64), cap)
        self._clock += n
        for il in self.layers:
            k, v = rows[il]
            if len(k) != n or len(v) != n:
                raise ValueError(f"layer {il}: {len(k)} K / {len(v)} V rows for {n} cells")
            self.k[il] = _append(self.k.get(il), k, cap)
            self.v[il] = _append(self.v.get(il), v, cap)
        if len(self) > n and set(digest) != set(self.digest):
            raise ValueError(f"digest for layers {sorted(digest)}, the archive has {sorted(self.digest)}")
        for il, d in digest.items():
            if len(d) != n:
                raise ValueError(f"layer {il}: {len(d)} digest keys for {n} cells")
            self.digest[il] = _append(self.digest.get(il), np.asarray(d, dtype=np.float32), cap)
        return self.enforce()

    def capacity(self) -> int | None:
        """Most cells the bounds allow (None: unbounded)."""
        caps = []
        if self.max_tokens is not None:
            caps.append(self.max_tokens)
        if self.max_bytes is not None and self.bytes_per_token:
            caps.append(self.max_bytes // self.bytes_per_token)
        return min(caps) if caps else None

    def enforce(self, cap: int | None = None) -> int:
        """Drop cells past the bounds (or past `cap`): least recalled first, oldest among equals."""
        caps = [c for c in (self.capacity(), cap) if c is not None]
        if not caps or len(self) <= min(caps):
            return 0
        n_drop = len(self) - max(0, min(caps))
        order = np.lexsort((self.stamp, self.recalls))  # by recalls, then arrival
        self._keep(np.setdiff1d(np.arange(len(self)), order[:n_drop]))
        self.dropped += n_drop
        return n_drop

    def take(self, idx) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, tuple[np.ndarray, np.ndarray]],
                                 dict[int, np.ndarray], np.ndarray]:
        """Remove entries `idx` (returned in position order) and return (positions, rotated_at, tokens, rows
        per layer, digest per layer, recall counts + 1)."""
        idx = np.unique(np.asarray(idx, dtype=np.int64))
        idx = idx[np.argsort(self.pos[idx], kind="stable")]
        out = (self.pos[idx], self.rotated_at[idx], self.tokens[idx],
               {il: (self.k[il][idx], self.v[il][idx]) for il in self.layers},
               {il: d[idx] for il, d in self.digest.items()}, self.recalls[idx] + 1)
        self._keep(np.setdiff1d(np.arange(len(self)), idx))
        return out

    def _keep(self, keep: np.ndarray) -> None:
        for name in ("pos", "rotated_at", "tokens", "recalls", "stamp"):
            setattr(self, name, _subset(getattr(self, name), keep))
        for il in list(self.k):
            self.k[il], self.v[il] = _subset(self.k[il], keep), _subset(self.v[il], keep)
        for il in list(self.digest):
            self.digest[il] = _subset(self.digest[il], keep)

    def remap(self, old, new) -> None:
        """Renumber positions as a compaction does (old[i] -> new[i]); every archived position must be listed."""
        old = np.asarray(old, dtype=np.int64)
        new = np.asarray(new, dtype=np.int64)
        if not len(self):
            return
        order = np.argsort(old)
        i = np.searchsorted(old[order], self.pos)
        if np.any(i >= len(old)) or np.any(old[order][np.minimum(i, len(old) - 1)] != self.pos):
            raise ValueError("an archived position is missing from the mapping")
        self.pos = new[order][i]

    def truncate(self, pos: int) -> int:
        """Forget archived cells at positions >= pos (the conversation is rewound there)."""
        keep = np.flatnonzero(self.pos < pos)
        n = len(self) - len(keep)
        self._keep(keep)
        return n

    def clear(self) -> None:
        self._keep(np.empty(0, dtype=np.int64))

    def copy(self) -> "Archive":
        a = Archive(self.layers, self.max_tokens, self.max_bytes, self.pos.copy(), self.rotated_at.copy(),
                    self.tokens.copy(), self.recalls.copy(), self.stamp.copy(),
                    {il: x.copy() for il, x in self.k.items()}, {il: x.copy() for il, x in self.v.items()},
                    {il: x.copy() for il, x in self.digest.items()}, self.dropped, self._clock)
        return a


def _front(cur: np.ndarray | None) -> np.ndarray | None:
    """The buffer `cur` is the front of (an archive array with spare room), else None."""
    base = None if cur is None else cur.base
    if (isinstance(base, np.ndarray) and base.dtype == cur.dtype and base.shape[1:] == cur.shape[1:]
            and base.flags.c_contiguous and cur.ctypes.data == base.ctypes.data):
        return base
    return None


def _subset(cur: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """cur[keep] (keep sorted), compacted within cur's buffer so that the next append has its room."""
    base = _front(cur)
    if base is None:
        return cur[keep]
    f = int(np.searchsorted(keep - np.arange(len(keep)), 1))  # cells before the first removed stay put
    base[f:len(keep)] = cur[keep[f:]]
    return base[:len(keep)]


def _append(cur: np.ndarray | None, new: np.ndarray, limit: int | None = None) -> np.ndarray:
    """`cur` with `new` appended: written into the spare room of the buffer `cur` is the front of, when it
    has room, else into a new buffer twice the size (at most `limit` cells plus the new ones: the
    archive's bound), so archiving costs the new cells, not a copy of the archive."""
    n, m = (0, len(new)) if cur is None else (len(cur), len(new))
    base = _front(cur)
    if base is not None and len(base) >= n + m:
        base[n:n + m] = new
        return base[:n + m]
    like = new if cur is None else cur
    size = max(2 * (n + m), 64) if limit is None else max(n + m, min(2 * (n + m), limit + m))
    buf = np.empty((size,) + like.shape[1:], dtype=like.dtype)
    if n:
        buf[:n] = cur
    buf[n:n + m] = new
    return buf[:n + m]


def pool_spans(pos: np.ndarray, scores: np.ndarray, radius: int) -> np.ndarray:
    """Max of `scores` over the cells within `radius` positions of each cell (same array order), so that
    the neighbours of a high-scoring cell rank with it and a fact comes back whole. Cells are pooled
    only with archived neighbours: pos need not be contiguous."""
    pos = np.asarray(pos, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    if radius <= 0 or len(pos) == 0:
        return scores.copy()
    order = np.argsort(pos, kind="stable")
    p, s = pos[order], scores[order]
    lo = np.searchsorted(p, p - radius, side="left")
    hi = np.searchsorted(p, p + radius, side="right")
    # windows are at most 2*radius+1 cells wide: a loop over offsets keeps it vectorised
    out = s.copy()
    n = len(p)
    for d in range(1, 2 * radius + 1):
        j = np.arange(n) + d
        ok = j < np.minimum(hi, n)
        out[ok] = np.maximum(out[ok], s[j[ok]])
        j = np.arange(n) - d
        ok = j >= np.maximum(lo, 0)
        out[ok] = np.maximum(out[ok], s[j[ok]])
    res = np.empty_like(out)
    res[order] = out
    return res


def plan_swap(arch_scores: np.ndarray, live_scores: np.ndarray, live_evictable: np.ndarray, room: int,
              max_recall: int) -> tuple[np.ndarray, np.ndarray]:
    """Which archived cells come back and which live cells leave for them.

    Archived cells in decreasing score order come back while they score higher than the lowest-scoring
    evictable live cell left: first into `room` free cells, then each in the place of that live cell;
    at most `max_recall`. Returns (archive indices to restore, live indices to evict)."""
    arch_scores = np.asarray(arch_scores, dtype=np.float64)
    live_scores = np.asarray(live_scores, dtype=np.float64)
    a_order = np.argsort(-arch_scores, kind="stable")[:max(0, max_recall)]
    cand = np.flatnonzero(np.asarray(live_evictable, dtype=bool))
    l_order = cand[np.argsort(live_scores[cand], kind="stable")]
    restore, evict = [], []
    free = max(0, room)
    j = 0
    for a in a_order:
        if j < len(l_order) and arch_scores[a] <= live_scores[l_order[j]]:
            break
        if free > 0:
            free -= 1
        elif j < len(l_order):
            evict.append(l_order[j])
            j += 1
        else:
            break
        restore.append(a)
    return np.asarray(restore, dtype=np.int64), np.asarray(evict, dtype=np.int64)


def parse_size(text: str) -> tuple[int | None, int | None]:
    """An --archive bound: "4096" (cells/tokens) or "64MiB" / "1GiB" / "500MB" (bytes). Returns
    (tokens, bytes), one of them None; "0" turns the archive (and recall) off in effect."""
    t = text.strip().lower().replace(" ", "")
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    for u, mult in units.items():
        if t.endswith(u):
            num = t[:-len(u)]
            try:
                val = float(num)
            except ValueError:
                break
            if val < 0:
                break
            return None, int(val * mult)
    else:
        if t.removesuffix("tokens").removesuffix("t").isdigit():
            return int(t.removesuffix("tokens").removesuffix("t")), None
    raise ValueError(f"--archive takes tokens (4096) or a size (64MiB, 1GiB), got {text!r}")


def bytes_per_token(info, cache_type: str, layers: Sequence[int]) -> int | None:
    """Host bytes the archive keeps per evicted token of a model (ModelInfo): the raw K/V rows of every
    evicted layer (the global ones on iSWA models) in the cache type, plus the float32 digest keys of
    the scored `layers` (session.scored_layers)."""
    per = info.kv_bytes_per_token_for(cache_type)
    if per is None:
        return None
    return per.global_part + sum(4 * info.n_head_kv_per_layer[il] * info.head_dims(il)[0] for il in layers)
