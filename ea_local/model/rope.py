"""Rotary position embedding (RoPE) as llama.cpp applies it, in numpy (float64).

llama.cpp (ggml-cpu ops.cpp: ``ggml_rope_cache_init``, ``rope_yarn``) rotates pair i of a head
by the angle ``pos * theta_i`` and scales it by ``m``:

    out_a = m (x_a cos - x_b sin),    out_b = m (x_a sin + x_b cos)

    theta_extrap_i = freq_base ** (-2 i / n_dims) / freq_factors[i]       (rope_freqs: Llama-3.x)
    theta_interp_i = freq_scale * theta_extrap_i                          (linear scaling)
    YaRN (ext_factor != 0): theta_i = theta_interp_i (1 - r_i) + theta_extrap_i r_i, with the ramp
        r_i = ext_factor * (1 - clip((i - lo) / max(0.001, hi - lo), 0, 1)) between the correction
        dims lo, hi (``ggml_rope_yarn_corr_dims``), and m = attn_factor (1 + 0.1 ln(1 / freq_scale));
    otherwise theta_i = theta_interp_i and m = attn_factor.

The pair (a, b) is (2i, 2i+1) for LLAMA_ROPE_TYPE_NORM (adjacent, llama) and (i, i + n_dims/2)
for LLAMA_ROPE_TYPE_NEOX (halves, HF ``rotate_half``; qwen2/3, gemma3). Dimensions at or beyond
``n_dims`` (partial rotary) pass through unchanged and unscaled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RopeSpec:
    """RoPE of one layer, as llama.cpp applies it to the cached keys (ggml_rope_ext's arguments;
    apply_rope below computes the rotation, rope_model.py reads them from a GGUF)."""

    n_dims: int  # rotated dimensions (head_dim for every model we support)
    freq_base: float
    freq_scale: float = 1.0  # linear scaling: theta = pos * freq_scale * base^(-2i/n_dims)
    neox: bool = False  # True: pairs (i, i + n_dims/2) ("halves"); False: adjacent pairs (2i, 2i+1)
    freq_factors: tuple[float, ...] | None = None  # (n_dims/2,) divisors of each pair's frequency (rope_freqs)
    ext_factor: float = 0.0  # YaRN's extrapolation mix (1 with rope scaling "yarn", else 0)
    attn_factor: float = 1.0  # magnitude factor of cos and sin (llama.cpp's yarn_attn_factor)
    beta_fast: float = 32.0  # YaRN correction range, in rotations over n_ctx_orig
    beta_slow: float = 1.0
    n_ctx_orig: int = 0  # YaRN's original training context


def yarn_corr_dims(spec: RopeSpec) -> tuple[float, float]:
    """(lo, hi) pair indices where YaRN's ramp runs from extrapolation to interpolation.

    ggml.c ``ggml_rope_yarn_corr_dims``: the dimension whose wavelength fits ``beta`` rotations into
    n_ctx_orig, n_dims ln(n_ctx_orig / (2 pi beta)) / (2 ln base), floored (fast) / ceiled (slow)."""
    def corr(beta: float) -> float:
        return spec.n_dims * math.log(spec.n_ctx_orig / (beta * 2 * math.pi)) / (2 * math.log(spec.freq_base))

    return max(0.0, math.floor(corr(spec.beta_fast))), min(spec.n_dims - 1.0, math.ceil(corr(spec.beta_slow)))


def theta(spec: RopeSpec) -> np.ndarray:
    """(n_dims/2,) angular frequency per pair: the rotation angle is position * theta."""
    if spec.n_dims % 2:
        raise ValueError(f"n_dims must be even, got {spec.n_dims}")
    i = np.arange(spec.n_dims // 2, dtype=np.float64)
    extrap = np.power(float(spec.freq_base), -2.0 * i / spec.n_dims)
    if spec.freq_factors is not None:
        ff = np.asarray(spec.freq_factors, dtype=np.float64)
        if ff.shape != extrap.shape:
            raise ValueError(f"freq_factors has {ff.size} entries, the RoPE has {extrap.size} pairs")
        extrap = extrap / ff
    interp = spec.freq_scale * extrap
    if spec.ext_factor == 0.0:
        return interp
    if spec.n_ctx_orig <= 0:
        raise ValueError("YaRN needs n_ctx_orig (the original training context)")
    lo, hi = yarn_corr_dims(spec)
    mix = (1.0 - np.clip((i - lo) / max(0.001, hi - lo), 0.0, 1.0)) * spec.ext_factor
    return interp * (1.0 - mix) + extrap * mix


def magnitude(spec: RopeSpec) -> float:
    """m, the factor llama.cpp multiplies cos and sin by (1 unless YaRN or an attention factor)."""
    if spec.ext_factor == 0.0:
        return float(spec.attn_factor)
    return float(spec.attn_factor) * (1.0 + 0.1 * math.log(1.0 / spec.freq_scale))


def pair_indices(spec: RopeSpec) -> tuple[np.ndarray, np.ndarray]:
    """Indices (a, b) of the two coordinates of every rotated pair, in the spec's layout."""
    half = spec.n_dims // 2
    i = np.arange(half)
    if spec.neox:
        return i, i + half
    return 2 * i, 2 * i + 1


def apply_rope(x: np.ndarray, positions, spec: RopeSpec) -> np.ndarray:
    """Rotate ``x`` (..., n, d) with row j at ``positions[j]`` ((n,) or a scalar); d >= n_dims."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape[-1] < spec.n_dims:
        raise ValueError(f"last dimension {x.shape[-1]} < n_dims {spec.n_dims}")
    pos = np.asarray(positions, dtype=np.float64)
    ang = pos[..., None] * theta(spec)  # (n, n_dims/2) or (n_dims/2,)
    m = magnitude(spec)
    return _rotate_pairs(x, m * np.cos(ang), m * np.sin(ang), spec)


def _rotate_pairs(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, spec: RopeSpec) -> np.ndarray:
    """A copy of x with every pair (a, b) of the spec's layout turned by (cos, sin); dims past n_dims kept."""
    half = spec.n_dims // 2  # the pairs of ``pair_indices`` as strided views: no gather
    a, b = (slice(0, half), slice(half, spec.n_dims)) if spec.neox else (slice(0, spec.n_dims, 2), slice(1, spec.n_dims, 2))
    xa, xb = x[..., a], x[..., b]
    out = x.copy()
    out[..., a] = xa * cos - xb * sin
    out[..., b] = xa * sin + xb * cos
    return out


def mean_cos_sin(spec: RopeSpec, p0: int, n_future: int) -> tuple[np.ndarray, np.ndarray]:
    """(n_dims/2,) means of m cos(p theta_i) and m sin(p theta_i) over p = p0 .. p0+n_future-1.

    Closed form (geometric series): sum_j e^{i w (p0+j)} = e^{i w (p0 + (N-1)/2)} sin(N w/2) / sin(w/2).
    """
    if n_future < 1:
        raise ValueError(f"n_future must be >= 1, got {n_future}")
    w = theta(spec)
    n = float(n_future)
    centre = w * (p0 + (n - 1.0) / 2.0)
    s_half = np.sin(w / 2.0)
    tiny = np.abs(s_half) < 1e-9
    dirichlet = np.where(tiny, 1.0, np.sin(n * w / 2.0) / (n * np.where(tiny, 1.0, s_half)))
    c_mean, s_mean = np.cos(centre) * dirichlet, np.sin(centre) * dirichlet
    if tiny.any():  # w a multiple of 2*pi (never for real models): sum explicitly
        ang = np.outer(p0 + np.arange(n_future), w[tiny])
        c_mean[tiny], s_mean[tiny] = np.cos(ang).mean(0), np.sin(ang).mean(0)
    m = magnitude(spec)
    return m * c_mean, m * s_mean


def mean_rotation(spec: RopeSpec, p0: int, n_future: int, head_dim: int | None = None) -> np.ndarray:
    """(d, d) R̄ = mean_{j < n_future} R(p0 + j), d = head_dim or n_dims.

    Block-diagonal in the spec's pairs (scaled by the magnitude m), identity on unrotated dims; ``R̄ @ q`` equals
    ``mean_j apply_rope(q, p0 + j)``.
    """
    d = spec.n_dims if head_dim is None else int(head_dim)
    if d < spec.n_dims:
        raise ValueError(f"head_dim {d} < n_dims {spec.n_dims}")
    c, s = mean_cos_sin(spec, p0, n_future)
    a, b = pair_indices(spec)
    r = np.eye(d)
    r[a, a] = c
    r[b, b] = c
    r[a, b] = -s
    r[b, a] = s
    return r


def mean_rotate(x: np.ndarray, spec: RopeSpec, p0: int, n_future: int) -> np.ndarray:
    """R̄ x over the last axis (d >= n_dims), the same as ``x @ mean_rotation(...).T`` in O(d) per row
    instead of a d×d product; keeps x's float dtype."""
    x = np.asarray(x)
    if x.shape[-1] < spec.n_dims:
        raise ValueError(f"last dimension {x.shape[-1]} < n_dims {spec.n_dims}")
    dt = x.dtype if x.dtype in (np.float32, np.float64) else np.float64
    c, s = (v.astype(dt) for v in mean_cos_sin(spec, p0, n_future))
    return _rotate_pairs(x.astype(dt, copy=False), c, s, spec)
