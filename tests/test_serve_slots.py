"""The server's slots in-process, on tiny random-weight models: prefix reuse after evictions,
engine errors, question steering, question-agnostic requests. (HTTP: test_serve.py,
test_serve_models.py.)"""
from __future__ import annotations

import numpy as np
import pytest

from ea_local.engine.runtime import LlamaError
from ea_local.engine.sampling import SamplingParams
from ea_local.engine.session import Session, SessionConfig, conversation_protection
from ea_local.serve.slots import GenRequest, Slot

from .gguf_factory import write_tiny_gguf

EA = "expected-attention"


def make_slot(path: str, budget: int = 256, policy: str = EA) -> Slot:
    s = Session(path, SessionConfig(budget=budget, chunk=128, n_threads=1, policy=policy))
    return Slot(0, s)


def request(tokens: list[int], max_tokens: int = 4, policy: str = EA, budget: int = 256, **kw) -> GenRequest:
    return GenRequest(tokens=tokens, params=SamplingParams(temperature=0.0), stop=[], max_tokens=max_tokens,
                      policy=policy, budget=budget, **kw)


def rand(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(300, 380, n).tolist()


def live_tokens(s: Session) -> list[bool]:
    """For every history token: is its cell still cached? (After a compaction an evicted token shares
    its position with the next kept one; the last history token at a live position is the kept one.)"""
    last = {p: i for i, p in enumerate(s.transcript.positions)}
    return [p in s.live and last[p] == i for i, p in enumerate(s.transcript.positions)]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_follow_up_sharing_part_of_a_compressed_prompt(models, arch):
    """The 1,500-token prompt is compressed into 256 cells, so the cells just before token 400 are
    gone: llama.cpp would refuse a batch at position 400 (it continues a sequence only at
    seq_pos_max + 1). The slot keeps the prefix up to its last cached token and feeds the rest."""
    rng = np.random.default_rng(0)
    a = [1] + rand(rng, 1500)
    b = a[:400] + rand(rng, 100)
    slot = make_slot(models[arch])
    s = slot.session
    slot.run(request(a), lambda *_: None)
    was_live = live_tokens(s)
    assert not all(was_live[:400])  # the shared prefix was partly evicted
    k = slot.prepare(b)
    if arch == "llama":
        assert 0 < k <= 400 and was_live[k - 1] and not any(was_live[k:400])
        assert max(s.live) == s.next_pos - 1 == s.transcript.positions[k - 1]
    else:  # iSWA: the sliding cache holds the window before 400 only if it was not pruned; else start over
        assert k in (0, 400)
    res = slot.run(request(b), lambda *_: None)
    assert res.cached_tokens == k and res.completion_tokens == 4
    s.check_cells()
    res2 = slot.run(request(b), lambda *_: None)  # and the same prompt again: all but its last token reused
    assert res2.cached_tokens == len(b) - 1
    s.close()


def test_a_prompt_that_fits_is_not_read_from_a_compressed_prefix(models):
    """Reusing 200 tokens of which most were evicted would answer from a few cells; a prompt that
    fits the budget is read again whole instead (from the end of the prefix that lost no cell)."""
    rng = np.random.default_rng(5)
    a = [1] + rand(rng, 1500)
    slot = make_slot(models["llama"])
    slot.run(request(a), lambda *_: None)
    was_live = set(slot.session.live)
    assert not set(range(200)) <= was_live  # the shared prefix was compressed
    res = slot.run(request(a[:200] + rand(rng, 20)), lambda *_: None)
    assert set(range(res.cached_tokens)) <= was_live and slot.session.n_cells == 220 + res.completion_tokens
    again = slot.run(request(a[:200] + rand(rng, 20)), lambda *_: None)  # nothing lost now: reused
    assert again.cached_tokens == 200
    slot.session.close()


def test_cut_back_through_compactions(models):
    """After compactions renumbered the positions, a cut that lands after evicted tokens still ends
    the cache at its last cached token, and the conversation continues with consistent cells."""
    rng = np.random.default_rng(1)
    path = str(write_tiny_gguf(models["llama"].replace("llama.gguf", "short.gguf"), arch="llama", context_length=1024))
    for trial in range(3):
        slot = make_slot(path)
        s = slot.session
        for _ in range(10):
            s.prefill(rand(rng, 150))
        assert s.stats.compactions >= 1
        alive = live_tokens(s)
        # token k0 - 1 was evicted at a position of its own (a compaction merges an evicted token's
        # position into the next kept one's; then cutting at k0 would already end at a cached cell)
        gaps = [i for i in range(1, len(alive) - 70) if not alive[i - 1] and s.transcript.positions[i - 1] < s.transcript.positions[i]]
        k0 = gaps[len(gaps) * (trial + 1) // 4]
        k = s.keep_prefix(k0)
        assert 0 < k < k0 and alive[k - 1] and not any(alive[k:k0])
        assert max(s.live) == s.next_pos - 1
        s.prefill(rand(rng, 300))
        s.check_cells()
        assert all(s.transcript.tokens[i] == s.live[p] for i, p in enumerate(s.transcript.positions) if live_tokens(s)[i])
        s.close()


def test_engine_error_leaves_the_slot_usable(models, monkeypatch):
    rng = np.random.default_rng(2)
    a = [1] + rand(rng, 600)
    slot = make_slot(models["llama"])
    s = slot.session
    slot.run(request(a), lambda *_: None)
    calls = {"n": 0}
    decode = s.rt.decode

    def failing(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise LlamaError("llama_decode failed (-1)")
        return decode(*args, **kw)

    monkeypatch.setattr(s.rt, "decode", failing)
    with pytest.raises(LlamaError):
        slot.run(request(a + rand(rng, 300)), lambda *_: None)
    monkeypatch.setattr(s.rt, "decode", decode)
    assert s.n_cells == 0 and s.transcript.tokens == []  # reset: nothing half-fed is reused
    got = slot.run(request(a, max_tokens=8), lambda *_: None)
    fresh = make_slot(models["llama"])
    want = fresh.run(request(a, max_tokens=8), lambda *_: None)
    assert got.text == want.text and got.cached_tokens == 0
    s.check_cells()
    s.close()
    fresh.session.close()


def test_a_prompt_over_the_budget_is_steered_by_its_question(models):
    rng = np.random.default_rng(3)
    slot = make_slot(models["llama"])
    s = slot.session
    long_prompt = [1] + rand(rng, 900)
    res = slot.run(request(long_prompt, question_len=20), lambda *_: None)
    assert res.question_tokens == 20 and res.evictions > 0
    assert s.question == long_prompt[-20:]
    short = slot.run(request([1] + rand(rng, 100), question_len=20), lambda *_: None)  # fits: read whole
    assert short.question_tokens == 0 and s.question == []
    capped = slot.run(request([1] + rand(rng, 900), question_len=5000), lambda *_: None)
    assert capped.question_tokens == s.max_question
    agnostic = slot.run(request([1] + rand(rng, 900), question_len=20, question_agnostic=True), lambda *_: None)
    assert agnostic.question_tokens == 0 and agnostic.evictions > 0
    s.check_cells()
    s.close()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_question_agnostic_requests_in_every_order(models, arch):
    """Agnostic requests after query-aware ones, over the budget from their first chunk, a policy
    switch with a smaller budget: every request is answered (the server turns an exception into a 5xx)."""
    rng = np.random.default_rng(4)
    slot = make_slot(models[arch])
    a = [1] + rand(rng, 250)
    plan = [
        request(a, max_tokens=1),
        request(a + rand(rng, 700), question_agnostic=True),
        request([1] + rand(rng, 700), question_agnostic=True, question_len=30),
        request([1] + rand(rng, 240), policy="streaming-llm", max_tokens=1),
        request([1] + rand(rng, 600), question_agnostic=True, budget=200),
        request([1] + rand(rng, 600), budget=200, question_len=30),
    ]
    for req in plan:
        res = slot.run(req, lambda *_: None)
        assert res.cells <= req.budget
        slot.session.check_cells()
    slot.session.close()


def test_a_cache_compressed_under_other_settings_is_not_reused(models):
    """The same long prompt sent question-agnostic, then with its question, then under another policy:
    each reads it again (reusing the first cache would answer as the agnostic request did, without a
    probe); the same settings again reuse it, and a cache that lost nothing is reused under any."""
    rng = np.random.default_rng(6)
    slot = make_slot(models["llama"])
    a = [1] + rand(rng, 900)
    first = slot.run(request(a, question_agnostic=True, question_len=30), lambda *_: None)
    assert first.evictions > 0 and first.question_tokens == 0
    asked = slot.run(request(a, question_len=30), lambda *_: None)
    assert asked.cached_tokens == 0 and asked.question_tokens == 30
    again = slot.run(request(a, question_len=30), lambda *_: None)
    assert again.cached_tokens == len(a) - 1
    other = slot.run(request(a, policy="streaming-llm", question_len=30), lambda *_: None)
    assert other.cached_tokens == 0
    short = [1] + rand(rng, 100)
    slot.run(request(short), lambda *_: None)
    assert slot.run(request(short + rand(rng, 10), policy="streaming-llm"), lambda *_: None).cached_tokens == len(short)
    slot.session.check_cells()
    slot.session.close()


def test_a_request_budget_sets_the_protected_opening_and_recent_window(models):
    """Each request's budget sets the protection (a quarter each, at most 64): the prompt's opening is
    still cached after the request was read through a small budget."""
    rng = np.random.default_rng(7)
    slot = make_slot(models["llama"])
    s = slot.session
    for budget in (128, 256, 200):
        res = slot.run(request([1] + rand(rng, 700), budget=budget, question_len=20), lambda *_: None)
        k = conversation_protection(budget)
        assert res.evictions > 0 and (s.cfg.n_sink, s.cfg.recent, s.cfg.budget) == (k, k, budget)
        assert set(range(k)) <= set(s.live)
        s.check_cells()
    s.close()
