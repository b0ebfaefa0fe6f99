"""Recall in the server's slots, on tiny random-weight models (llama: every layer archived; gemma3: iSWA,
the global layers only): a conversation continued over requests keeps its archive, recalls within the
budget, survives compactions and cut-backs, and /metrics reports it."""
from __future__ import annotations

import numpy as np
import pytest

from ea_local.engine.sampling import SamplingParams
from ea_local.engine.session import Session, SessionConfig
from ea_local.serve.metrics import Metrics
from ea_local.serve.slots import GenRequest, Slot, SlotPool


EA = "expected-attention"


def request(tokens: list[int], policy: str = EA) -> GenRequest:
    return GenRequest(tokens=tokens, params=SamplingParams(temperature=0.0), stop=[], max_tokens=4,
                      policy=policy, budget=256)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("policy", [EA, "streaming-llm"])
def test_conversation_recalls_from_its_archive(models, arch, policy):
    s = Session(models[arch], SessionConfig(budget=256, chunk=128, n_threads=1, policy=policy, recall=True,
                                                recall_max=48))
    slot = Slot(0, s)
    rng = np.random.default_rng(0)
    conv = [1] + rng.integers(300, 380, 100).tolist()
    recalled = 0
    for turn in range(8):
        res = slot.run(request(conv, policy), lambda *_: None)
        assert res.cells <= 256 and s.n_cells <= 256
        assert res.cached_tokens > 0 or turn == 0
        s.check_cells()
        recalled += res.recalled_cells
        conv = conv + s.transcript.tokens[len(conv):] + rng.integers(300, 380, 90).tolist()
    assert s.stats.archived > 0 and len(s.archive) > 0
    assert recalled == s.stats.recalled and recalled > 0
    assert len(s.archive) + s.n_cells <= s.next_pos
    pool = SlotPool([slot], queue=1)
    text = Metrics(pool).render().decode()
    assert f'ea_local_slot_archive_tokens{{slot="0"}} {float(len(s.archive))}' in text
    assert "ea_local_slot_archive_bytes" in text
    m = Metrics(pool)
    m.record(res)
    assert "ea_local_recalled_cells_total" in m.render().decode()
    s.close()


def test_compaction_and_cut_back_keep_archive_in_step(models):
    s = Session(models["llama"], SessionConfig(budget=256, chunk=128, n_threads=1, recall=True,
                                                   archive_tokens=200))
    slot = Slot(0, s)
    rng = np.random.default_rng(1)
    conv = [1] + rng.integers(300, 380, 600).tolist()
    slot.run(request(conv), lambda *_: None)
    s.compact()
    assert not set(s.archive.pos.tolist()) & set(s.live) and max(s.archive.pos) < s.next_pos
    conv2 = conv + s.transcript.tokens[len(conv):] + rng.integers(300, 380, 50).tolist()
    res = slot.run(request(conv2), lambda *_: None)
    s.check_cells()
    # the client edits an early message: the slot cuts back, archived cells past the cut are forgotten
    edited = conv2[:400] + rng.integers(300, 380, 30).tolist()
    res = slot.run(request(edited), lambda *_: None)
    assert res.cells <= 256
    assert len(s.archive) == 0 or max(s.archive.pos) < s.next_pos
    s.check_cells()
    s.close()


@pytest.mark.parametrize("policy", [EA, "streaming-llm"])
def test_a_prompt_compressed_before_its_question_recalls_with_the_question(models, monkeypatch, policy):
    """A request over the budget is compressed before its end is read; once it is, recall scores the
    archive with the question's queries (from where it starts), whatever the policy; a question-agnostic
    request recalls nothing."""
    s = Session(models["llama"], SessionConfig(budget=256, chunk=128, n_threads=1, policy=policy, recall=True))
    slot = Slot(0, s)
    calls: list[tuple[int, int]] = []
    real = s.recall
    monkeypatch.setattr(s, "recall", lambda since, until=None, recent=None:
                        calls.append((since, until, recent, s.next_pos)) or real(since, until, recent))
    rng = np.random.default_rng(2)
    prompt = [1] + rng.integers(300, 380, 900).tolist()
    res = slot.run(GenRequest(tokens=prompt, params=SamplingParams(temperature=0.0), stop=[], max_tokens=4,
                              policy=policy, budget=256, question_len=20), lambda *_: None)
    # the question's document: no recent window; every layer evicted: the question's words only (for
    # streaming-llm, which probes nothing, the same queries either way)
    assert calls == [(len(prompt) - 20, len(prompt), 0, len(prompt))]
    assert res.evictions > 0 and len(s.archive) > 0 and res.cells <= 256
    assert res.question_tokens == (20 if policy == EA else 0)  # probed only by a policy that reads queries
    assert res.recalled_cells == s.stats.recalled
    s.check_cells()
    calls.clear()
    slot.run(GenRequest(tokens=[1] + rng.integers(300, 380, 900).tolist(), params=SamplingParams(temperature=0.0),
                        stop=[], max_tokens=4, policy=policy, budget=256, question_len=20, question_agnostic=True),
             lambda *_: None)
    assert calls == []
    # a chat request: the template's last tokens (end of turn, assistant header) do not score the archive
    prompt = [1] + rng.integers(300, 380, 900).tolist()
    slot.run(GenRequest(tokens=prompt, params=SamplingParams(temperature=0.0), stop=[], max_tokens=4,
                        policy=policy, budget=256, question_len=20, template_tail=5), lambda *_: None)
    assert calls == [(len(prompt) - 20, len(prompt) - 5, 0, len(prompt))]
    # a chat template that writes nothing after the user's text: still the user's words only, as in chat
    calls.clear()
    prompt = [1] + rng.integers(300, 380, 900).tolist()
    slot.run(GenRequest(tokens=prompt, params=SamplingParams(temperature=0.0), stop=[], max_tokens=4,
                        policy=policy, budget=256, question_len=20, template_tail=0), lambda *_: None)
    assert calls == [(len(prompt) - 20, len(prompt), 0, len(prompt))]
    s.close()


def test_a_repeated_request_recalls_nothing_new(models, monkeypatch):
    """Sent again as it was (a regenerate), a request says nothing new: the one token re-fed for its logits
    does not recall, so the cache is the one the first answer came from; a request that adds to the
    conversation recalls as before."""
    s = Session(models["llama"], SessionConfig(budget=256, chunk=128, n_threads=1, recall=True))
    slot = Slot(0, s)
    calls: list[int] = []
    real = s.recall
    monkeypatch.setattr(s, "recall", lambda since, until=None, recent=None: calls.append(since)
                        or real(since, until, recent))
    rng = np.random.default_rng(3)
    prompt = [1] + rng.integers(300, 380, 900).tolist()

    def req(tokens: list[int]) -> GenRequest:
        return GenRequest(tokens=tokens, params=SamplingParams(temperature=0.0), stop=[], max_tokens=4,
                          policy=EA, budget=256, question_len=20)

    slot.run(req(prompt), lambda *_: None)
    assert len(calls) == 1
    again = slot.run(req(prompt), lambda *_: None)
    assert again.cached_tokens == len(prompt) - 1 and again.recalled_cells == 0 and len(calls) == 1
    slot.run(req(prompt + rng.integers(300, 380, 12).tolist()), lambda *_: None)
    assert len(calls) == 2
    s.check_cells()
    s.close()


def test_a_probed_questions_recall_may_replace_the_documents_last_cells(models, monkeypatch):
    """recent=0 (a request's question, read after its own document): recall may swap out the live cells just
    before the question, never the sinks or the question; by default the newest cfg.recent positions stay."""
    import ea_local.engine.session as session_mod

    s = Session(models["llama"], SessionConfig(budget=256, chunk=128, n_threads=1, recall=True))
    rng = np.random.default_rng(4)
    s.prefill([1] + rng.integers(300, 380, 900).tolist())
    since = s.next_pos
    s.prefill(rng.integers(300, 380, 10).tolist())
    seen: list[np.ndarray] = []
    nothing = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64))  # no swap: both calls see one cache
    monkeypatch.setattr(session_mod, "plan_swap", lambda a, l, ev, room, mx: seen.append(ev.copy()) or nothing)
    live = np.array(sorted(s.live))
    s.recall(since)
    s.recall(since, recent=0)
    by_default, probed = seen
    window = (live >= s.next_pos - s.cfg.recent) & (live < since)
    assert window.any() and not by_default[window].any() and probed[window].all()
    assert not probed[(live < s.cfg.n_sink) | (live >= since)].any()
    s.close()


def test_a_probed_questions_answer_tokens_score_the_archive_unless_recall_stops_at_the_users_words(models):
    """The greedy answer tokens a probed question decodes after the context (positions from next_pos) are
    part of the message recall scores with; with `until` (a chat request: where the user's text ends) only
    the user's words are."""
    s = Session(models["llama"], SessionConfig(budget=256, chunk=128, n_threads=1, recall=True))
    rng = np.random.default_rng(5)
    question = rng.integers(300, 380, 10).tolist()
    s.set_question(question)
    s.prefill([1] + rng.integers(300, 380, 900).tolist() + question, turn=False)
    assert s.stats.evictions
    since, end = s.next_pos - len(question), s.next_pos
    answers = set(range(end, end + s.cfg.answer_lookahead))
    _, whole = s.message_queries(since)
    _, words = s.message_queries(since, until=end - 3)
    assert answers <= set(whole.tolist()) and whole.min() >= since
    assert set(words.tolist()) == set(range(since, end - 3))
    s.close()


@pytest.mark.parametrize("arch,answers_ask", [("llama", False), ("gemma3", True)])
def test_a_completions_recall_asks_with_the_probes_answer_only_on_iswa_models(models, monkeypatch, arch, answers_ask):
    """A completion request gives no `until`: recall asks with the question's words, and with the probe's
    greedy answer tokens after them only on an iSWA model (measured: docs/recall.md)."""
    s = Session(models[arch], SessionConfig(budget=256, chunk=128, n_threads=1, recall=True))
    rng = np.random.default_rng(7)
    question = rng.integers(300, 380, 10).tolist()
    s.set_question(question)
    s.prefill([1] + rng.integers(300, 380, 900).tolist() + question, turn=False)
    end = s.next_pos
    asked = []
    own = s.message_queries
    monkeypatch.setattr(s, "message_queries", lambda since, until=None: asked.append(own(since, until)) or asked[-1])
    s.recall_message(0, question)
    (_, pos), = asked
    assert set(range(end - len(question), end)) <= set(pos.tolist())
    assert (pos >= end).any() == answers_ask
    s.close()


def test_a_probes_queries_give_way_to_the_real_read_of_their_positions(models):
    """A compression probes the question after the context (positions from next_pos) and undoes it; when
    the question is then read there as context, recall asks with that read's queries, not the probe's
    (nor the probe's answer tokens, whose positions hold nothing)."""
    s = Session(models["llama"], SessionConfig(budget=256, chunk=128, n_threads=1, recall=True))
    rng = np.random.default_rng(6)
    question = rng.integers(300, 380, 10).tolist()
    s.set_question(question)
    s.prefill([1] + rng.integers(300, 380, 600).tolist(), turn=False)
    start = s.next_pos
    s.compress(s.n_cells - 16)  # probes the question at start..start+9, its answer after
    assert s.focus.pos.min() == start and s.focus.pos.max() == start + len(question) + s.cfg.answer_lookahead - 1
    s.prefill(question, turn=False)
    q, pos = s.message_queries(start)
    assert pos.tolist() == list(range(start, s.next_pos))
    read = np.isin(s.queries.pos, pos)
    for il in s.layers:
        np.testing.assert_array_equal(q[il], s.queries.q[il][read])
    s.close()
