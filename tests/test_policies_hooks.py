"""The policies that change what the engine does, not only the scores: `none` (never evicts),
`context-shift` (its own amount, every cache, shifted positions) and `laq` (pseudo-decode steps
that must leave no trace); and `pyramidkv`, which is refused with the reason."""
from __future__ import annotations

import subprocess
import sys

import llama_cpp.llama_cpp as ll
import numpy as np
import pytest

from ea_local.engine.runtime import ContextConfig, Runtime
from ea_local.engine.session import BudgetError, Session, SessionConfig
from ea_local.policies import POLICIES, UNAVAILABLE, get_policy
from ea_local.policies.context_shift import n_discard, target
from ea_local.model.rope import apply_rope

from .test_policies import make_view, unit


def tokens(n: int, seed: int = 0) -> list[int]:
    return [1] + np.random.default_rng(seed).integers(3, 380, size=n - 1).tolist()


# ---------------------------------------------------------------- registry


def test_registry_flags_of_the_engine_policies():
    assert {"none", "context-shift", "laq"} <= set(POLICIES)
    assert not POLICIES["none"].evicts and all(p.evicts for n, p in POLICIES.items() if n != "none")
    assert POLICIES["context-shift"].shift and POLICIES["context-shift"].target is target
    assert POLICIES["laq"].lookahead == 8 and POLICIES["laq"].needs_queries
    assert [n for n, p in POLICIES.items() if p.lookahead or p.shift or p.target] == ["context-shift", "laq"]


def test_pyramidkv_is_refused_with_the_reason():
    assert "pyramidkv" not in POLICIES and "pyramidkv" in UNAVAILABLE
    with pytest.raises(ValueError, match=r"policy 'pyramidkv' is not available: .*one token for every layer"):
        get_policy("pyramidkv")


# ---------------------------------------------------------------- none


def test_none_has_nothing_to_score():
    with pytest.raises(ValueError, match="nothing to score"):
        get_policy("none").score(make_view())


def test_none_sizes_its_context_to_the_budget_and_refuses_past_it(tiny_llama):
    s = Session(tiny_llama, SessionConfig(budget=256, chunk=64, step=32, recent=32, policy="none"))
    assert s.rt.n_ctx == 256
    s.prefill(tokens(250))
    assert s.n_cells == 250 and not s.stats.evictions
    with pytest.raises(BudgetError, match=r"policy 'none' keeps the full cache: 250 \+ 10 tokens do not fit in its context of 256"):
        s.prefill(tokens(10, seed=1))
    assert s.n_cells == 250 and s.next_pos == 250  # refused before decoding: the session is intact
    with pytest.raises(BudgetError, match="policy 'none'"):
        "".join(s.generate([5], max_tokens=20))  # 6 tokens fit, the 7th is refused
    assert s.n_cells == 256
    with pytest.raises(BudgetError, match="never evicts"):
        s.compress(100)
    s.close()


def test_none_through_the_cli_is_one_line_exit_2(tiny_llama):
    r = subprocess.run([sys.executable, "-m", "ea_local.cli", "demo", "--model", tiny_llama, "--policy", "none",
                        "--budget", "256", "--length", "1500"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "policy 'none' keeps the full cache" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- context-shift


def test_context_shift_amounts_are_the_servers():
    assert n_discard(1024, 4) == 510  # (n_past - n_keep) / 2
    assert n_discard(1025, 1) == 512
    assert n_discard(5, 4) == 0 and n_discard(4, 4) == 0  # clamped to [0, n_left - 1]
    assert target(1025, 4, 1024) == 1025 - 510  # one shift while generating
    assert target(1536, 4, 1024) == 1536 - 766  # a prefill chunk: one shift is enough here
    assert target(2000, 4, 300) == 254  # 2000 -> 1002 -> 503 -> 254: repeated until it fits
    assert target(900, 4, 1024) == 900


def test_context_shift_scores_oldest_lowest():
    view = make_view(n=10)
    np.testing.assert_array_equal(get_policy("context-shift").score(view), np.arange(10.0))


def _server_shift(rt: Runtime, n_past: int, n_keep: int, budget: int) -> int:
    """llama.cpp server's context shift with the stock API (seq_rm + seq_add), to the same target."""
    while n_past > budget and n_discard(n_past, n_keep):
        d = n_discard(n_past, n_keep)
        ll.llama_memory_seq_rm(rt.mem, 0, n_keep, n_keep + d)
        ll.llama_memory_seq_add(rt.mem, 0, n_keep + d, n_past, -d)
        n_past -= d
    return n_past


def test_context_shift_matches_llama_cpp_seq_rm_seq_add(tiny_llama):
    """The session's cells and next-token logits equal a stock llama.cpp context running the server's shift."""
    cfg = SessionConfig(budget=200, chunk=32, step=32, recent=32, n_sink=4, policy="context-shift")
    s = Session(tiny_llama, cfg)
    ref = Runtime(tiny_llama, ContextConfig(n_ctx=256, n_batch=32))
    toks = tokens(700, seed=3)
    kept: list[int] = []  # the server's token list: n_keep prefix + the undiscarded rest, contiguous
    n_past = 0
    for i, t in enumerate(toks):
        s._decode([t])
        ref.decode([t], [n_past])
        kept.append(t)
        n_past += 1
        np.testing.assert_allclose(s.rt.logits(), ref.logits(), rtol=1e-4, atol=1e-4)
        if s.n_cells > cfg.budget:
            s.compress(cfg.budget - cfg.step)
            before = n_past
            n_past = _server_shift(ref, n_past, cfg.n_sink, cfg.budget)
            d = before - n_past
            kept = kept[:cfg.n_sink] + kept[cfg.n_sink + d:]
            assert sorted(s.live) == list(range(n_past)) and s.next_pos == n_past  # positions shifted
            assert [s.live[p] for p in range(n_past)] == kept
            pos, _, _ = s.rt.kv_read(s.layers[0], keys=False, values=False)
            assert pos.tolist() == list(range(n_past))
    assert len(s.stats.evictions) >= 5 and all(e.n_evicted == (e.n_before - 4) // 2 for e in s.stats.evictions)
    s.close()
    ref.close()


def test_context_shift_on_iswa_removes_from_every_cache(tmp_path):
    from .gguf_factory import write_tiny_gguf

    m = str(write_tiny_gguf(tmp_path / "g3.gguf", arch="gemma3", sliding_window=64))
    s = Session(m, SessionConfig(budget=200, chunk=32, step=32, recent=32, policy="context-shift"))
    s.prefill(tokens(600, seed=4))
    assert s.stats.evictions and s.n_cells <= 200
    assert sorted(s.live) == list(range(s.n_cells))
    swa, _, _ = s.rt.kv_read(s.info.sliding_layers[0], keys=False, values=False)
    assert set(swa.tolist()) <= set(s.live)  # no sliding cell outlives the shift
    s.close()


# ---------------------------------------------------------------- laq


def lookahead_view(neox=False):
    """Real window queries (positions 32..39) near mu_a with key 12 aligned to them; pseudo queries
    (positions 40..47 >= next_pos) near mu_b with key 25 aligned to them."""
    view = make_view(n=40, m=16, seed=2, neox=neox)
    view.query_positions = np.arange(32, 48)
    rng = np.random.default_rng(9)
    for lo, key in ((0, 12), (8, 25)):
        mu = rng.normal(size=32)
        view.queries[0][lo:lo + 8] = mu + 0.05 * rng.normal(size=(8, 4, 32))
        rotated = apply_rope(np.tile(mu, (8, 1)), view.query_positions[lo:lo + 8], view.rope[0])
        view.keys[0][key] = 4.0 * unit(rotated.mean(axis=0))
    return view


@pytest.mark.parametrize("neox", [False, True])
def test_laq_votes_with_the_pseudo_queries_only(neox):
    view = lookahead_view(neox)
    laq = get_policy("laq").score
    s = laq(view, kernel_size=1)
    assert np.argmax(s) == 25 and s[12] < 0.5 * s[25]
    # = SnapKV over the pseudo queries alone
    only = make_view(n=40, m=8, seed=2, neox=neox)
    only.keys, only.rope = view.keys, view.rope
    only.queries = {0: view.queries[0][8:]}
    only.query_positions = view.query_positions[8:]
    np.testing.assert_allclose(s, get_policy("snapkv").score(only, kernel_size=1), rtol=1e-12)
    # LAQ++ (local_window) adds the real window, which points at key 12
    both = laq(view, kernel_size=1, local_window=8)
    assert set(np.argsort(both)[-2:].tolist()) == {12, 25} and both[12] > 2 * s[12]


def test_laq_without_pseudo_queries_is_an_error():
    with pytest.raises(ValueError, match="lookahead queries"):
        get_policy("laq").score(make_view())


def _state(s: Session) -> dict:
    st = {"live": dict(s.live), "next_pos": s.next_pos, "query_pos": s.queries.pos.tolist(),
          "queries": {il: q.copy() for il, q in s.queries.q.items()}, "n_captured": s._n_captured,
          "tokens_seen": s.stats.tokens_seen, "evictions": len(s.stats.evictions), "logits": s.rt.logits()}
    for il in range(s.rt.n_layer):
        pos, k, v = s.rt.kv_read(il)
        if il in s.info.sliding_layers:  # cells a later token can still attend to
            keep = pos > s.next_pos - s.info.sliding_window
            pos, k, v = pos[keep], k[keep], v[keep]
        st[f"kv{il}"] = (pos.tolist(), k, v)
    return st


def _assert_same(a: dict, b: dict) -> None:
    for key in a:
        if key == "queries":
            assert a[key].keys() == b[key].keys()
            for il in a[key]:
                np.testing.assert_array_equal(a[key][il], b[key][il])
        elif key.startswith("kv"):
            assert a[key][0] == b[key][0], key
            np.testing.assert_array_equal(a[key][1], b[key][1])
            np.testing.assert_array_equal(a[key][2], b[key][2])
        elif key == "logits":
            np.testing.assert_array_equal(a[key], b[key])
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_lookahead_leaves_no_trace(arch, tmp_path, tiny_llama):
    """Cells (positions, K, V of every layer), bookkeeping and logits after the lookahead equal those
    before it, and the next decodes give the logits of a twin session that never looked ahead."""
    from .gguf_factory import write_tiny_gguf

    m = tiny_llama if arch == "llama" else str(write_tiny_gguf(tmp_path / "g3.gguf", arch="gemma3", sliding_window=64))
    cfg = SessionConfig(budget=256, chunk=64, step=32, recent=32, policy="laq")
    a, b = Session(m, cfg), Session(m, cfg)
    toks = tokens(700, seed=5)
    for s in (a, b):
        s.prefill(toks[:600])  # several lookahead compressions already happened here, identically
        for t in toks[600:650]:
            s._decode([t])
    assert a.stats.evictions and a.stats.tokens_seen == 650
    view = a.view()  # compress() reads the view first (it pulls pending queries), then looks ahead
    before = _state(a)
    n_q = len(view.query_positions)
    a._lookahead(view, 8)
    # the view got the 8 pseudo queries at the next positions, the first from the argmax of the real logits
    assert view.query_positions[n_q:].tolist() == list(range(a.next_pos, a.next_pos + 8))
    assert all(len(view.queries[il]) == n_q + 8 for il in a.layers)
    _assert_same(before, _state(a))
    for t in toks[650:700]:
        a._decode([t])
        b._decode([t])
        np.testing.assert_allclose(a.rt.logits(), b.rt.logits(), rtol=1e-5, atol=1e-5)
    a.close()
    b.close()


def test_laq_lookahead_runs_inside_compress(tiny_llama):
    """Each compression decodes 8 pseudo tokens (the view sees them) and evicts to the usual target."""
    s = Session(tiny_llama, SessionConfig(budget=256, chunk=64, step=32, recent=32, policy="laq"))
    seen = []
    orig = s.policy.score

    def spy(view, **kw):
        seen.append(np.asarray(view.query_positions)[-8:].tolist() == list(range(view.next_pos, view.next_pos + 8)))
        return orig(view, **kw)

    object.__setattr__(s, "policy", type(s.policy)(**{**s.policy.__dict__, "score": spy}))
    s.prefill(tokens(800, seed=6))
    assert seen and all(seen)
    assert all(e.n_before - e.n_evicted == 256 - 32 for e in s.stats.evictions)
    pos, _, _ = s.rt.kv_read(0, keys=False, values=False)
    assert pos.tolist() == sorted(s.live) and max(pos) == s.next_pos - 1  # no pseudo cell left
    s.close()
