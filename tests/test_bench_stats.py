"""Known answers of the bench's statistics (ea_local/bench/stats.py), derived by hand below."""
from __future__ import annotations

import math
import numpy as np
import pytest

from ea_local.bench import stats


# ---- Wilson interval ----

@pytest.mark.parametrize("k,n,lo,hi", [
    # p = 0.8, z² = 3.8415: centre (0.8 + 0.3841)/1.7683 = 0.6697, half 1.1084·√(0.032 + 0.0384) = 0.2941
    (4, 5, 0.3755, 0.9638),
    # k = 0: upper = z²/(n + z²) = 3.8415/8.8415
    (0, 5, 0.0, 0.4345),
    (5, 5, 0.5655, 1.0),
    # p = 0.5, n = 30: centre 0.5, half 1.9600/1.1280·√(0.25/30 + 3.8415/3600) = 0.1685
    (15, 30, 0.3315, 0.6685),
    # 27/30: centre (0.9 + 0.0640)/1.1280 = 0.8546, half 1.7376·√(0.003 + 0.001067) = 0.1108
    (27, 30, 0.7438, 0.9654),
])
def test_wilson_known_answers(k, n, lo, hi):
    got = stats.wilson(k, n)
    assert got[0] == pytest.approx(lo, abs=5e-4) and got[1] == pytest.approx(hi, abs=5e-4)


def test_wilson_edges_and_symmetry():
    assert stats.wilson(0, 0) == (0.0, 1.0)
    for n in (1, 7, 40):
        for k in range(n + 1):
            lo, hi = stats.wilson(k, n)
            assert 0 <= lo <= k / n <= hi <= 1
            lo2, hi2 = stats.wilson(n - k, n)
            assert lo == pytest.approx(1 - hi2) and hi == pytest.approx(1 - lo2)
    with pytest.raises(ValueError):
        stats.wilson(6, 5)


def test_wilson_covers_about_95_percent():
    """Exact coverage at n = 30 (sum of the binomial probabilities of the k whose interval holds p),
    averaged over p in 0.05..0.95: Wilson's is close to nominal on average (Brown, Cai & DasGupta
    2001, fig. 4), though it dips below at some p."""
    n = 30
    cov = []
    for p in np.linspace(0.05, 0.95, 91):
        cov.append(sum(math.comb(n, k) * p**k * (1 - p)**(n - k)
                       for k in range(n + 1) if stats.wilson(k, n)[0] <= p <= stats.wilson(k, n)[1]))
    assert 0.94 <= float(np.mean(cov)) <= 0.96
    assert min(cov) > 0.89


def test_fmt_rate():
    assert stats.fmt_rate(4, 5) == "4/5 (80%, 38–96)"
    assert stats.fmt_rate(0, 0) == "–"


# ---- exact McNemar ----

@pytest.mark.parametrize("b,c,p", [
    (5, 0, 2 / 32),  # 5 discordant pairs all one way: 2 · 0.5⁵ = 0.0625, not significant at 5%
    (6, 0, 2 / 64),  # 0.03125: significant
    (3, 1, 2 * 5 / 16),  # 2 · (C(4,0) + C(4,1)) / 16 = 0.625
    (2, 2, 1.0),
    (0, 0, 1.0),  # no discordant pair: nothing to tell them apart
    (10, 2, 2 * (1 + 12 + 66) / 4096),  # 0.03857
])
def test_mcnemar_known_answers(b, c, p):
    a = [True] * b + [False] * c + [True] * 7 + [False] * 3  # 7 both right, 3 both wrong: ignored
    bb = [False] * b + [True] * c + [True] * 7 + [False] * 3
    m = stats.mcnemar_exact(a, bb)
    assert (m.n, m.a_only, m.b_only) == (b + c + 10, b, c)
    assert m.p_value == pytest.approx(p)
    assert m.significant == (p < 0.05)


def test_mcnemar_verdicts_and_pairing():
    m = stats.mcnemar_exact([True] * 8, [False] * 8)
    assert m.verdict("ea", "snapkv") == "ea better"
    assert stats.mcnemar_exact([False] * 8, [True] * 8).verdict("ea", "snapkv") == "snapkv better"
    assert stats.mcnemar_exact([True] * 4 + [False], [False] * 5).verdict("ea", "x") == "not significant"
    with pytest.raises(ValueError):
        stats.mcnemar_exact([True], [True, False])
    # pairing matches trials by key, whatever the row order, and drops trials only one side has
    ra = [{"d": 0, "found": True}, {"d": 1, "found": False}, {"d": 2, "found": True}]
    rb = [{"d": 2, "found": False}, {"d": 0, "found": True}]
    assert stats.pair(ra, rb, lambda r: r["d"]) == ([True, True], [True, False])


# ---- bootstrap ----

def test_bootstrap_of_two_units_spans_both():
    """With 2 equal-sized units the resampled mean is a (1/4), (a+b)/2 (1/2) or b (1/4): the 2.5% and
    97.5% percentiles are a and b."""
    lo, hi = stats.bootstrap_ratio([1.0, 3.0], [1, 1], n_boot=4000, seed=0)
    assert (lo, hi) == (1.0, 3.0)


def test_bootstrap_constant_units_and_seeds():
    assert stats.bootstrap_ratio([2.0] * 6, [1] * 6) == (2.0, 2.0)
    x = np.random.default_rng(5).normal(2.5, 0.3, 40)
    a = stats.bootstrap_ratio(x, np.ones(40), seed=3)
    assert a == stats.bootstrap_ratio(x, np.ones(40), seed=3)  # seeded: reproducible
    # close to the normal interval of a mean: x̄ ± 1.96 s/√n
    half = 1.96 * x.std(ddof=1) / math.sqrt(40)
    assert a[0] == pytest.approx(x.mean() - half, abs=0.03) and a[1] == pytest.approx(x.mean() + half, abs=0.03)
    with pytest.raises(ValueError):
        stats.bootstrap_ratio([], [])


def test_ppl_interval_weighs_units_by_tokens():
    # two documents: NLL 2.0 over 300 tokens and 3.0 over 100: pooled NLL (600 + 300)/400 = 2.25
    r = stats.ppl_interval([600.0, 300.0], [300, 100], n_boot=4000)
    assert r.ppl == pytest.approx(math.exp(2.25)) and r.units == 2
    assert r.lo == pytest.approx(math.exp(2.0)) and r.hi == pytest.approx(math.exp(3.0))


def test_delta_ppl_is_paired():
    """A policy that adds exactly 0.1 NLL to every document has a ΔPPL interval far narrower than
    the spread of the documents' perplexities: the pairing cancels how hard each document is."""
    rng = np.random.default_rng(0)
    counts = np.full(20, 1000.0)
    ref = rng.uniform(1.5, 3.5, 20) * counts
    d, lo, hi = stats.delta_ppl_interval(ref + 0.1 * counts, ref, counts)
    assert lo <= d <= hi and lo > 0
    per = stats.ppl_interval(ref, counts)
    assert hi - lo < 0.5 * (per.hi - per.lo)
    d0, lo0, hi0 = stats.delta_ppl_interval(ref, ref, counts)
    assert (d0, lo0, hi0) == (0.0, 0.0, 0.0)
