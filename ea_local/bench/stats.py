"""Uncertainty of bench figures: Wilson intervals for k/n, exact McNemar for two policies on the
same trials, and seeded bootstrap intervals for perplexity over documents or windows.

Pure Python + numpy (no scipy), so the report can be rewritten from results.json anywhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

Z95 = 1.959963984540054  # standard normal 97.5% quantile
ALPHA = 0.05


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval for a proportion k/n (Wilson 1927; Agresti & Coull 1998 recommend it
    over the normal interval for small n). (0, 1) when n == 0: nothing is known."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"k={k} must be within 0..n={n}")
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # at k = 0 or k = n the formula's bound is exactly 0 or 1; rounding must not move it
    return (0.0 if k == 0 else max(0.0, center - half)), (1.0 if k == n else min(1.0, center + half))


@dataclass(frozen=True)
class McNemar:
    """Paired comparison of policies A and B on the same trials."""
    n: int  # paired trials
    a_only: int  # trials A got right and B wrong (discordant)
    b_only: int  # trials B got right and A wrong (discordant)
    p_value: float  # two-sided exact
    a_hits: int = 0  # trials A got right
    b_hits: int = 0

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA

    def verdict(self, a: str, b: str) -> str:
        if not self.significant:
            return "not significant"
        return f"{a} better" if self.a_only > self.b_only else f"{b} better"


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> McNemar:
    """Exact McNemar test: under H0 the discordant pairs split Binomial(b + c, 1/2); two-sided p is
    twice the smaller tail, capped at 1 (McNemar 1947; the exact form as in Fagerland et al. 2013)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    return McNemar(len(a), a_only, b_only, binomial_two_sided(a_only, a_only + b_only), sum(map(bool, a)),
                   sum(map(bool, b)))


def binomial_two_sided(k: int, n: int) -> float:
    """Two-sided exact p of k successes in n fair coin flips: 2 · P(X ≤ min(k, n-k)), capped at 1."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def pair(rows_a: list[dict], rows_b: list[dict], key) -> tuple[list[bool], list[bool]]:
    """found flags of the trials both row sets share, matched by key(row), in one order."""
    ia = {key(r): bool(r["found"]) for r in rows_a}
    ib = {key(r): bool(r["found"]) for r in rows_b}
    common = sorted(set(ia) & set(ib), key=repr)
    return [ia[k] for k in common], [ib[k] for k in common]


def bootstrap_ratio(num: Sequence[float], den: Sequence[float], n_boot: int = 2000, seed: int = 0,
                    level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of sum(num)/sum(den), resampling units with replacement
    (Efron & Tibshirani 1993, ch. 13): a ratio of sums, so long documents weigh by their tokens."""
    a, b = np.asarray(num, float), np.asarray(den, float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError("bootstrap needs num and den of the same non-empty 1-d shape")
    idx = np.random.default_rng(seed).integers(0, a.size, size=(n_boot, a.size))
    stats = a[idx].sum(1) / b[idx].sum(1)
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
    return float(lo), float(hi)


@dataclass(frozen=True)
class PplInterval:
    ppl: float
    lo: float
    hi: float
    units: int  # documents or windows resampled


def ppl_interval(nll_sums: Sequence[float], counts: Sequence[int], n_boot: int = 2000, seed: int = 0) -> PplInterval:
    """Perplexity exp(Σ nll / Σ tokens) with a bootstrap interval over units (documents or windows)."""
    num, den = np.asarray(nll_sums, float), np.asarray(counts, float)
    lo, hi = bootstrap_ratio(num, den, n_boot, seed)
    return PplInterval(math.exp(num.sum() / den.sum()), math.exp(lo), math.exp(hi), len(num))


def delta_ppl_interval(nll_a: Sequence[float], nll_ref: Sequence[float], counts: Sequence[int],
                       n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """ΔPPL = PPL(a) − PPL(ref) on the same units (paired bootstrap: the same resampled units for
    both), with its 95% percentile interval. Returns (delta, lo, hi)."""
    a, r, c = (np.asarray(x, float) for x in (nll_a, nll_ref, counts))
    if not a.shape == r.shape == c.shape or a.size == 0:
        raise ValueError("paired perplexity needs equal, non-empty unit lists")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n_boot, a.size))
    n = c[idx].sum(1)
    d = np.exp(a[idx].sum(1) / n) - np.exp(r[idx].sum(1) / n)
    lo, hi = np.quantile(d, [0.025, 0.975], method="inverted_cdf")
    return math.exp(a.sum() / c.sum()) - math.exp(r.sum() / c.sum()), float(lo), float(hi)


def fmt_rate(k: int, n: int) -> str:
    """`4/5 (80%, 38–96)`: k/n, the rate and its 95% Wilson interval in percent."""
    if n == 0:
        return "–"
    lo, hi = wilson(k, n)
    return f"{k}/{n} ({100 * k / n:.0f}%, {100 * lo:.0f}–{100 * hi:.0f})"


def fmt_p(p: float) -> str:
    return "1" if p >= 0.9995 else (f"{p:.3f}" if p >= 0.001 else "<0.001")
