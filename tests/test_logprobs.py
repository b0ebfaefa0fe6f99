"""token_logprob: the log-softmax of the logits at the chosen token and the k likeliest tokens, largest
first, whatever the shape of the logits (a peaked distribution takes the fast path, a flat one the
full partition)."""
from __future__ import annotations

import numpy as np
import pytest

from ea_local.engine.sampling import token_logprob


@pytest.mark.parametrize("scale", [0.01, 1.0, 5.0, 50.0])
@pytest.mark.parametrize("k", [0, 1, 5, 20])
def test_token_logprob_matches_float64_log_softmax(scale, k):
    rng = np.random.default_rng(int(scale * 100) + k)
    x = (rng.standard_normal(50_000) * scale).astype(np.float32)
    x[rng.integers(0, len(x), 3)] += 12.0 * scale  # a few likely tokens, as a language model's logits have
    ref = x.astype(np.float64) - np.logaddexp.reduce(x.astype(np.float64))
    tok = int(rng.integers(0, len(x)))
    got = token_logprob(x, tok, k, lambda t: t.to_bytes(4, "little"))
    assert got.logprob == pytest.approx(ref[tok], abs=1e-4)
    order = np.argsort(-ref, kind="stable")[:k]
    assert [int.from_bytes(b, "little") for b, _ in got.top] == order.tolist()
    assert [lp for _, lp in got.top] == pytest.approx(ref[order].tolist(), abs=1e-4)
