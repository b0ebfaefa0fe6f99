"""Eviction policies on synthetic cases whose right answer is known, and Expected Attention's
closed form against Monte-Carlo sampling of Gaussian queries."""
import functools
import numpy as np
import pytest

from ea_local.policies import POLICIES, get_policy
from ea_local.policies.base import CellView, RopeSpec
from ea_local.policies.expected_attention import (
    aggregate_scores,
    cholesky_factor,
    expected_attention_layer,
    expected_logits,
    query_statistics,
    softmax,
)
from ea_local.policies.snapkv import pool1d
from ea_local.model.rope import apply_rope, mean_rotation

LAYOUTS = [pytest.param(False, id="norm"), pytest.param(True, id="neox")]


def spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def unit(x):
    return x / np.linalg.norm(x)


# ---------------------------------------------------------------- Monte-Carlo checks


def gaussian_case(seed, d=16, n=24):
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=d) * 1.5
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    cov = a @ a.T * 0.3 + 0.05 * np.eye(d)  # random SPD; s² kᵀΣk stays ~1 so MC converges
    keys = rng.normal(size=(n, d)) * np.linspace(0.5, 1.5, n)[:, None]
    return rng, mu, cov, keys


def ea_probs(mu, cov, keys, spec, p0, n_future):
    """softmax(z) of the closed form, single head, through the policy's layer function."""
    s = 1.0 / np.sqrt(keys.shape[1])
    r = mean_rotation(spec, p0, n_future)
    return softmax(expected_logits((r @ mu)[None], (r @ cov @ r.T)[None], keys[:, None, :], s))[0]


@pytest.mark.parametrize("neox", LAYOUTS)
def test_closed_form_is_exact_gaussian_mgf_at_one_position(neox):
    """n_future=1: R̄ = R(p0), and softmax(z) = E[exp(s q·k)] / Σ_k E[exp(s q·k)] exactly."""
    rng, mu, cov, keys = gaussian_case(0)
    d = mu.shape[0]
    spec = RopeSpec(d, 10000.0, 0.5, neox)
    q = apply_rope(rng.multivariate_normal(mu, cov, size=100_000), 300, spec)
    e = np.exp(q @ keys.T / np.sqrt(d)).mean(axis=0)
    np.testing.assert_allclose(ea_probs(mu, cov, keys, spec, 300, 1), e / e.sum(), rtol=0.03)
    # the same through the policy's layer function (single head, no vnorm)
    queries = rng.multivariate_normal(mu, cov, size=200_000)[:, None, :]
    layer = expected_attention_layer(queries, keys[:, None, :], None, spec, 300, n_future_positions=1, use_vnorm=False)
    np.testing.assert_allclose(layer[0], e / e.sum(), rtol=0.03)


@pytest.mark.parametrize("neox", LAYOUTS)
def test_closed_form_against_sampled_future_positions(neox):
    """Queries rotated at uniformly drawn future positions in [p0, p0 + n_future).

    Tight: the closed form equals the normalised E[exp(s q'·k)] of the averaged query q' = R̄q
    (a Gaussian N(R̄μ, R̄ΣR̄ᵀ)); the exact position mixture mean_p exp(z_p) equals MC.
    Loose: the ranking of EA matches the mean real softmax attention (Spearman > 0.9).
    """
    p0, n_future = 300, 64
    rng, mu, cov, keys = gaussian_case(0)
    d = mu.shape[0]
    s = 1.0 / np.sqrt(d)
    spec = RopeSpec(d, 10000.0, 0.5, neox)
    q = rng.multivariate_normal(mu, cov, size=100_000)
    pos = p0 + rng.integers(0, n_future, size=q.shape[0])
    logits = s * apply_rope(q, pos, spec) @ keys.T
    ea = ea_probs(mu, cov, keys, spec, p0, n_future)

    r = mean_rotation(spec, p0, n_future)
    e_avg = np.exp(s * (q @ r.T) @ keys.T).mean(axis=0)
    np.testing.assert_allclose(ea, e_avg / e_avg.sum(), rtol=0.03)

    e_mc = np.exp(logits).mean(axis=0)
    e_mc /= e_mc.sum()
    z_p = np.stack([expected_logits((rp @ mu)[None], (rp @ cov @ rp.T)[None], keys[:, None, :], s)[0]
                    for rp in (mean_rotation(spec, p, 1) for p in range(p0, p0 + n_future))])
    mix = np.exp(z_p).mean(axis=0)
    np.testing.assert_allclose(mix / mix.sum(), e_mc, rtol=0.04)
    # the closed form approximates the mixture (it is the MGF of R̄q, not the mean of the MGFs of R(p)q)
    assert np.max(np.abs(ea / e_mc - 1)) > 0.1

    assert spearman(ea, softmax(logits).mean(axis=0)) > 0.9
    assert spearman(ea, e_mc) > 0.9
    # a wrong layout for R̄ loses the agreement
    wrong = ea_probs(mu, cov, keys, RopeSpec(d, 10000.0, 0.5, not neox), p0, n_future)
    assert np.max(np.abs(wrong / (e_avg / e_avg.sum()) - 1)) > 0.1


# ---------------------------------------------------------------- synthetic views


def make_view(n=40, n_head=4, n_kv=2, d=32, layers=(0,), m=16, seed=0, next_pos=None, neox=False):
    """Cells at positions 0..n-1 with random keys (norm ~1) and unit-norm values; m captured queries."""
    rng = np.random.default_rng(seed)
    keys = {l: unit_rows(rng.normal(size=(n, n_kv, d))) for l in layers}
    values = {l: unit_rows(rng.normal(size=(n, n_kv, d))) for l in layers}
    queries = {l: rng.normal(size=(m, n_head, d)) * 0.1 for l in layers}
    return CellView(
        positions=np.arange(n, dtype=np.int64),
        keys=keys,
        values=values,
        queries=queries,
        query_positions=np.arange(n - m, n, dtype=np.int64),
        rope={l: RopeSpec(d, 10000.0, 1.0, neox) for l in layers},
        next_pos=n if next_pos is None else next_pos,
        seed=seed,
    )


def unit_rows(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_registry_and_unknown_name():
    assert set(POLICIES) == {"expected-attention", "streaming-llm", "random", "knorm", "snapkv", "tova",
                             "h2o", "compactor", "curdkv", "obcache", "morphkv", "lava", "none", "context-shift",
                             "laq"}
    assert get_policy("snapkv") is POLICIES["snapkv"]
    with pytest.raises(ValueError, match=r"unknown policy 'nope'; choose from: .*expected-attention"):
        get_policy("nope")


@pytest.mark.parametrize("name", sorted(set(POLICIES) - {"none"}))  # none scores nothing: test_policies_hooks
def test_every_policy_returns_one_finite_score_per_cell(name):
    # the last 4 captured queries sit at/after next_pos, as the pseudo queries of a lookahead do
    view = make_view(layers=(0, 3), next_pos=36 if get_policy(name).lookahead else None)
    s = get_policy(name).score(view)
    assert s.shape == (view.n,) and s.dtype == np.float64 and np.all(np.isfinite(s))


@pytest.mark.parametrize("neox", LAYOUTS)
def test_expected_attention_keeps_key_aligned_with_mean_query(neox):
    view = make_view(next_pos=100, neox=neox)
    rng = np.random.default_rng(5)
    d = 32
    mu = rng.normal(size=d)
    view.queries[0][:] = mu + 0.05 * rng.normal(size=view.queries[0].shape)  # every head, mean mu
    r = mean_rotation(view.rope[0], view.next_pos, 8)
    target = 17
    view.keys[0][target] = 3.0 * unit(r @ mu)  # both KV heads
    s = get_policy("expected-attention").score(view, n_future_positions=8)
    assert 4 + np.argmax(s[4:]) == target  # cells 0..3 are the sinks, scored above all


def test_expected_attention_gqa_groups_consecutive_heads():
    """n_head=4, n_kv_head=2: heads 0,1 read KV head 0, heads 2,3 read KV head 1."""
    d, n = 32, 30
    rng = np.random.default_rng(3)
    mu0, mu1 = np.zeros(d), np.zeros(d)
    mu0[:16], mu1[16:] = rng.normal(size=16), rng.normal(size=16)  # orthogonal
    keys = 0.05 * rng.normal(size=(n, 2, d))
    keys[3, :] = 10.0 * unit(mu0)
    keys[7, :] = 10.0 * unit(mu1)
    q = np.empty((8, 4, d))
    q[:, 0:2] = mu0
    q[:, 2:4] = mu1
    spec = RopeSpec(d, 10000.0)
    a = expected_attention_layer(q, keys, None, spec, 0, n_future_positions=1, use_covariance=False, use_vnorm=False)
    assert a.shape == (2, n)
    assert a[0, 3] > 0.9 and a[0, 7] < 0.05  # interleaved grouping (h % 2) would split 50/50
    assert a[1, 7] > 0.9 and a[1, 3] < 0.05
    # matches an explicit per-head reference
    ref = np.zeros((2, n))
    for h in range(4):
        z = keys[:, h // 2, :] @ q[0, h] / np.sqrt(d)
        ref[h // 2] += softmax(z) / 2
    np.testing.assert_allclose(a, ref, rtol=1e-5, atol=1e-12)  # keys are scored in float32
    with pytest.raises(ValueError):
        expected_attention_layer(q[:, :3], keys, None, spec, 0, use_vnorm=False)


def test_expected_attention_covariance_changes_ranking():
    """Key 0 has the larger μ·k; key 1 lies along the high-variance direction of Σ and wins with it."""
    d = 8
    e = np.eye(d)
    s = 1 / np.sqrt(d)
    # queries: mean e0, variance 9 along e1 (±3, balanced), none elsewhere
    q = (e[0] + np.outer(np.repeat([-3.0, 3.0], 2000), e[1]))[:, None, :]
    keys = np.stack([1.2 * e[0] + 0.8 * e[2], 1.0 * e[0] + 0.8 * e[1], -e[0]])[:, None, :]
    spec = RopeSpec(d, 10000.0)
    kw = dict(n_future_positions=1, use_vnorm=False)
    with_cov = expected_attention_layer(q, keys, None, spec, 0, use_covariance=True, **kw)[0]
    no_cov = expected_attention_layer(q, keys, None, spec, 0, use_covariance=False, **kw)[0]
    assert no_cov[0] > no_cov[1] > no_cov[2]
    assert with_cov[1] > with_cov[0] > with_cov[2]
    # closed form: z1 - z0 = s (1 - 1.2) + ½ s² k1ᵀΣk1, Σ11 = 9 (covariance divided by N); keys and
    # statistics in float32
    assert np.log(with_cov[1] / with_cov[0]) == pytest.approx(-0.2 * s + 0.5 * s**2 * 0.64 * 9.0, rel=1e-4)
    assert np.log(no_cov[1] / no_cov[0]) == pytest.approx(-0.2 * s, rel=1e-6)


def test_expected_attention_vnorm_and_epsilon():
    view = make_view(layers=(0,), seed=4)
    rng = np.random.default_rng(1)
    view.values[0][:] *= rng.uniform(0.1, 5.0, size=(view.n, 2, 1))
    args = (view.queries[0], view.keys[0], view.vnorms(0), view.rope[0], view.next_pos)
    plain = expected_attention_layer(*args, use_vnorm=False)
    with_v = expected_attention_layer(*args, use_vnorm=True)
    vn = np.linalg.norm(view.values[0], axis=-1).T
    np.testing.assert_allclose(with_v, plain * vn, rtol=1e-12)
    np.testing.assert_allclose(expected_attention_layer(*args, use_vnorm=True, epsilon=0.01), (plain + 0.01) * vn, rtol=1e-12)
    np.testing.assert_allclose(plain.sum(axis=1), 1.0)  # group-averaged softmax stays a distribution


def test_expected_attention_aggregates_and_drops_sink_queries():
    view = make_view(layers=(0, 1), seed=6)
    per = [expected_attention_layer(view.queries[l], view.keys[l], view.vnorms(l), view.rope[l], view.next_pos)
           for l in (0, 1)]
    ea = functools.partial(get_policy("expected-attention").score, newest_query=False)  # the closed form alone
    np.testing.assert_allclose(ea(view, aggregate="mean", n_sink=0), np.mean(np.concatenate(per), axis=0))
    np.testing.assert_allclose(ea(view, aggregate="max", n_sink=0), np.max(np.concatenate(per), axis=0))
    np.testing.assert_allclose(ea(view, n_sink=0), aggregate_scores(per, "union"))  # the default
    np.testing.assert_allclose(ea(view, layers=[1], n_sink=0, aggregate="mean"), per[1].mean(axis=0))
    with pytest.raises(ValueError, match="aggregate"):
        ea(view, aggregate="median")
    with pytest.raises(ValueError, match="layers"):
        ea(view, layers=[5])
    # queries at positions < n_sink are left out of the statistics
    view.query_positions = np.arange(view.queries[0].shape[0])  # 0..15
    view.queries[0][:4] += 50.0
    kept = expected_attention_layer(view.queries[0][4:], view.keys[0], view.vnorms(0), view.rope[0], view.next_pos)
    np.testing.assert_allclose(ea(view, layers=[0], n_sink=4, aggregate="mean", sinks_in_softmax=True),
                               kept.mean(axis=0))
    assert not np.allclose(ea(view, layers=[0], n_sink=0, aggregate="mean"), kept.mean(axis=0))


def test_expected_attention_scores_sinks_outside_the_softmax():
    """As kvpress pads them: the sink cells are left out of the softmax (the other cells' scores are
    the closed form over the non-sink keys alone) and score above every other cell."""
    view = make_view(layers=(0, 1), seed=9)
    view.keys[0][:4] *= 6.0  # sinks that draw most of the attention, unevenly across heads
    ea = functools.partial(get_policy("expected-attention").score, newest_query=False)
    per = [expected_attention_layer(view.queries[l], view.keys[l][4:], view.vnorms(l)[4:], view.rope[l], view.next_pos)
           for l in (0, 1)]
    got = ea(view, n_sink=0, aggregate="mean", layers=[0, 1], sinks_in_softmax=False)  # n_sink 0: nothing left out
    assert not np.allclose(got[4:], np.mean(np.concatenate(per), axis=0))
    out = ea(view, n_sink=4, aggregate="mean")
    np.testing.assert_allclose(out[4:], np.mean(np.concatenate(per), axis=0), rtol=1e-12)
    assert out[:4].min() > out[4:].max()
    inside = ea(view, n_sink=4, aggregate="mean", sinks_in_softmax=True)
    assert not np.allclose(inside[4:], out[4:])  # inside, the sinks take mass from the other cells
    # with "union" the sinks rank first too
    u = ea(view, n_sink=4)
    assert u[:4].min() >= u[4:].max()


def test_expected_attention_pools_without_spreading_the_sinks_padding():
    """Pooling runs over the evictable cells only: the sinks keep their padding, and the cells next to
    them do not inherit it (they would be kept forever, as extra sinks)."""
    view = make_view(layers=(0, 1), seed=9)
    ea = get_policy("expected-attention").score
    plain, pooled = ea(view, kernel_size=1), ea(view, kernel_size=5)
    np.testing.assert_array_equal(pooled[:4], plain[:4])
    np.testing.assert_array_equal(pooled[4:], pool1d(plain[4:], 5, "max"))
    assert pooled[4:].max() < pooled[:4].min()
    view.positions, view.keys = view.positions[:4], {l: k[:4] for l, k in view.keys.items()}
    view.values = {l: v[:4] for l, v in view.values.items()}
    np.testing.assert_array_equal(ea(view, kernel_size=5), ea(view, kernel_size=1))  # sinks only: nothing to pool
    with pytest.raises(ValueError, match="odd"):
        ea(view, kernel_size=4)


@pytest.mark.parametrize("neox", LAYOUTS)
def test_expected_attention_adds_the_newest_querys_rows(neox):
    """The newest query's own expected attention (one query, no covariance) joins the rows that are
    aggregated, so a cell only it looks for is kept: a window of queries that all read one thing and
    a last query that reads another, the case of a needle in filler."""
    view = make_view(n=60, m=32, next_pos=60, neox=neox, seed=3)
    rng = np.random.default_rng(8)
    d = 32
    filler, needle = unit(rng.normal(size=d)), unit(rng.normal(size=d))
    view.queries[0][:] = 2.0 * filler + 0.05 * rng.normal(size=view.queries[0].shape)
    view.queries[0][-1] = 2.0 * needle  # every head
    r = mean_rotation(view.rope[0], view.next_pos, 512)
    view.keys[0][10:30] = 3.0 * unit(r @ filler)  # 20 cells the window reads
    view.keys[0][40] = 3.0 * unit(r @ needle)  # the one the newest query reads
    ea = get_policy("expected-attention").score
    plain, with_newest = ea(view, newest_query=False), ea(view)
    top = lambda s, k: set(np.argsort(-s[4:], kind="stable")[:k] + 4)
    assert 40 not in top(plain, 16) and 40 in top(with_newest, 16)
    per = [expected_attention_layer(view.queries[0], view.keys[0][4:], view.vnorms(0)[4:], view.rope[0], 60),
           expected_attention_layer(view.queries[0][[-1]], view.keys[0][4:], view.vnorms(0)[4:], view.rope[0], 60,
                                    use_covariance=False)]
    union = lambda rows: aggregate_scores(rows, "union") * 56 / 60  # ranks among 56 cells below 4 padded sinks
    np.testing.assert_allclose(with_newest[4:], union(per))
    # the newest real query: the probe's answer tokens after it join the window, not the newest rows
    view.queries = {0: np.concatenate([view.queries[0], rng.normal(size=(2, 4, d))])}
    view.query_positions = np.concatenate([view.query_positions, [60, 61]])
    view.pseudo_queries = 2
    np.testing.assert_allclose(ea(view)[4:], union(
        [expected_attention_layer(view.queries[0], view.keys[0][4:], view.vnorms(0)[4:], view.rope[0], 60),
         per[1]]))


def test_streaming_llm_ranks_newest_highest():
    view = make_view()
    view.positions = np.array([0, 1, 2, 3, 10, 11, 50, 51, 52, 90] + list(range(100, 130)), dtype=np.int64)
    s = get_policy("streaming-llm").score(view)
    assert list(np.argsort(-s)[:5]) == [39, 38, 37, 36, 35]
    assert np.all(np.diff(s) > 0)


def test_random_is_seeded():
    view = make_view()
    rnd = get_policy("random").score
    a, b = rnd(view), rnd(view)
    np.testing.assert_array_equal(a, b)
    view.seed = 1
    assert not np.allclose(rnd(view), a)
    assert np.all((a >= 0) & (a < 1))


def test_knorm_prefers_low_norm_key():
    view = make_view(layers=(0, 2))
    view.keys[0][9] *= 0.1
    view.keys[2][9] *= 0.1
    s = get_policy("knorm").score(view)
    assert np.argmax(s) == 9
    expected = -np.mean([np.linalg.norm(view.keys[l], axis=-1) for l in (0, 2)], axis=(0, 2))
    np.testing.assert_allclose(s, expected)


def window_aligned_view(neox=False, target=12):
    """Queries near mu at positions 32..39; key `target` aligned with the mean RoPE'd query."""
    view = make_view(n=40, m=8, neox=neox, seed=2)
    rng = np.random.default_rng(9)
    mu = rng.normal(size=32)
    view.queries[0][:] = mu + 0.05 * rng.normal(size=view.queries[0].shape)
    rotated = apply_rope(np.tile(mu, (8, 1)), view.query_positions, view.rope[0])
    view.keys[0][target] = 4.0 * unit(rotated.mean(axis=0))
    return view


@pytest.mark.parametrize("neox", LAYOUTS)
def test_snapkv_keeps_key_aligned_with_window_queries(neox):
    view = window_aligned_view(neox)
    snap = get_policy("snapkv").score
    s1 = snap(view, kernel_size=1)
    assert np.argmax(s1) == 12
    s5 = snap(view)  # max pooling over 5 cells keeps the neighbours of the hit too
    assert s5[12] == s5.max() and s5[10] == s5[14] == s5.max()
    assert s5[9] < s5.max() and s5[15] < s5.max()
    # real attention: reference computed directly
    d = 32
    q = apply_rope(view.queries[0].transpose(1, 0, 2), view.query_positions, view.rope[0])  # (4, 8, d)
    ref = np.zeros((2, view.n))
    for h in range(4):
        lg = q[h] @ view.keys[0][:, h // 2, :].T / np.sqrt(d)
        lg[view.positions[None, :] > view.query_positions[:, None]] = -np.inf
        ref[h // 2] += softmax(lg).sum(axis=0) / 2
    np.testing.assert_allclose(s1, ref.mean(axis=0), rtol=1e-12)


def test_snapkv_causal_mask_and_window():
    view = window_aligned_view()
    # newest cell 39 is seen only by the query at position 39
    only_last = get_policy("snapkv").score(view, window_size=1, kernel_size=1)
    all_q = get_policy("snapkv").score(view, kernel_size=1)
    assert only_last.sum() == pytest.approx(1.0)  # one query, heads averaged: a distribution
    assert all_q.sum() == pytest.approx(8.0)
    view.query_positions = view.query_positions - 5  # now no query sees cells 35..39
    assert np.all(get_policy("snapkv").score(view, kernel_size=1)[35:] == 0)


def test_pool1d():
    x = np.array([0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 5.0])
    np.testing.assert_array_equal(pool1d(x, 3, "max"), [1, 1, 1, 0, 0, 5, 5])
    np.testing.assert_allclose(pool1d(x, 3, "avg"), [1 / 3, 1 / 3, 1 / 3, 0, 0, 5 / 3, 5 / 3])
    np.testing.assert_array_equal(pool1d(x, 1), x)
    with pytest.raises(ValueError):
        pool1d(x, 4)


@pytest.mark.parametrize("neox", LAYOUTS)
def test_tova_uses_last_query_only(neox):
    view = window_aligned_view(neox)
    # the last query (position 39) points elsewhere: at key 25 rotated to 39
    rng = np.random.default_rng(11)
    other = rng.normal(size=32)
    view.queries[0][-1] = other
    view.keys[0][25] = 4.0 * unit(apply_rope(other, 39, view.rope[0]))
    s = get_policy("tova").score(view)
    assert np.argmax(s) == 25
    assert s.sum() == pytest.approx(1.0)
    # shuffled capture order: the last query is the one with the highest position
    perm = np.array([7, 2, 4, 3, 6, 5, 0, 1])  # the newest query is captured first
    view.queries[0] = view.queries[0][perm]
    view.query_positions = view.query_positions[perm]
    np.testing.assert_allclose(get_policy("tova").score(view), s, rtol=1e-12)
    # and snapkv (all window queries) still favours the key of the other 7
    assert np.argmax(get_policy("snapkv").score(view, kernel_size=1)) == 12


@pytest.mark.parametrize("neox", LAYOUTS)
def test_tova_skips_the_probes_answer_tokens(neox):
    """With a probed question the engine appends greedy answer tokens (pseudo queries); TOVA's last
    query is the newest real one, so the score equals that of the view without them."""
    view = window_aligned_view(neox)
    rng = np.random.default_rng(5)
    extra = rng.normal(size=(3,) + view.queries[0].shape[1:])
    view.keys[0][30] = 4.0 * unit(apply_rope(extra[-1, 0], 42, view.rope[0]))  # the last pseudo query's key
    s_real = get_policy("tova").score(view)
    view.queries = {0: np.concatenate([view.queries[0], extra])}
    view.query_positions = np.concatenate([view.query_positions, [40, 41, 42]])
    assert np.argmax(get_policy("tova").score(view)) == 30  # unmarked, the answer's last token decides
    view.pseudo_queries = 3
    np.testing.assert_allclose(get_policy("tova").score(view), s_real, rtol=1e-12)


def test_aggregate_scores():
    a = np.array([[1.0, 2.0], [3.0, 0.0]])
    b = np.array([[5.0, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(aggregate_scores([a, b], "mean"), [2.5, 1.0])
    np.testing.assert_allclose(aggregate_scores([a, b], "max"), [5.0, 2.0])
    # share: each row sums to 1 over the evictable cells before the mean
    np.testing.assert_allclose(aggregate_scores([a, b], "share"), np.mean([[1/3, 2/3], [1, 0], [5/6, 1/6], [.5, .5]], 0))
    # a layer that puts its mass on a sink (cell 0, not evictable) still votes in full on the rest
    sink_heavy, flat = np.array([100.0, 1.0, 3.0]), np.array([0.0, 2.0, 2.0])
    ev = np.array([False, True, True])
    np.testing.assert_allclose(aggregate_scores([sink_heavy, flat], "share", evictable=ev)[1:], [0.375, 0.625])
    # union: a cell's best rank in any row; keeping the top 2 keeps each layer's own best cell
    u = aggregate_scores([np.array([1.0, 5.0, 3.0, 3.0]), np.array([9.0, 0.0, 1.0, 2.0])], "union")
    np.testing.assert_allclose(u, [0.75, 0.75, 0.25, 0.5])
    assert set(np.argsort(-u, kind="stable")[:2]) == {0, 1}


def test_tova_averages_all_heads_of_layer_and_layers():
    view = make_view(layers=(0, 1), seed=8)
    view.queries = {l: q * 30 for l, q in view.queries.items()}  # peaked attention
    d = 32
    per_layer = []
    for l in (0, 1):
        q = apply_rope(view.queries[l][-1], 39, view.rope[l])  # (4, d), the newest query
        per_layer.append(np.mean([softmax(view.keys[l][:, h // 2, :] @ q[h] / np.sqrt(d)) for h in range(4)], axis=0))
    np.testing.assert_allclose(get_policy("tova").score(view), np.mean(per_layer, axis=0), rtol=1e-12)
    np.testing.assert_allclose(get_policy("tova").score(view, aggregate="max"), np.max(per_layer, axis=0), rtol=1e-12)


def test_cholesky_factor_takes_singular_and_slightly_indefinite_covariances():
    """Σ of rank 1, and the same with an eigenvalue of -1e-5 of the largest (float32 rounding does
    that): L Lᵀ - δ I gives Σ back, δ is small next to Σ's scale, and a non-finite Σ is refused."""
    u = np.random.default_rng(0).normal(size=(16, 1))
    low = u @ u.T
    v = np.linalg.eigh(low)[1][:, 0]
    for cov in (low, low - 1e-5 * np.trace(low) * np.outer(v, v)):
        lower, delta = cholesky_factor(cov[None])
        np.testing.assert_allclose(lower[0] @ lower[0].T - delta[0] * np.eye(16), cov, atol=1e-4 * np.trace(low))
        assert np.allclose(lower[0], np.tril(lower[0])) and 0 < delta[0] <= 1e-2 * np.trace(low) / 16
    with pytest.raises(ValueError):
        cholesky_factor(np.full((1, 4, 4), np.nan))


@pytest.mark.parametrize("m, rank", [(7, 32), (40, 32), (40, 5), (40, 0)])
def test_factored_float32_scores_equal_the_float64_covariance_form(m, rank):
    """The layer's fast path (keys in float32; centred queries as the factor when m ≤ d, a blocked
    Cholesky factor of Σ' when m > d, singular Σ included) gives the scores of the explicit float64 form
    z = s μ'·k + ½ s² kᵀ(R̄ΣR̄ᵀ)k, GQA groups of 3 query heads per KV head included."""
    rng = np.random.default_rng(m + rank)
    d, n_head, n_kv, n = 32, 6, 2, 300
    spec = RopeSpec(d, 10000.0, 1.0, False)
    spread = rng.normal(size=(m, n_head, rank)) @ rng.normal(size=(rank, d))  # Σ of rank `rank` per head
    q = spread * 2.0 + rng.normal(size=(1, n_head, d))
    keys = rng.normal(size=(n, n_kv, d)) * 1.5
    w = rng.uniform(0.5, 2.0, size=m)
    got = expected_attention_layer(q, keys, None, spec, 900, n_future_positions=64, use_vnorm=False, weights=w)
    mu, cov = query_statistics(q, True, w)
    r = mean_rotation(spec, 900, 64, head_dim=d)
    z = expected_logits(mu @ r.T, r @ cov @ r.T, keys, 1.0 / np.sqrt(d))
    ref = softmax(z, axis=-1).reshape(n_kv, n_head // n_kv, n).mean(axis=1)
    np.testing.assert_allclose(got, ref, rtol=2e-4, atol=1e-9)
    for a, b in zip(got, ref):  # the same cells would be evicted
        assert set(np.argsort(a)[:150]) == set(np.argsort(b)[:150])
