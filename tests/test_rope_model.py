"""The RoPE rope.py computes equals the one llama.cpp applied (its post-RoPE Qcur), for the RoPE
variants GGUF files carry: per-pair frequency factors (Llama-3.x rope_freqs), YaRN, linear scaling."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFValueType

from ea_local.engine.runtime import ContextConfig, Runtime
from ea_local.engine.session import Session, SessionConfig
from ea_local.model.info import read_model_info
from ea_local.policies.base import RopeSpec
from ea_local.model.rope import apply_rope, magnitude, mean_rotation, theta
from ea_local.model.rope_model import RopeUnsupported, rope_specs

from .gguf_factory import write_tiny_gguf
from .ggml_probe import Probe

HEAD_DIM = 32


def llama3_factors(n_pairs: int, base: float = 10000.0, factor: float = 8.0, low: float = 1.0, high: float = 4.0,
                   orig: int = 512) -> np.ndarray:
    """Llama-3.1's rope_freqs (the converter's "llama3" rope_type): long wavelengths divided by
    `factor`, short ones kept, a smooth blend between (convert_hf_to_gguf.py LlamaModel)."""
    freqs = base ** (-np.arange(0, 2 * n_pairs, 2) / (2 * n_pairs))
    wavelen = 2 * np.pi / freqs
    smooth = (orig / wavelen - low) / (high - low)
    out = np.where(wavelen < orig / high, 1.0, np.where(wavelen > orig / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    return out.astype(np.float32)


VARIANTS = {
    "rope_freqs": dict(arch="llama", extra_tensors={"rope_freqs.weight": llama3_factors(HEAD_DIM // 2)}),
    "yarn-norm": dict(arch="llama", rope_scaling=("yarn", 4.0),
                      extra_kv={"{arch}.rope.scaling.original_context_length": 256}),
    "yarn-neox": dict(arch="qwen2", rope_scaling=("yarn", 4.0),
                      extra_kv={"{arch}.rope.scaling.original_context_length": 256,
                                "{arch}.rope.scaling.attn_factor": (1.25, GGUFValueType.FLOAT32)}),
    "linear": dict(arch="llama", rope_scaling=("linear", 2.0)),
    "plain": dict(arch="qwen2"),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory) -> tuple[str, str]:
    p = tmp_path_factory.mktemp("rope") / f"{request.param}.gguf"
    write_tiny_gguf(p, weights="f32", **VARIANTS[request.param])
    return request.param, str(p)


def test_captured_queries_reroped_equal_llamas_qcur(variant):
    """Pre-RoPE queries captured by the hooks, rotated with rope_specs + rope.apply_rope at their
    positions, equal llama.cpp's post-RoPE Qcur; the unscaled RoPE (base only) does not, except on
    the plain file: each variant changes the rotation enough for this test to see it."""
    name, path = variant
    info = read_model_info(path)
    layers = list(range(info.n_layers))
    probe = Probe({f"Qcur-{il}" for il in layers})
    rt = Runtime(path, ContextConfig(n_ctx=512), cb_eval=probe.cb)
    rt.capture_layers(layers)
    rt.capture(True)
    n, start = 96, 3000  # far positions: every pair, fast and slow, has turned
    toks = np.random.default_rng(0).integers(3, 380, n).tolist()
    rt.decode(toks, list(range(start, start + n)))
    specs = rope_specs(info, layers, rt.n_ctx)
    h, d = info.n_head, info.head_dim_k
    for il in layers:
        qpos, q = rt.captured(il, h * d)
        assert qpos.tolist() == list(range(start, start + n))
        q = q.reshape(n, h, d).transpose(1, 0, 2)
        qcur = probe.got[f"Qcur-{il}"][0].reshape(n, h, d).transpose(1, 0, 2)
        err = np.abs(apply_rope(q, qpos, specs[il]) - qcur).max() / np.abs(qcur).max()
        assert err < 2e-4, f"{name} layer {il}: relative error {err:.2e}"
        base_only = RopeSpec(d, info.rope_freq_base, 1.0, info.neox)
        old_err = np.abs(apply_rope(q, qpos, base_only) - qcur).max() / np.abs(qcur).max()
        if name.startswith("yarn"):  # YaRN is not linear scaling by the same factor
            linear = RopeSpec(d, info.rope_freq_base, info.rope_freq_scale, info.neox)
            assert np.abs(apply_rope(q, qpos, linear) - qcur).max() / np.abs(qcur).max() > 1e-2
        if name == "plain":
            assert old_err < 2e-4
        else:
            assert old_err > 1e-2, f"{name}: the variant does not change the rotation, the test would not see it"
    rt.close()


def test_session_uses_the_models_rope(variant):
    name, path = variant
    s = Session(path, SessionConfig(budget=256, chunk=64, step=32, recent=32))
    spec = s.rope[s.layers[0]]
    assert (spec.freq_factors is not None) == (name == "rope_freqs")
    assert spec.ext_factor == (1.0 if name.startswith("yarn") else 0.0)
    if name == "yarn-neox":
        # llama.cpp: attn_factor 1.25 x get_mscale(4) / (1 + 0.1 ln 4) = 1.25, then x (1 + 0.1 ln 4) in ggml
        assert magnitude(spec) == pytest.approx(1.25 * (1 + 0.1 * np.log(4.0)))
    s.close()


def test_yarn_frequencies_blend_between_interpolation_and_extrapolation():
    spec = RopeSpec(64, 10000.0, 0.25, ext_factor=1.0, n_ctx_orig=4096)
    w = theta(spec)
    extrap = 10000.0 ** (-np.arange(32) * 2 / 64)
    assert w[0] == pytest.approx(extrap[0])  # fast pairs: extrapolated (unchanged)
    assert w[-1] == pytest.approx(0.25 * extrap[-1])  # slow pairs: interpolated (linear scaling)
    assert np.all(w <= extrap + 1e-15) and np.all(w >= 0.25 * extrap - 1e-15)
    ff = tuple(np.linspace(1.0, 8.0, 32))
    np.testing.assert_allclose(theta(RopeSpec(64, 10000.0, freq_factors=ff)), extrap / np.array(ff), rtol=1e-14)


def test_mean_rotation_carries_the_magnitude():
    spec = RopeSpec(16, 10000.0, 0.5, ext_factor=1.0, n_ctx_orig=64, attn_factor=0.9)
    q = np.random.default_rng(1).normal(size=16)
    rotated = apply_rope(np.tile(q, (40, 1)), 100 + np.arange(40), spec)
    np.testing.assert_allclose(mean_rotation(spec, 100, 40) @ q, rotated.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(apply_rope(q, 7, spec)), magnitude(spec) * np.linalg.norm(q), rtol=1e-12)


@pytest.mark.parametrize("bad, match", [
    ({"rope_freqs.weight": llama3_factors(HEAD_DIM // 2).astype(np.float16)}, "F32"),
    ({"rope_freqs.weight": np.ones(HEAD_DIM // 4, dtype=np.float32)}, "entries"),
    ({"rope_freqs.weight": np.zeros(HEAD_DIM // 2, dtype=np.float32)}, "zero"),
])
def test_a_rope_that_cannot_be_reproduced_is_refused_in_one_line(tmp_path, bad, match):
    p = write_tiny_gguf(tmp_path / "bad.gguf", extra_tensors=bad)
    with pytest.raises(RopeUnsupported, match=match) as e:
        rope_specs(read_model_info(p), [0, 1], 512)
    assert "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)  # the CLI and server report ValueErrors as one line / 4xx
