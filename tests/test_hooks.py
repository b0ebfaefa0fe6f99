"""The patched C API, checked against llama.cpp itself (issue: KV-cell hooks).

Equivalence anchor (DESIGN.md): removing cells for real must give the logits of the masked
reference — the same prefill on a second context, the positions removed from a seq_cp copy
with stock llama_memory_seq_rm, so that the cells stay in the cache but are masked.
"""
from __future__ import annotations

import numpy as np
import pytest

from ea_local import kvhooks
from ea_local.engine.runtime import ContextConfig, Runtime
from ea_local.policies.base import RopeSpec
from ea_local.rope import apply_rope

from .conftest import GEMMA, gpl_tokens
from .ggml_probe import Probe


def test_patched_symbols():
    assert kvhooks.api_version() == kvhooks.API_VERSION
    for name in ["llama_ea_kv_read", "llama_ea_kv_vnorm", "llama_ea_seq_rm_positions", "llama_ea_seq_remap",
                 "llama_ea_capture_layers", "llama_ea_capture_get"]:
        assert hasattr(kvhooks._lib, name)


def _prefill(model: str, toks: list[int], cache: str = "f16", fa: bool | None = None, n_ctx: int = 2048,
             cb=None, swa_full: bool = True) -> Runtime:
    rt = Runtime(model, ContextConfig(n_ctx=n_ctx, cache_type=cache, flash_attn=fa, swa_full=swa_full), cb_eval=cb)
    rt.decode(toks, list(range(len(toks))))
    return rt


def _evict_set(n: int, seed: int = 0, n_sink: int = 4, recent: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cand = np.arange(n_sink, n - recent)
    return np.sort(rng.choice(cand, size=len(cand) // 2, replace=False))


def _next_logits_real(model, toks, cont, evict, cache, fa, global_only=False) -> np.ndarray:
    rt = _prefill(model, toks, cache, fa)
    removed = rt.rm_positions(evict, global_only=global_only)
    assert removed >= len(evict)
    p = len(toks)
    rt.decode(cont, list(range(p, p + len(cont))))  # the new tokens refill freed cells
    out = rt.logits()
    rt.close()
    return out


def _next_logits_masked(model, toks, cont, evict, cache, fa) -> np.ndarray:
    rt = _prefill(model, toks, cache, fa)
    rt.seq_cp(0, 1)
    for p in evict:  # stock API, one position at a time: cells stay, seq 1 no longer sees them
        rt.seq_rm(1, int(p), int(p) + 1)
    p = len(toks)
    rt.decode(cont, list(range(p, p + len(cont))), seq=1)
    out = rt.logits()
    rt.close()
    return out


CASES = [("f16", False, 0.0), ("q8_0", True, 0.0), ("q4_0", True, 0.0)]


@pytest.mark.parametrize("cache,fa,tol", CASES)
def test_removal_equals_masked_reference_gemma(cache, fa, tol):
    toks = gpl_tokens(1500)
    cont = gpl_tokens(1540)[1500:]
    evict = _evict_set(len(toks))
    real = _next_logits_real(GEMMA, toks, cont, evict, cache, fa)
    ref = _next_logits_masked(GEMMA, toks, cont, evict, cache, fa)
    assert np.abs(real - ref).max() <= tol
    assert real.argmax() == ref.argmax()


@pytest.mark.parametrize("cache,fa,tol", CASES)
def test_removal_equals_masked_reference_llama(tiny_llama, cache, fa, tol):
    rng = np.random.default_rng(1)
    toks = [1] + rng.integers(3, 380, size=1499).tolist()
    cont = rng.integers(3, 380, size=40).tolist()
    evict = _evict_set(len(toks), seed=2)
    real = _next_logits_real(tiny_llama, toks, cont, evict, cache, fa)
    ref = _next_logits_masked(tiny_llama, toks, cont, evict, cache, fa)
    assert np.abs(real - ref).max() <= tol


def test_global_only_removal_outside_window_equals_full_removal():
    """Cells older than the 512-token window are invisible to gemma3's sliding layers, so removing
    them from the global cache only must give exactly the logits of removing them everywhere."""
    toks = gpl_tokens(1200)
    cont = gpl_tokens(1210)[1200:]
    evict = _evict_set(len(toks) - 600)  # all positions < 600: outside the window for the next tokens
    a = _next_logits_real(GEMMA, toks, cont, evict, "f16", False, global_only=True)
    b = _next_logits_real(GEMMA, toks, cont, evict, "f16", False, global_only=False)
    assert np.array_equal(a, b)
    # and inside the window it is a different operation
    evict_recent = np.arange(1000, 1100)
    c = _next_logits_real(GEMMA, toks, cont, evict_recent, "f16", False, global_only=True)
    d = _next_logits_real(GEMMA, toks, cont, evict_recent, "f16", False, global_only=False)
    assert not np.array_equal(c, d)


def test_global_only_leaves_sliding_cache():
    toks = gpl_tokens(300)
    rt = _prefill(GEMMA, toks)
    rt.rm_positions(np.arange(10, 100), global_only=True)
    assert rt.kv_count(5) == 300 - 90  # layer 5 is global
    assert rt.kv_count(0) == 300  # layer 0 slides
    rt.close()


@pytest.mark.parametrize("cache,fa,tol", [("f16", False, 2e-3), ("q8_0", True, 0.05), ("q4_0", True, 0.25)])
def test_read_keys_equal_computed_keys_and_queries(cache, fa, tol):
    """K rows read back equal the post-RoPE Kcur the graph computed (up to the cache's rounding);
    captured pre-RoPE queries, rotated at their positions, equal the post-RoPE Qcur."""
    layers = [0, 5]
    probe = Probe({f"Kcur-{il}" for il in layers} | {f"Qcur-{il}" for il in layers})
    toks = gpl_tokens(200)
    rt = Runtime(GEMMA, ContextConfig(n_ctx=512, cache_type=cache, flash_attn=fa), cb_eval=probe.cb)
    rt.capture_layers(layers)
    rt.capture(True)
    rt.decode(toks, list(range(len(toks))))
    for il in layers:
        pos, k, v = rt.kv_read(il)
        assert np.array_equal(pos, np.arange(len(toks)))
        kcur = probe.got[f"Kcur-{il}"][0].reshape(len(toks), 1, 256)
        scale = np.abs(kcur).max()
        assert np.abs(k - kcur).max() <= tol * scale
        qpos, q = rt.captured(il, 4 * 256)
        assert np.array_equal(qpos, np.arange(len(toks)))
        spec = RopeSpec(n_dims=256, freq_base=10000.0 if il != 5 else 1e6, neox=True)
        q_rot = apply_rope(q.reshape(len(toks), 4, 256).transpose(1, 0, 2), qpos, spec).transpose(1, 0, 2)
        qcur = probe.got[f"Qcur-{il}"][0].reshape(len(toks), 4, 256)
        assert np.abs(q_rot - qcur).max() <= 1e-3 * np.abs(qcur).max()
        _, vn = rt.kv_vnorm(il)
        assert np.allclose(vn, np.linalg.norm(v, axis=-1), rtol=1e-4, atol=1e-6)
    rt.close()


def test_capture_off_and_clear():
    rt = Runtime(GEMMA, ContextConfig(n_ctx=512))
    rt.capture_layers([5])
    toks = gpl_tokens(50)
    rt.decode(toks[:20], list(range(20)))  # capture not enabled: nothing recorded
    assert rt.captured(5, 1024)[0].size == 0
    rt.capture(True)
    rt.decode(toks[20:30], list(range(20, 30)))
    rt.capture(False)
    rt.decode(toks[30:50], list(range(30, 50)))
    pos, _ = rt.captured(5, 1024)
    assert pos.tolist() == list(range(20, 30))
    rt.capture_clear()
    assert rt.captured(5, 1024)[0].size == 0
    rt.close()


def test_long_run_with_periodic_removal(tiny_llama):
    """10 x n_ctx tokens through a 256-cell context: batched removal keeps it from ever overflowing."""
    n_ctx = 256
    rt = Runtime(tiny_llama, ContextConfig(n_ctx=n_ctx, n_batch=64))
    rng = np.random.default_rng(0)
    pos = 0
    live: list[int] = []
    for step in range(10 * n_ctx // 32):
        chunk = rng.integers(3, 380, size=32).tolist()
        if len(live) + 32 > n_ctx:
            old = np.array(live[4:-32])
            drop = np.sort(rng.choice(old, size=len(old) // 2, replace=False))
            assert rt.rm_positions(drop) == len(drop)
            live = sorted(set(live) - set(drop.tolist()))
        rt.decode(chunk, list(range(pos, pos + 32)))
        live += list(range(pos, pos + 32))
        pos += 32
        assert rt.kv_count(0) == len(live)
        assert rt.seq_pos_range() == (live[0], live[-1])
    kpos, _, _ = rt.kv_read(1)
    assert kpos.tolist() == live
    assert pos == 10 * n_ctx
    rt.close()


@pytest.mark.parametrize("model", ["gemma", "llama"])
def test_compaction_equals_fresh_prefill(model, tiny_llama):
    path = GEMMA if model == "gemma" else tiny_llama
    toks = gpl_tokens(800) if model == "gemma" else [1] + np.random.default_rng(3).integers(3, 380, 799).tolist()
    evict = _evict_set(len(toks), seed=4)
    keep = np.setdiff1d(np.arange(len(toks)), evict)
    nxt = toks[-1]
    rt = _prefill(path, toks[:-1])
    rt.rm_positions(evict)
    moved = rt.remap(keep[:-1], np.arange(len(keep) - 1))
    assert moved > 0
    rt.decode([nxt], [len(keep) - 1])
    compacted = rt.logits()
    assert rt.seq_pos_range() == (0, len(keep) - 1)
    rt.close()
    fresh_rt = _prefill(path, [toks[i] for i in keep])
    fresh = fresh_rt.logits()
    fresh_rt.close()
    # K-shift re-rotates f16 keys (one extra rounding): a small, stated tolerance
    assert np.abs(compacted - fresh).max() <= 0.05 * max(1.0, np.abs(fresh).max() / 10)
    assert compacted.argmax() == fresh.argmax()


def test_remap_rejects_bad_mappings():
    toks = gpl_tokens(40)
    rt = _prefill(GEMMA, toks, n_ctx=256)
    with pytest.raises(Exception):
        rt.remap(np.arange(10), np.arange(10))  # cells 10..39 unlisted
    with pytest.raises(Exception):
        rt.remap(np.arange(40), np.arange(40)[::-1].copy())  # order not kept
    assert rt.seq_pos_range() == (0, 39)  # nothing changed
    rt.close()
