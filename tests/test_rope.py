"""RoPE in llama.cpp's two layouts and the averaged rotation R̄ used by Expected Attention."""
import numpy as np
import pytest

from ea_local.policies.base import RopeSpec
from ea_local.model.rope import apply_rope, mean_rotate, mean_rotation, theta

LAYOUTS = [pytest.param(False, id="norm"), pytest.param(True, id="neox")]


def rotation_matrix(spec: RopeSpec, pos: int, d: int) -> np.ndarray:
    """R(pos) column by column: R e_i = apply_rope(e_i, pos)."""
    return apply_rope(np.eye(d), np.full(d, pos), spec).T


def test_theta_matches_llama_cpp_definition():
    spec = RopeSpec(n_dims=8, freq_base=10000.0, freq_scale=0.5)
    expected = 0.5 * np.array([10000.0 ** (-2 * i / 8) for i in range(4)])
    np.testing.assert_allclose(theta(spec), expected, rtol=1e-15)


def test_pairs_follow_layout():
    """NORM rotates (0,1), NEOX rotates (0, d/2): check where e_0 goes at position 1."""
    w0 = theta(RopeSpec(4, 10000.0))[0]  # = 1
    e0 = np.array([[1.0, 0.0, 0.0, 0.0]])
    norm = apply_rope(e0, [1], RopeSpec(4, 10000.0, neox=False))[0]
    neox = apply_rope(e0, [1], RopeSpec(4, 10000.0, neox=True))[0]
    np.testing.assert_allclose(norm, [np.cos(w0), np.sin(w0), 0, 0], atol=1e-15)
    np.testing.assert_allclose(neox, [np.cos(w0), 0, np.sin(w0), 0], atol=1e-15)
    assert not np.allclose(norm, neox)


@pytest.mark.parametrize("neox", LAYOUTS)
def test_rope_identity_at_zero_norm_preserving_and_additive(neox):
    spec = RopeSpec(16, 10000.0, 0.25, neox)
    x = np.random.default_rng(0).normal(size=(3, 5, 16))
    np.testing.assert_array_equal(apply_rope(x, np.zeros(5), spec), x)
    y = apply_rope(x, np.arange(5) * 37, spec)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-12)
    # R(a) R(b) = R(a + b)
    np.testing.assert_allclose(apply_rope(apply_rope(x, [3] * 5, spec), [11] * 5, spec), apply_rope(x, [14] * 5, spec), atol=1e-12)


def test_partial_rotary_leaves_tail_dims():
    spec = RopeSpec(8, 10000.0, neox=True)
    x = np.random.default_rng(1).normal(size=(4, 12))
    y = apply_rope(x, np.arange(4) + 5, spec)
    np.testing.assert_array_equal(y[:, 8:], x[:, 8:])
    r = mean_rotation(spec, 5, 7, head_dim=12)
    np.testing.assert_array_equal(r[8:, 8:], np.eye(4))
    np.testing.assert_array_equal(r[:8, 8:], 0)


@pytest.mark.parametrize("neox", LAYOUTS)
@pytest.mark.parametrize(
    "d, base, scale, p0, n_future",
    [(16, 10000.0, 1.0, 0, 1), (16, 10000.0, 1.0, 300, 64), (32, 1e6, 0.25, 5000, 512), (128, 5e5, 0.5, 100_000, 257)],
)
def test_mean_rotation_equals_explicit_mean(neox, d, base, scale, p0, n_future):
    spec = RopeSpec(d, base, scale, neox)
    explicit = np.mean([rotation_matrix(spec, p0 + j, d) for j in range(n_future)], axis=0)
    r = mean_rotation(spec, p0, n_future)
    np.testing.assert_allclose(r, explicit, atol=1e-11)
    q = np.random.default_rng(2).normal(size=d)
    rotated = apply_rope(np.tile(q, (n_future, 1)), p0 + np.arange(n_future), spec)
    np.testing.assert_allclose(r @ q, rotated.mean(axis=0), atol=1e-11)
    x = np.random.default_rng(3).normal(size=(5, 2, d + 4))  # rows of heads, 4 unrotated dims past n_dims
    np.testing.assert_allclose(mean_rotate(x, spec, p0, n_future), x @ mean_rotation(spec, p0, n_future, d + 4).T,
                               atol=1e-11)
    assert mean_rotate(x.astype(np.float32), spec, p0, n_future).dtype == np.float32


def test_mean_rotation_layouts_differ_and_single_position_is_rotation():
    a = mean_rotation(RopeSpec(16, 10000.0, neox=False), 40, 8)
    b = mean_rotation(RopeSpec(16, 10000.0, neox=True), 40, 8)
    assert not np.allclose(a, b)
    spec = RopeSpec(16, 10000.0, neox=True)
    np.testing.assert_allclose(mean_rotation(spec, 40, 1), rotation_matrix(spec, 40, 16), atol=1e-14)
    np.testing.assert_allclose(mean_rotation(spec, 0, 1), np.eye(16), atol=1e-15)


def test_mean_rotation_rejects_bad_arguments():
    with pytest.raises(ValueError):
        mean_rotation(RopeSpec(16, 10000.0), 0, 0)
    with pytest.raises(ValueError):
        mean_rotation(RopeSpec(16, 10000.0), 0, 4, head_dim=8)
