"""Eviction policies: one module per scoring method, all behind ``Policy`` (see base.py)."""
from __future__ import annotations

from ea_local.policies import (
    compactor,
    context_shift,
    curdkv,
    expected_attention,
    h2o,
    knorm,
    laq,
    lava,
    morphkv,
    none,
    obcache,
    snapkv,
    streaming_llm,
    tova,
)
from ea_local.policies import random as random_policy
from ea_local.policies.base import CellView, Policy, RopeSpec

POLICIES: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy(
            name="expected-attention",
            description="expected attention of future queries (Gaussian queries, averaged RoPE), times value norm",
            paper="Devoto, Jeblick & Jégou 2025, Expected Attention, arXiv 2510.00636 (kvpress ExpectedAttentionPress)",
            score=expected_attention.score,
            needs_values=True,
            needs_queries=True,
        ),
        Policy(
            name="none",
            description="full cache, no eviction: refuses to run past its context (= the budget)",
            paper="baseline (llama.cpp with --no-context-shift)",
            score=none.score,
            needs_keys=False,
            evicts=False,
        ),
        Policy(
            name="context-shift",
            description="llama.cpp server's context shift: keep the first n_keep tokens, drop half of the rest, shift positions",
            paper="baseline: ggml-org/llama.cpp tools/server (n_discard = (n_past - n_keep) / 2)",
            score=context_shift.score,
            needs_keys=False,
            target=context_shift.target,
            shift=True,
        ),
        Policy(
            name="streaming-llm",
            description="keep the attention sinks and the most recent tokens",
            paper="Xiao et al. 2023, Efficient Streaming Language Models with Attention Sinks, arXiv 2309.17453",
            score=streaming_llm.score,
            needs_keys=False,
        ),
        Policy(
            name="random",
            description="uniformly random scores (seeded): the floor to beat",
            paper="baseline",
            score=random_policy.score,
            needs_keys=False,
        ),
        Policy(
            name="knorm",
            description="keep the keys with the lowest L2 norm",
            paper="Devoto et al. 2024, A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression, arXiv 2406.11430",
            score=knorm.score,
        ),
        Policy(
            name="snapkv",
            description="attention of the observation-window queries, pooled over neighbouring cells",
            paper="Li et al. 2024, SnapKV: LLM Knows What You are Looking for Before Generation, arXiv 2404.14469",
            score=snapkv.score,
            needs_queries=True,
        ),
        Policy(
            name="tova",
            description="attention of the last query, averaged over heads",
            paper="Oren et al. 2024, Transformers are Multi-State RNNs (TOVA), arXiv 2401.06104",
            score=tova.score,
            needs_queries=True,
        ),
        Policy(
            name="h2o",
            description="heavy hitters: attention summed over the observation-window queries (window approximation)",
            paper="Zhang et al. 2023, H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models, arXiv 2306.14048",
            score=h2o.score,
            needs_queries=True,
        ),
        Policy(
            name="compactor",
            description="approximate leverage of the pre-RoPE keys, blended with window attention times value norm",
            paper="Chari & Van Durme 2025, Compactor: Calibrated Query-Agnostic KV Cache Compression with Approximate Leverage Scores, arXiv 2507.08143 (kvpress CompactorPress)",
            score=compactor.score,
            needs_values=True,
            needs_queries=True,
        ),
        Policy(
            name="curdkv",
            description="CUR leverage (squared row norms, local blocks) of keys times that of values",
            paper="Sengupta, Chaudhary & Chakraborty 2025, Value-Guided KV Compression for LLMs via Approximated CUR Decomposition (CurDKV), arXiv 2509.15038 (kvpress CURPress)",
            score=curdkv.score,
            needs_values=True,
        ),
        Policy(
            name="obcache",
            description="output-aware saliency: attention-output change when a cell's value (or key) is pruned",
            paper="Gu, Liang, Zhao & Diao 2025, OBCache: Optimal Brain KV Cache Pruning for Efficient Long-Context LLM Inference, arXiv 2510.07651",
            score=obcache.score,
            needs_values=True,
            needs_queries=True,
        ),
        Policy(
            name="morphkv",
            description="distant cells most attended (max or sum) by the recent-window queries",
            paper="Ghadia et al. 2025, Dialogue Without Limits: Constant-Sized KV Caches for Extended Responses in LLMs (MorphKV), ICML 2025, arXiv 2503.00979",
            score=morphkv.score,
            needs_queries=True,
        ),
        Policy(
            name="lava",
            description="LAVa's residual-stream loss score: pooled window attention times the head's max value norm",
            paper="Shen et al. 2025, LAVa: Layer-wise KV Cache Eviction with Dynamic Budget Allocation, arXiv 2509.09754",
            score=lava.score,
            needs_values=True,
            needs_queries=True,
        ),
        Policy(
            name="laq",
            description="Lookahead Q-Cache: SnapKV votes of the queries of 8 greedy pseudo-decode steps (then undone)",
            paper="Wang et al. 2025, Lookahead Q-Cache: Achieving More Consistent KV Cache Eviction via Pseudo Query, arXiv 2505.20334",
            score=laq.score,
            needs_queries=True,
            lookahead=8,
        ),
    )
}

# policies from the literature that llama.cpp's cache layout cannot express, with the reason
UNAVAILABLE: dict[str, str] = {
    "pyramidkv": (
        "PyramidKV (Cai et al. 2024, arXiv 2406.02069) gives each layer its own budget (more cells in "
        "lower layers), but a llama.cpp KV cell holds one token for every layer of its cache and the "
        "engine removes whole cells: every layer keeps the same tokens, so per-layer budgets cannot "
        "be expressed (a token-level version would be SnapKV with another layer weighting, not PyramidKV)"
    ),
}


def get_policy(name: str) -> Policy:
    """The registered policy called ``name``; ValueError listing the choices otherwise."""
    try:
        return POLICIES[name]
    except KeyError:
        if name in UNAVAILABLE:
            raise ValueError(f"policy {name!r} is not available: {UNAVAILABLE[name]}") from None
        raise ValueError(f"unknown policy {name!r}; choose from: {', '.join(POLICIES)}") from None


__all__ = ["POLICIES", "UNAVAILABLE", "get_policy", "Policy", "CellView", "RopeSpec"]
