"""The sampling helpers: token_logprob (the log-softmax at the chosen token and the k likeliest tokens,
largest first, whatever the shape of the logits: a peaked distribution takes the fast path, a flat one
the full partition) and the grammar check."""
from __future__ import annotations

import numpy as np
import pytest

from ea_local.engine.sampling import check_grammar, token_logprob

from .conftest import GEMMA


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


def test_check_grammar_parses_or_says_why():
    from llama_cpp.llama_grammar import JSON_GBNF

    from ea_local.engine.runtime import ContextConfig, Runtime

    rt = Runtime(GEMMA, ContextConfig(n_ctx=64, n_threads=1))
    try:
        check_grammar(rt, JSON_GBNF)
        with pytest.raises(ValueError, match="does not parse"):
            check_grammar(rt, "root ::= (")
    finally:
        rt.close()
