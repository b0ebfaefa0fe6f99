"""The budgeted engine: invariants on a real llama.cpp context."""
from __future__ import annotations

import numpy as np
import pytest

from ea_local.engine.session import BudgetError, Session, SessionConfig, conversation_protection
from ea_local.engine.textstream import TextStream
from ea_local.policies import POLICIES

from .conftest import GEMMA, gpl_tokens


def _tokens(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, 380, size=n).tolist()


def _check_consistent(s: Session) -> None:
    """The engine's bookkeeping equals llama.cpp's cells (global cache)."""
    pos, _, _ = s.rt.kv_read(s.layers[0], keys=False, values=False)
    assert pos.tolist() == sorted(s.live)
    assert s.n_cells <= s.cfg.budget + s.cfg.chunk


def test_budget_sinks_and_recent_window_are_respected(tiny_llama):
    cfg = SessionConfig(budget=256, chunk=64, step=32, recent=48, n_sink=4)
    s = Session(tiny_llama, cfg)
    rng = np.random.default_rng(0)
    toks = [1] + rng.integers(3, 380, size=2000).tolist()
    for i in range(0, len(toks), 64):
        s.prefill(toks[i:i + 64])
        _check_consistent(s)
        assert s.n_cells <= cfg.budget
        live = set(s.live)
        assert {0, 1, 2, 3} <= live
        assert set(range(s.next_pos - cfg.recent, s.next_pos)) <= live
    ev = s.stats.evictions
    assert ev and all(e.n_before - e.n_evicted == cfg.budget - cfg.step for e in ev)
    assert s.stats.tokens_seen == len(toks)
    s.close()


def test_generation_far_past_n_ctx(tiny_llama):
    cfg = SessionConfig(budget=200, chunk=32, step=32, recent=32)
    s = Session(tiny_llama, cfg)
    n_ctx = s.rt.n_ctx
    from ea_local.engine.sampling import SamplingParams

    text = "".join(s.generate([1, 5, 6, 7], SamplingParams(ignore_eos=True), max_tokens=10 * n_ctx))
    assert s.stats.tokens_seen == 4 + 10 * n_ctx
    assert len(text) > 0
    _check_consistent(s)
    assert s.n_cells <= cfg.budget
    s.close()


def test_a_small_budget_is_compressed_by_a_quarter_not_by_a_whole_step(tiny_llama):
    """Under 4 steps a compression frees a quarter of the budget: a 256-cell budget keeps 192 cells,
    not 128; from 512 cells on it frees `step` (128) as before."""
    for budget, kept in ((256, 192), (512, 384)):
        s = Session(tiny_llama, SessionConfig(budget=budget, chunk=64, policy="streaming-llm"))
        s.prefill([1] + _tokens(budget + 200))
        ev = s.stats.evictions
        assert ev and all(e.n_before - e.n_evicted == kept for e in ev)
        assert s.cfg.min_budget == 4 + 64 + (budget - kept) + 1
        s.close()
    assert SessionConfig(budget=96).min_budget == 4 + 64 + 24 + 1  # small budgets a 128-cell step refused


def test_a_refused_budget_names_the_smallest_that_works():
    """The error suggests a budget that validates, whatever the budget refused (a smaller budget frees
    a smaller step, so the floor of the refused budget itself is not one)."""
    for budget in (1, 10, 70, 90):
        with pytest.raises(BudgetError, match="use at least 91") as e:
            SessionConfig(budget=budget).validate()
        assert "use at least 91" in str(e.value)
    SessionConfig(budget=91).validate()
    assert SessionConfig(budget=10).smallest_budget == SessionConfig().smallest_budget == 91
    assert SessionConfig(recent=8, step=16).smallest_budget == 4 + 8 + 17 // 4 + 1  # a quarter of 17 cells


def test_a_conversation_protects_a_quarter_of_its_budget_up_to_64(tiny_llama):
    """The opening and the recent window follow a conversation's budget; the rule fits every budget
    from the floor up, and a budget set with it protects the first and the newest positions."""
    assert [conversation_protection(b) for b in (91, 128, 160, 255, 256, 4096)] == [22, 32, 40, 63, 64, 64]
    for b in range(91, 1100, 7):
        k = conversation_protection(b)
        SessionConfig(budget=b, n_sink=k, recent=k).validate()
    with pytest.raises(BudgetError, match="cannot hold the protected opening, recent window and a step: use at least 91"):
        conversation_protection(90)
    with pytest.raises(BudgetError, match="budget must be positive"):
        conversation_protection(0)
    s = Session(tiny_llama, SessionConfig(budget=256, chunk=64, policy="streaming-llm"))
    s.set_budget(160, protect=conversation_protection(160))
    assert (s.cfg.n_sink, s.cfg.recent, s.cfg.budget) == (40, 40, 160)
    s.prefill([1] + _tokens(600))
    assert s.stats.evictions and s.n_cells <= 160
    assert set(range(40)) <= set(s.live)  # StreamingLLM would keep only the newest beyond the sinks
    s.set_budget(128)  # no protect: the protection stays
    assert (s.cfg.n_sink, s.cfg.recent) == (40, 40)
    with pytest.raises(BudgetError):
        s.set_budget(100, protect=60)  # 60 + 60 + a step do not fit: nothing changes
    assert (s.cfg.n_sink, s.cfg.recent, s.cfg.budget) == (40, 40, 128)
    s.check_cells()
    s.close()


def test_decode_compresses_once_per_step(tiny_llama):
    cfg = SessionConfig(budget=160, chunk=32, step=32, recent=32, policy="streaming-llm")
    s = Session(tiny_llama, cfg)
    s.prefill([1] + list(range(3, 150)))
    n0 = len(s.stats.evictions)
    for t in range(300):
        s._decode([3 + t % 300])
        if s.n_cells > cfg.budget:
            s.compress(cfg.budget - cfg.step)
    decode_events = len(s.stats.evictions) - n0
    assert 300 // (cfg.step + 1) <= decode_events <= 300 // cfg.step + 1
    s.close()


def test_compaction_keeps_positions_below_training_context(tiny_llama):
    cfg = SessionConfig(budget=128, chunk=32, step=32, recent=32, policy="streaming-llm")
    s = Session(tiny_llama, cfg)
    object.__setattr__(s.info, "n_ctx_train", 400)  # frozen dataclass: pretend a short training context
    rng = np.random.default_rng(1)
    s.prefill([1] + rng.integers(3, 380, size=1500).tolist())
    assert s.stats.compactions > 0
    assert s.next_pos < 400
    _check_consistent(s)
    assert max(s.live) == s.next_pos - 1
    s.close()


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_runs_end_to_end_on_default_model(name):
    """Each policy compresses a real 2k-token GPL-3 prefix to 25% on gemma3 and the session keeps going."""
    cfg = SessionConfig(budget=512, chunk=256, step=64, policy=name)
    s = Session(GEMMA, cfg)
    if name == "none":  # the full cache refuses what does not fit instead of evicting
        with pytest.raises(BudgetError, match="policy 'none' keeps the full cache"):
            s.prefill(gpl_tokens(2048))
        assert s.n_cells == 512
        s.close()
        return
    s.prefill(gpl_tokens(2048))
    assert s.n_cells <= 512 and s.stats.evictions
    _check_consistent(s)
    out = "".join(s.generate(s.rt.tokenize(" This License"), max_tokens=8))
    assert isinstance(out, str)
    s.close()


def test_budget_too_small_is_a_clear_error(tiny_llama):
    with pytest.raises(BudgetError, match="cannot hold"):
        Session(tiny_llama, SessionConfig(budget=80, recent=64, step=64))
    with pytest.raises(ValueError, match="unknown policy"):
        Session(tiny_llama, SessionConfig(policy="nope"))


def test_textstream_utf8_and_stop_strings():
    ts = TextStream(["STOP"])
    euro = "€".encode()
    assert ts.push(euro[:1]) == ("", False)
    assert ts.push(euro[1:]) == ("€", False)
    assert ts.push(b"abc ST") == ("abc ", False)  # "ST" held back: could start "STOP"
    assert ts.push(b"OP tail") == ("", True)
    ts = TextStream(["STOP"])
    assert ts.push(b"xS") == ("x", False)
    assert ts.push(b"y") == ("Sy", False)
    assert ts.flush() == ""


def test_expected_attention_reads_value_norms_not_rows(tiny_llama):
    """EA needs only ‖v‖: the view carries the norms llama.cpp computed, no value rows, and they equal
    the norms of the rows read back, so the scores are those of a view with the rows."""
    from dataclasses import replace

    s = Session(tiny_llama, SessionConfig(budget=256, chunk=64, step=32, recent=48))
    s.prefill([1] + list(range(3, 200)))
    view = s.view()
    assert view.values == {} and set(view.value_norms) == set(s.layers)
    ea = POLICIES["expected-attention"].score
    rows = {il: s.rt.kv_read(il, keys=False)[2] for il in s.layers}
    for il in s.layers:
        np.testing.assert_allclose(view.value_norms[il], np.linalg.norm(rows[il], axis=-1), rtol=1e-5, atol=1e-6)
    with_rows = replace(view, value_norms={}, values=rows)
    np.testing.assert_allclose(ea(view), ea(with_rows), rtol=1e-4, atol=1e-9)
    s.close()


def test_expected_attention_pools_only_where_every_layer_is_evicted(tiny_llama):
    """Max-pooling over 7 cells is Expected Attention's default on an all-layer model, not on iSWA
    (Gemma 3: 3 global layers); an explicit kernel_size wins either way."""
    s = Session(tiny_llama, SessionConfig(budget=256, chunk=64))
    assert s.cfg.policy_options == {"kernel_size": 7}
    s.set_policy("expected-attention", kernel_size=1)
    assert s.cfg.policy_options == {"kernel_size": 1}
    s.set_policy("snapkv")
    assert s.cfg.policy_options == {}
    s.close()
    g = Session(str(GEMMA), SessionConfig(budget=256, chunk=64))
    assert g.iswa and g.cfg.policy_options == {}
    g.close()


def test_set_policy_and_set_budget(tiny_llama):
    """Switching policy resets its options and follows its query needs; a smaller budget evicts now,
    one past the context or below the floor is refused and changes nothing."""
    s = Session(tiny_llama, SessionConfig(budget=256, chunk=64, step=32, recent=48, policy="snapkv",
                                          policy_options={"window_size": 16}))
    s.prefill([1] + list(range(3, 250)))
    s.set_policy("streaming-llm")
    assert s.cfg.policy == "streaming-llm" and s.cfg.policy_options == {} and not s.policy.needs_queries
    with pytest.raises(ValueError, match="no option"):
        s.set_policy("expected-attention", window_size=3)
    assert s.cfg.policy == "streaming-llm"
    s.set_policy("expected-attention", n_future_positions=64)
    assert s.cfg.policy_options == {"kernel_size": 7, "n_future_positions": 64}  # pooled: every layer evicted
    with pytest.raises(BudgetError, match="more than this context"):
        s.set_budget(s.rt.n_ctx + 1)
    with pytest.raises(BudgetError, match="use at least"):
        s.set_budget(10)
    assert s.cfg.budget == 256
    evicted = s.set_budget(200)
    assert evicted == 248 - (200 - 32) and s.n_cells == 200 - 32 and s.cfg.budget == 200
    _check_consistent(s)
    # one-shot: below the streaming floor (4 + 48 + 32 + 1), nothing evicted until the caller compresses
    with pytest.raises(BudgetError, match="not in 1"):
        s.set_one_shot_budget(s.rt.n_ctx + 1)
    s.set_one_shot_budget(40, recent=8)
    assert (s.cfg.budget, s.cfg.recent, s.n_cells) == (40, 8, 200 - 32)
    assert s.compress(40, phase="prefill") == 200 - 32 - 40 and s.n_cells == 40
    _check_consistent(s)
    s.stop_compressing()
    assert s.cfg.budget == s.rt.n_ctx
    with pytest.raises(BudgetError, match="question_weight"):
        s.set_question_weight(1.5)
    s.set_question_weight(0.0)
    assert s.cfg.question_weight == 0.0
    s.close()
