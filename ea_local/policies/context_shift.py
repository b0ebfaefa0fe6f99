"""`context-shift`: what llama.cpp's server does when a slot's context fills.

From ggml-org/llama.cpp, tools/server/server-context.cpp (formerly tools/server/server.cpp,
`update_slots`, "apply context-shift if needed"), when `n_tokens + 1 >= n_ctx` while generating:

    n_keep    = params.n_keep (+1 for BOS), at most n_ctx - 4
    n_left    = n_tokens - n_keep
    n_discard = params.n_discard ? params.n_discard : n_left / 2      (clamped to [0, n_left - 1])
    seq_rm (n_keep, n_keep + n_discard)                  drop the oldest half after the kept prefix
    seq_add(n_keep + n_discard, n_tokens, -n_discard)    shift the rest down: positions stay contiguous

Here n_keep is the session's n_sink (4 in the bench; in `ea-local serve` and chat the conversation's
protected opening, as `--keep` would set it; llama.cpp's server keeps only BOS unless `--keep`),
n_ctx is the budget, and the engine applies it when the cache goes over the budget (the server
checks one token earlier, before decoding). The server rejects prompts longer than n_ctx; the
engine reads long documents through the budget, so after a prefill chunk the rule is applied as
often as needed for the cache to fit. Removal covers every cache (llama.cpp's seq_rm does, sliding
layers included) and the engine then renumbers positions (Policy.shift), which for contiguous
positions is exactly the server's seq_add.
"""
from __future__ import annotations

import numpy as np

from ea_local.policies.base import CellView, Policy


def n_discard(n_tokens: int, n_keep: int) -> int:
    """The server's default discard: half of what follows the kept prefix, clamped to [0, n_left - 1]."""
    n_left = n_tokens - n_keep
    return int(np.clip(n_left // 2, 0, max(0, n_left - 1)))


def target(n_cells: int, n_keep: int, budget: int) -> int:
    """Cells left after shifting until the cache fits the budget (one shift while generating)."""
    n = n_cells
    while n > budget:
        d = n_discard(n, n_keep)
        if d == 0:  # nothing left to discard after the kept prefix
            break
        n -= d
    return n


def score(view: CellView) -> np.ndarray:
    """(n,) the positions: the oldest cells after the kept prefix (engine-protected) go first."""
    return np.asarray(view.positions, dtype=np.float64).copy()


POLICY = Policy(
    name="context-shift",
    description="llama.cpp server's context shift: keep the first n_keep tokens, drop half of the rest, shift positions",
    paper="baseline: ggml-org/llama.cpp tools/server (n_discard = (n_past - n_keep) / 2)",
    score=score,
    needs_keys=False,
    target=target,
    shift=True,
)
