"""The literature baselines h2o, compactor, curdkv, obcache, morphkv and lava on synthetic views
whose right answer is known, and against explicit per-head references."""
import numpy as np
import pytest

from ea_local.policies import POLICIES, get_policy
from ea_local.policies.base import RopeSpec
from ea_local.policies.compactor import leverage_scores, unrotate, zscore
from ea_local.policies.curdkv import row_leverage
from ea_local.policies.expected_attention import softmax
from ea_local.policies.lava import lava_layer
from ea_local.policies.morphkv import morphkv_layer
from ea_local.policies.obcache import obcache_layer
from ea_local.policies.snapkv import pool1d
from ea_local.model.rope import apply_rope, magnitude

from .test_policies import make_view, unit, unit_rows, window_aligned_view

NEW = ["h2o", "compactor", "curdkv", "obcache", "morphkv", "lava"]
D = 32


def attention(view, layer, window=None):
    """(n_head, m, n) real causal attention of the (last `window`) captured queries, explicit per head."""
    qpos = view.query_positions if window is None else view.query_positions[-window:]
    qs = view.queries[layer] if window is None else view.queries[layer][-window:]
    q = apply_rope(qs.transpose(1, 0, 2), qpos, view.rope[layer])
    n_head, n_kv = q.shape[0], view.keys[layer].shape[1]
    out = []
    for h in range(n_head):
        lg = q[h] @ view.keys[layer][:, h // (n_head // n_kv), :].T / np.sqrt(D)
        lg[view.positions[None, :] > qpos[:, None]] = -np.inf
        out.append(softmax(lg))
    return np.array(out)


def test_registry_has_the_new_policies_with_their_inputs():
    assert set(NEW) <= set(POLICIES)
    for name in NEW:
        p = get_policy(name)
        assert p.description and "20" in p.paper and p.needs_keys
    assert [n for n in NEW if POLICIES[n].needs_queries] == ["h2o", "compactor", "obcache", "morphkv", "lava"]
    assert [n for n in NEW if POLICIES[n].needs_values] == ["compactor", "curdkv", "obcache", "lava"]


@pytest.mark.parametrize("name", NEW)
def test_new_policies_are_deterministic_and_handle_gqa(name):
    view = make_view(layers=(0, 3), seed=3)  # n_head=4, n_kv_head=2
    a, b = get_policy(name).score(view), get_policy(name).score(view)
    assert a.shape == (view.n,) and np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- h2o


def test_h2o_is_the_summed_window_attention():
    view = make_view(layers=(0, 1), seed=8)
    view.queries = {l: q * 30 for l, q in view.queries.items()}
    ref = np.mean([attention(view, l).sum(axis=1).reshape(2, 2, -1).mean(axis=1) for l in (0, 1)], axis=(0, 1))
    np.testing.assert_allclose(get_policy("h2o").score(view), ref, rtol=1e-12)
    # one query: TOVA's score
    np.testing.assert_allclose(get_policy("h2o").score(view, window_size=1), get_policy("tova").score(view), rtol=1e-12)


def test_h2o_keeps_the_heavy_hitter_without_pooling():
    view = window_aligned_view(target=12)
    s = get_policy("h2o").score(view)
    assert np.argmax(s) == 12
    assert s.sum() == pytest.approx(8.0)  # 8 window queries, each a distribution
    assert s[11] < 0.5 * s[12] and s[13] < 0.5 * s[12]  # no pooling: the neighbours are not lifted


# ---------------------------------------------------------------- morphkv


def morph_view():
    """Window = 8 queries at 32..39: seven near mu, the last one along `other`.

    Key 10 is moderately aligned with mu (seven moderate votes), key 20 strongly with the last query (one big vote).
    """
    view = make_view(n=40, m=8, seed=2)
    rng = np.random.default_rng(4)
    mu, other = rng.normal(size=D), rng.normal(size=D)
    view.queries[0][:] = mu + 0.05 * rng.normal(size=view.queries[0].shape)
    view.queries[0][-1] = other
    rot = apply_rope(np.tile(mu, (7, 1)), view.query_positions[:7], view.rope[0]).mean(axis=0)
    view.keys[0][10] = 3.0 * unit(rot)
    view.keys[0][20] = 6.0 * unit(apply_rope(other, 39, view.rope[0]))
    return view


def test_morphkv_max_and_sum_fusion():
    view = morph_view()
    mx = get_policy("morphkv").score(view)  # fusion="max" by default
    sm = get_policy("morphkv").score(view, fusion="sum")
    assert np.argmax(mx[:32]) == 20 and np.argmax(sm[:32]) == 10
    # the window's own cells get the fusion's upper bound; the distant cells share each query's softmax
    np.testing.assert_array_equal(mx[32:], 1.0)
    np.testing.assert_array_equal(sm[32:], 8.0)
    assert sm[:32].sum() == pytest.approx(8.0)
    # explicit reference: softmax restricted to the distant cells, fused, group-averaged
    a = attention(view, 0)[:, :, :32]
    a = a / a.sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(mx[:32], a.max(axis=1).mean(axis=0), rtol=1e-12)
    a4 = attention(view, 0, window=4)[:, :, :36]  # window 36..39: cells 0..35 are distant
    a4 = a4 / a4.sum(axis=-1, keepdims=True)
    s4 = get_policy("morphkv").score(view, window_size=4, fusion="sum")
    np.testing.assert_allclose(s4[:36], a4.sum(axis=1).mean(axis=0), rtol=1e-12)
    np.testing.assert_array_equal(s4[36:], 4.0)
    with pytest.raises(ValueError, match="fusion"):
        get_policy("morphkv").score(view, fusion="mean")


def test_morphkv_gqa_groups_query_heads():
    """Heads 0,1 (KV head 0) look for key 3, heads 2,3 (KV head 1) for key 7."""
    rng = np.random.default_rng(3)
    n, spec = 30, RopeSpec(D, 10000.0)
    mu0, mu1 = np.zeros(D), np.zeros(D)
    mu0[:16], mu1[16:] = rng.normal(size=16), rng.normal(size=16)
    qpos = np.arange(26, 30)
    keys = 0.05 * rng.normal(size=(n, 2, D))
    keys[3, :] = 10.0 * unit(apply_rope(mu0, 28, spec))
    keys[7, :] = 10.0 * unit(apply_rope(mu1, 28, spec))
    q = np.empty((4, 4, D))
    q[:, 0:2], q[:, 2:4] = mu0, mu1
    out = morphkv_layer(q, qpos, keys, np.arange(n), spec)
    assert out.shape == (2, n) and np.argmax(out[0, :26]) == 3 and np.argmax(out[1, :26]) == 7


# ---------------------------------------------------------------- obcache


def obcache_reference(view, layer):
    """Per query head: a, z, o explicit; returns value, key and joint saliency (n_kv, n), group means."""
    a = attention(view, layer)
    q = apply_rope(view.queries[layer].transpose(1, 0, 2), view.query_positions, view.rope[layer])
    out = {k: np.zeros((2, view.n)) for k in ("value", "key", "joint")}
    for h in range(4):
        k, v = view.keys[layer][:, h // 2], view.values[layer][:, h // 2]
        z = q[h] @ k.T / np.sqrt(D)  # (m, n)
        o = a[h] @ v  # (m, d)
        for i in range(view.n):
            dv = v[i][None, :] - o  # (m, d)
            out["value"][h // 2, i] += (a[h][:, i] ** 2).sum() * (v[i] @ v[i]) / 2
            out["key"][h // 2, i] += ((a[h][:, i] * z[:, i]) ** 2 * (dv * dv).sum(1)).sum() / 2
            joint = v[i][None, :] + z[:, i][:, None] * dv  # Δo / a: drop the key and the value
            out["joint"][h // 2, i] += ((a[h][:, i] ** 2) * (joint * joint).sum(1)).sum() / 2
    return out


@pytest.mark.parametrize("saliency", ["value", "key", "joint"])
def test_obcache_matches_explicit_brain_damage_scores(saliency):
    view = make_view(layers=(0,), seed=5, n=24, m=6)
    view.queries[0] *= 20
    view.values[0] *= np.random.default_rng(0).uniform(0.2, 3.0, size=(24, 2, 1))
    ref = obcache_reference(view, 0)[saliency]
    got = obcache_layer(view.queries[0], view.query_positions, view.keys[0], view.values[0], view.positions,
                        view.rope[0], saliency=saliency)
    np.testing.assert_allclose(got, ref, rtol=1e-10)
    np.testing.assert_allclose(get_policy("obcache").score(view, saliency=saliency), ref.mean(axis=0), rtol=1e-10)


def test_obcache_is_output_aware():
    view = window_aligned_view(target=12)
    ob = get_policy("obcache").score
    assert np.argmax(ob(view)) == 12  # the most attended key (unit values)
    # same attention, larger value: the value saliency keeps it, H2O cannot tell
    view.keys[0][25] = view.keys[0][12]
    view.values[0][25] *= 2.0
    assert np.argmax(ob(view)) == 25
    h = get_policy("h2o").score(view)
    assert h[25] == pytest.approx(h[12], rel=1e-9)
    # identical values: removing a key leaves every output unchanged (key saliency 0), the value saliency does not
    view.values[0][:] = view.values[0][3]
    key = ob(view, saliency="key")
    assert np.all(key >= 0) and key.max() < 1e-9 * ob(view).max() and ob(view).min() > 0
    with pytest.raises(ValueError, match="saliency"):
        ob(view, saliency="both")


# ---------------------------------------------------------------- lava


def test_lava_matches_explicit_reference():
    view = make_view(layers=(0, 1), seed=9)
    view.queries = {l: q * 20 for l, q in view.queries.items()}
    per_layer = []
    for l in (0, 1):
        a = attention(view, l)  # m=16 <= window 32: all queries
        pooled = pool1d(a.mean(axis=1), 7, "max")  # (4, n)
        vmax = np.abs(view.values[l]).sum(-1).max(axis=0)  # (2,) per KV head
        s = np.max([pooled[h] * vmax[h // 2] for h in range(4)], axis=0)
        per_layer.append(s / s.sum())
    np.testing.assert_allclose(get_policy("lava").score(view), np.mean(per_layer, axis=0), rtol=1e-12)
    assert get_policy("lava").score(view).sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="value_norm"):
        get_policy("lava").score(view, value_norm="l2")


def test_lava_compares_heads_by_their_value_norm():
    """KV head 0 attends to key 5, KV head 1 to key 20: the head with the larger values decides."""
    rng = np.random.default_rng(1)
    n, spec = 40, RopeSpec(D, 10000.0)
    mu0, mu1 = np.zeros(D), np.zeros(D)
    mu0[:16], mu1[16:] = 6.0 * unit(rng.normal(size=16)), 6.0 * unit(rng.normal(size=16))
    qpos = np.arange(32, 40)
    keys = 0.05 * rng.normal(size=(n, 2, D))
    keys[5, 0] = 0.8 * 6.0 * unit(apply_rope(mu0, 36, spec))
    keys[20, 1] = 6.0 * unit(apply_rope(mu1, 36, spec))  # the stronger hit
    q = np.empty((8, 4, D))
    q[:, 0:2], q[:, 2:4] = mu0, mu1
    values = unit_rows(rng.normal(size=(n, 2, D)))
    kw = dict(kernel_size=1)
    s = lava_layer(q, qpos, keys, values, np.arange(n), spec, **kw).max(axis=0)
    assert np.argmax(s) == 20
    values[:, 0] *= 10.0  # head 0 now writes 10x more into the residual stream
    s = lava_layer(q, qpos, keys, values, np.arange(n), spec, **kw).max(axis=0)
    assert np.argmax(s) == 5
    # per-token value norm: within one head, equal attention, the larger value wins
    values[:] = unit_rows(values)
    keys[6, 0] = keys[5, 0]
    values[6, 0] *= 3.0
    tok = lava_layer(q, qpos, keys, values, np.arange(n), spec, value_norm="token", **kw)
    head = lava_layer(q, qpos, keys, values, np.arange(n), spec, **kw)
    assert np.argmax(tok[0]) == 6 and head[0, 5] == pytest.approx(head[0, 6])


# ---------------------------------------------------------------- compactor


def test_leverage_scores_exact_and_sketched():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)) * np.linspace(0.5, 2, 8)
    x[17] += 20.0 * unit(rng.normal(size=8))  # an outlier
    xc = x - x.mean(0)
    exact = np.einsum("nd,de,ne->n", xc, np.linalg.inv(xc.T @ xc), xc)  # k_iᵀ (KᵀK)⁻¹ k_i
    lev = leverage_scores(x)
    np.testing.assert_allclose(lev, exact, rtol=1e-10)
    assert lev.sum() == pytest.approx(8.0) and np.argmax(lev) == 17
    # a right sketch wider than d spans the same columns: exact again; narrower: rank k, outlier still on top
    np.testing.assert_allclose(leverage_scores(x, 48, np.random.default_rng(1)), exact, rtol=1e-8)
    narrow = leverage_scores(x, 4, np.random.default_rng(1))
    assert narrow.sum() == pytest.approx(4.0, abs=1e-9) and np.argmax(narrow) == 17


def test_compactor_leverage_of_pre_rope_keys_and_outlier():
    view = make_view(n=80, layers=(0,), seed=7)  # 72 scored cells > d: leverage is informative
    rng = np.random.default_rng(2)
    pre = rng.normal(size=(view.n, 2, D))
    pre[23] += 5.0 * unit(rng.normal(size=D))  # an outlier key (both KV heads)
    view.keys[0] = apply_rope(pre.transpose(1, 0, 2), view.positions, view.rope[0]).transpose(1, 0, 2)
    s = get_policy("compactor").score(view, attention=False, sketch_dimension=None)
    assert np.argmax(s[8:]) + 8 == 23
    sel = slice(8, None)
    lev = np.stack([leverage_scores(pre[sel, j]) for j in range(2)])
    np.testing.assert_allclose(s[sel], zscore(lev).mean(axis=0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(s[:8], zscore(lev).max())  # the sinks: the layer's top score
    # leverage of the post-RoPE keys would differ: the un-rotation matters
    post = np.stack([leverage_scores(view.keys[0][sel, j]) for j in range(2)])
    assert not np.allclose(zscore(post).mean(0), s[sel], atol=1e-3)
    # sketched (48 >= d: same span) equals exact; narrower sketches depend on view.seed
    np.testing.assert_allclose(get_policy("compactor").score(view, attention=False), s, rtol=1e-7, atol=1e-9)
    a = get_policy("compactor").score(view, attention=False, sketch_dimension=8)
    view.seed = 1
    assert not np.allclose(a, get_policy("compactor").score(view, attention=False, sketch_dimension=8))


def test_compactor_unrotates_yarn_keys_with_the_attention_factor():
    # YaRN x4 with a file attention factor (as rope_model reads it) on a partial rotary: 16 of 32 dims
    # rotated, so llama.cpp's magnitude m scales the rotated dims of a cached key and not the rest
    spec = RopeSpec(16, 10000.0, 0.25, neox=True, ext_factor=1.0, attn_factor=1.25, n_ctx_orig=64)
    m = magnitude(spec)
    assert m == pytest.approx(1.25 * (1 + 0.1 * np.log(4.0)))
    view = make_view(n=80, layers=(0,), seed=5)
    view.rope[0] = spec
    rng = np.random.default_rng(4)
    pre = rng.normal(size=(view.n, 2, D)) * np.r_[np.full(16, 1.0), np.full(16, 3.0)]  # unrotated dims matter
    pre[31] += 6.0 * unit(rng.normal(size=D))
    view.keys[0] = apply_rope(pre.transpose(1, 0, 2), view.positions, spec).transpose(1, 0, 2)
    back = unrotate(view.keys[0].transpose(1, 0, 2), view.positions, spec).transpose(1, 0, 2)
    np.testing.assert_allclose(back, pre, rtol=1e-9, atol=1e-9)  # exactly the pre-RoPE keys
    # exact leverage ignores any invertible rescaling of the dimensions; the sketch (8 < d columns) does not
    s = get_policy("compactor").score(view, attention=False, sketch_dimension=8)
    sel = slice(8, None)

    def lev(keys):  # the policy's draws: one sketch per KV head from view.seed, in order
        rng = np.random.default_rng(view.seed)
        return zscore(np.stack([leverage_scores(keys[j], 8, rng) for j in range(2)])).mean(axis=0)

    np.testing.assert_allclose(s[sel], lev(pre[sel].transpose(1, 0, 2)), rtol=1e-9, atol=1e-12)
    # R(-p) alone leaves m² on the rotated dims: a different sketch of the keys, a different ranking
    stray = apply_rope(view.keys[0].transpose(1, 0, 2), -view.positions, spec)[:, sel]
    assert not np.allclose(lev(stray), s[sel], atol=1e-2)


def test_compactor_blends_window_attention_times_value_norm():
    view = make_view(layers=(0,), seed=11)
    view.queries[0] *= 20
    view.values[0] *= np.random.default_rng(3).uniform(0.5, 2.0, size=(view.n, 2, 1))
    sel = slice(8, None)
    keep = view.positions >= 8
    sub = make_view(layers=(0,), seed=11)  # attention over the non-sink cells only
    sub.positions, sub.keys, sub.queries = view.positions[keep], {0: view.keys[0][keep]}, view.queries
    a = attention(sub, 0).sum(axis=1).reshape(2, 2, -1).mean(axis=1)  # (n_kv, n')
    att = pool1d(a * np.linalg.norm(view.values[0][sel], axis=-1).T, 3, "avg")
    pre = apply_rope(view.keys[0][sel].transpose(1, 0, 2), -view.positions[sel], view.rope[0])
    lev = np.stack([leverage_scores(pre[j]) for j in range(2)])
    layer = zscore(att) + 0.5 * zscore(lev)
    got = get_policy("compactor").score(view, sketch_dimension=None, blending=0.5)
    np.testing.assert_allclose(got[sel], layer.mean(axis=0), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- curdkv


def test_curdkv_keeps_large_value_and_key_rows():
    view = make_view(layers=(0, 2), seed=4)
    view.values[0][14] *= 6.0  # an unusually large value row (both KV heads)
    view.values[2][14] *= 6.0
    cur = get_policy("curdkv").score
    for combine in ("kv_product", "value", "kv_avg"):
        assert np.argmax(cur(view, combine=combine)) == 14
    view.keys[0][30] *= 8.0
    assert np.argmax(cur(view, combine="key")) == 30
    assert cur(view).sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="combine"):
        cur(view, combine="kv_max")


def test_curdkv_local_block_leverage_reference():
    view = make_view(layers=(0,), seed=6)
    rng = np.random.default_rng(5)
    view.keys[0] *= rng.uniform(0.5, 2, size=(view.n, 2, 1))
    view.values[0] *= rng.uniform(0.5, 2, size=(view.n, 2, 1))

    def blocks(r):  # blocks of 16 cells: 0..15, 16..31, 32..39
        return np.concatenate([b / b.sum() for b in np.split(r, [16, 32])])

    ref = []
    for j in range(2):
        k2 = blocks((view.keys[0][:, j] ** 2).sum(-1))
        v2 = blocks((view.values[0][:, j] ** 2).sum(-1))
        ref.append(k2 * v2 / (k2 * v2).sum())
    np.testing.assert_allclose(get_policy("curdkv").score(view), np.mean(ref, axis=0), rtol=1e-12)
    whole = row_leverage(view.values[0][:, 0], local_window=None)
    np.testing.assert_allclose(whole, (view.values[0][:, 0] ** 2).sum(-1) / (view.values[0][:, 0] ** 2).sum())
    # a Gaussian projection is seeded by the view and keeps the large row on top
    view.values[0][9] *= 6.0
    p = get_policy("curdkv").score(view, combine="value", projection_dim=20, local_window=None)
    np.testing.assert_array_equal(p, get_policy("curdkv").score(view, combine="value", projection_dim=20,
                                                                 local_window=None))
    assert np.argmax(p) == 9
