"""Eviction policies: one module per scoring method, each declaring its own ``POLICY`` entry
(name, paper, description, score function; the options are the score function's keyword
arguments). This module only collects them; the interface is in base.py, shared helpers in
common.py."""
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

# the order `ea-local policies` lists them in: the method first, then baselines and the others
POLICIES: dict[str, Policy] = {
    m.POLICY.name: m.POLICY
    for m in (
        expected_attention,
        none,
        context_shift,
        streaming_llm,
        random_policy,
        knorm,
        snapkv,
        tova,
        h2o,
        compactor,
        curdkv,
        obcache,
        morphkv,
        lava,
        laq,
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
