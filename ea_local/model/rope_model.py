"""A model's RoPE as llama.cpp will compute it: every ggml_rope_ext argument, read from the GGUF.

Expected Attention rotates the query statistics with the RoPE averaged over future positions, and
SnapKV/TOVA rotate captured queries to their positions; both must rotate exactly as the model does,
or the expected logits are taken against keys rotated another way. What llama.cpp passes to
``ggml_rope_ext`` for layer il (src/llama-context.cpp cparams, src/llama-model.cpp
``get_rope_factors``, the per-architecture graphs in src/models/*.cpp):

- freq_base/freq_scale: the layer's (sliding layers may have their own; ModelInfo.rope_params);
- freq factors: ``rope_freqs.weight`` (Llama-3.x "llama3" scaling), else with LongRoPE
  ``rope_factors_long.weight`` when the context exceeds the original one, ``..._short`` otherwise;
- ext_factor: 1 with scaling "yarn", else 0; beta_fast 32, beta_slow 1 (mistral3 reads its own);
- attn_factor: with YaRN get_mscale(1/freq_scale) / (1 + 0.1 ln(1/freq_scale)), times the file's
  ``rope.scaling.attn_factor`` (ggml then multiplies by 1 + 0.1 ln(1/freq_scale) again);
- n_ctx_orig: ``rope.scaling.original_context_length``, else the training context.

What this cannot reproduce is refused with one line (RopeUnsupported), never approximated.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
from gguf import GGMLQuantizationType

from ea_local.model.gguf_header import ModelFileError, read_header
from ea_local.model.info import ModelInfo
from ea_local.model.rope import RopeSpec

_READS_YARN_BETAS = frozenset({"mistral3"})  # load_arch_hparams() reads yarn_beta_fast/slow, log_mul


class RopeUnsupported(ModelFileError, ValueError):
    """The file's RoPE is one ea_local cannot reproduce; str(error) is one line for the user."""


def _factors(path: str, hdr, name: str, n_pairs: int) -> tuple[float, ...]:
    t = next(t for t in hdr.tensors if t.name == name)
    if t.ggml_type != GGMLQuantizationType.F32:  # ggml_rope asserts an F32 factor tensor
        raise RopeUnsupported(f"{path}: {name} is {GGMLQuantizationType(t.ggml_type).name}, llama.cpp needs F32")
    if t.n_elements < n_pairs:
        raise RopeUnsupported(f"{path}: {name} has {t.n_elements} entries for {n_pairs} rotated pairs")
    with open(path, "rb") as f:
        f.seek(hdr.data_offset + t.offset)
        raw = f.read(4 * n_pairs)
    ff = np.frombuffer(raw, dtype="<f4").astype(np.float64)
    if len(ff) != n_pairs or not np.all(np.isfinite(ff)) or np.any(ff == 0):
        raise RopeUnsupported(f"{path}: {name} is truncated or holds zero or non-finite factors")
    return tuple(float(x) for x in ff)


def _num(kv: dict, key: str, default: float) -> float:
    v = kv.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise RopeUnsupported(f"bad metadata: {key} should be a finite number, got {v!r}")
    return float(v)


def rope_specs(info: ModelInfo, layers: Iterable[int], n_ctx: int) -> dict[int, RopeSpec]:
    """{layer: RopeSpec} for `layers`, as llama.cpp rotates their queries and keys in a context of
    `n_ctx` cells (one sequence; it picks LongRoPE's factors). Raises RopeUnsupported."""
    hdr = read_header(info.path)
    kv, a = hdr.kv, info.architecture
    if a == "granite" and kv.get(f"{a}.rope.scaling.finetuned") is False:
        # granite uses this key as a switch: no RoPE on any layer
        raise RopeUnsupported(f"{info.path}: this granite model has no RoPE ({a}.rope.scaling.finetuned is false); "
                              "ea_local's attention-based policies need it")
    names = {t.name for t in hdr.tensors}
    n_ctx_orig = info.rope_scaling_orig_ctx or info.n_ctx_train
    factor_name = None
    if "rope_freqs.weight" in names:
        factor_name = "rope_freqs.weight"
    elif info.rope_scaling_type == "longrope" and {"rope_factors_long.weight", "rope_factors_short.weight"} & names:
        factor_name = "rope_factors_long.weight" if n_ctx > n_ctx_orig else "rope_factors_short.weight"
        if factor_name not in names:
            raise RopeUnsupported(f"{info.path}: LongRoPE needs {factor_name} for a {n_ctx}-cell context")

    yarn = info.rope_scaling_type == "yarn"
    beta_fast, beta_slow, log_mul = 32.0, 1.0, 0.0
    if a in _READS_YARN_BETAS:
        beta_fast = _num(kv, f"{a}.rope.scaling.yarn_beta_fast", 32.0)
        beta_slow = _num(kv, f"{a}.rope.scaling.yarn_beta_slow", 1.0)
        log_mul = _num(kv, f"{a}.rope.scaling.yarn_log_multiplier", 0.0)
    attn_factor = _num(kv, f"{a}.rope.scaling.attn_factor", 1.0)
    if yarn:  # llama_context's cparams, from the model-wide freq_scale (sliding layers included)
        factor = 1.0 / info.rope_freq_scale

        def get_mscale(m: float) -> float:
            return 1.0 if factor <= 1.0 else 0.1 * m * math.log(factor) + 1.0

        mscale = get_mscale(1.0) / get_mscale(log_mul) if log_mul else get_mscale(1.0)
        attn_factor *= mscale / (1.0 + 0.1 * math.log(factor))  # cancels ggml's own 1 + 0.1 ln(1/freq_scale)

    out: dict[int, RopeSpec] = {}
    for il in layers:
        base, scale, neox, n_dims = info.rope_params(il)
        ff = None
        if factor_name is not None:
            if n_dims != info.rope_n_dims:
                raise RopeUnsupported(f"{info.path}: layer {il} rotates {n_dims} dims but {factor_name} "
                                      f"is sized for {info.rope_n_dims}")
            ff = _factors(info.path, hdr, factor_name, n_dims // 2)
        out[il] = RopeSpec(n_dims=n_dims, freq_base=base, freq_scale=scale, neox=neox, freq_factors=ff,
                           ext_factor=1.0 if yarn else 0.0, attn_factor=attn_factor,
                           beta_fast=beta_fast, beta_slow=beta_slow, n_ctx_orig=n_ctx_orig)
    return out
