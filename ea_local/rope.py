"""Rotary position embedding (RoPE) as llama.cpp applies it, in numpy (float64).

llama.cpp (`ggml_rope_ext`, no YaRN, no frequency factors) rotates pair i of a head by
the angle ``pos * theta_i`` with ``theta_i = freq_scale * freq_base ** (-2 i / n_dims)``:

    out_a = x_a cos - x_b sin,    out_b = x_a sin + x_b cos

where the pair (a, b) is (2i, 2i+1) for LLAMA_ROPE_TYPE_NORM (adjacent, llama) and
(i, i + n_dims/2) for LLAMA_ROPE_TYPE_NEOX (halves, HF ``rotate_half``; qwen2/3, gemma3).
Dimensions at or beyond ``n_dims`` (partial rotary) pass through unchanged.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # runtime import would cycle through ea_local.policies.__init__
    from ea_local.policies.base import RopeSpec


def theta(spec: RopeSpec) -> np.ndarray:
    """(n_dims/2,) angular frequency per pair: the rotation angle is position * theta."""
    if spec.n_dims % 2:
        raise ValueError(f"n_dims must be even, got {spec.n_dims}")
    i = np.arange(spec.n_dims // 2, dtype=np.float64)
    return spec.freq_scale * np.power(float(spec.freq_base), -2.0 * i / spec.n_dims)


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
    cos, sin = np.cos(ang), np.sin(ang)
    a, b = pair_indices(spec)
    xa, xb = x[..., a], x[..., b]
    out = x.copy()
    out[..., a] = xa * cos - xb * sin
    out[..., b] = xa * sin + xb * cos
    return out


def mean_cos_sin(spec: RopeSpec, p0: int, n_future: int) -> tuple[np.ndarray, np.ndarray]:
    """(n_dims/2,) means of cos(p theta_i) and sin(p theta_i) over p = p0 .. p0+n_future-1.

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
    return c_mean, s_mean


def mean_rotation(spec: RopeSpec, p0: int, n_future: int, head_dim: int | None = None) -> np.ndarray:
    """(d, d) R̄ = mean_{j < n_future} R(p0 + j), d = head_dim or n_dims.

    Block-diagonal in the spec's pairs, identity on unrotated dims; ``R̄ @ q`` equals
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
