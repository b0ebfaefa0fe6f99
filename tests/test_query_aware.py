"""Query-aware statistics: the focus window, the question probe, weighted statistics."""
from __future__ import annotations

import numpy as np
import pytest

from ea_local.engine import snapshot
from ea_local.engine.session import BudgetError, Session, SessionConfig
from ea_local.policies.base import CellView, RopeSpec
from ea_local.policies.expected_attention import query_statistics
from ea_local.policies import expected_attention, snapkv

from .conftest import GEMMA, gpl_tokens


def test_weighted_statistics_equal_repeated_samples():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(5, 2, 8))
    counts = np.array([1, 3, 2, 1, 4])
    mu_w, cov_w = query_statistics(q, weights=counts / counts.sum())
    mu_r, cov_r = query_statistics(np.repeat(q, counts, axis=0))
    np.testing.assert_allclose(mu_w, mu_r, atol=1e-12)
    np.testing.assert_allclose(cov_w, cov_r, atol=1e-12)
    mu_u, cov_u = query_statistics(q, weights=np.ones(5))  # normalised
    mu, cov = query_statistics(q)
    np.testing.assert_allclose(mu_u, mu)
    np.testing.assert_allclose(cov_u, cov)
    with pytest.raises(ValueError):
        query_statistics(q, weights=np.array([1.0, -1, 1, 1, 1]))


def _view(weights, focus_dir, ctx_dir):
    """Two keys; context queries point at key 0, focus queries at key 1."""
    d = 8
    keys = np.zeros((2, 1, d))
    keys[0, 0, ctx_dir] = keys[1, 0, focus_dir] = 4.0
    q = np.zeros((6, 1, d))
    q[:4, 0, ctx_dir] = 4.0  # 4 context queries
    q[4:, 0, focus_dir] = 4.0  # 2 focus queries
    rope = RopeSpec(n_dims=d, freq_base=1e9)  # dims 4..7 barely rotate: the test is about the weights
    return CellView(positions=np.array([10, 20]), keys={0: keys}, values={0: np.ones((2, 1, d))},
                    queries={0: q}, query_positions=np.arange(100, 106), query_weights=weights,
                    rope={0: rope}, next_pos=106)


@pytest.mark.parametrize("policy,opts", [(expected_attention, {"newest_query": False}), (snapkv, {"kernel_size": 1})])
def test_focus_weight_moves_the_ranking(policy, opts):
    """Equal weights: 4 context queries outvote 2 focus queries; focus weight 0.9: the focus key wins.
    (Expected Attention without the newest query's rows, a focus query here: the weights alone decide.)"""
    plain = policy.score(_view(None, 6, 4), **opts)
    assert plain[0] > plain[1]
    w = np.concatenate([np.full(4, 0.1 / 4), np.full(2, 0.9 / 2)])
    steered = policy.score(_view(w, 6, 4), **opts)
    assert steered[1] > steered[0]


@pytest.fixture(scope="module")
def gemma_ctx():
    return gpl_tokens(900)


def _cells(s: Session, layer: int) -> list[int]:
    return s.rt.kv_read(layer, keys=False, values=False)[0].tolist()


def _probe_without_trace(s: Session, question: list[int]) -> None:
    """Probe the question; the cells of both caches, the positions and the logits are as before."""
    before = (dict(s.live), s.next_pos, _cells(s, s.layers[0]), _cells(s, s.info.sliding_layers[0]))
    logits = s.rt.logits()
    s.set_question(question)
    s._probe_question()
    assert (dict(s.live), s.next_pos, _cells(s, s.layers[0]), _cells(s, s.info.sliding_layers[0])) == before
    np.testing.assert_array_equal(s.rt.logits(), logits)


def test_probe_leaves_no_trace(gemma_ctx):
    """The question probe removes its cells from both caches, keeps positions and restores the logits."""
    cfg = SessionConfig(budget=1024, chunk=256, question_weight=1.0, answer_lookahead=0)
    s = Session(str(GEMMA), cfg)
    s.prefill(gemma_ctx)
    question = s.rt.tokenize("What is the pass key? The pass key is")
    _probe_without_trace(s, question)
    assert s.focus.pos.tolist() == list(range(s.next_pos, s.next_pos + len(question)))
    assert all(s.focus.q[il].shape[0] == len(question) for il in s.layers)
    # the next real token sees the same cache as a session that never probed
    ref = Session(str(GEMMA), cfg)
    ref.prefill(gemma_ctx)
    s._decode([question[0]])
    ref._decode([question[0]])
    a, b = s.rt.logits(), ref.rt.logits()
    assert a.argmax() == b.argmax()
    assert np.abs(a - b).max() < 0.05 * np.abs(b).max()  # cell order may change float summation only
    s.close()
    ref.close()


def test_answer_lookahead_probes_the_greedy_answer(gemma_ctx):
    """answer_lookahead k: the focus holds the question's queries and those of the k greedy answer
    tokens, exactly what decoding the question and then answering greedily captures; the session
    keeps the answer; no trace left."""
    k = 4
    s = Session(str(GEMMA), SessionConfig(budget=1024, chunk=256, question_weight=1.0, answer_lookahead=k))
    s.prefill(gemma_ctx)
    question = s.rt.tokenize("What is the licence called? It is called")
    _probe_without_trace(s, question)
    n = len(question) + k
    assert s.focus.pos.tolist() == list(range(s.next_pos, s.next_pos + n))

    ref = Session(str(GEMMA), SessionConfig(budget=1024, chunk=256))
    ref.prefill(gemma_ctx)
    ref.rt.capture_clear()
    pos = list(range(ref.next_pos, ref.next_pos + n))
    ref.rt.decode(question, pos[:len(question)])
    answer = []
    for p in pos[len(question):]:
        answer.append(int(np.argmax(ref.rt.logits())))
        ref.rt.decode([answer[-1]], [p])
    assert s.probe_answer == answer  # what steered the compression, for tracing it (scripts/bench/probe_trace.py)
    for il in s.layers:
        got_pos, q = ref.captured_queries(il)
        assert got_pos.tolist() == pos
        np.testing.assert_allclose(s.focus.q[il].reshape(n, -1), q.reshape(n, -1), rtol=1e-3, atol=1e-3)
    s.close()
    ref.close()


def test_a_question_the_context_ends_with_is_not_asked_twice(gemma_ctx):
    """When the context was just read up to its question (a request's last chunk, then a compression),
    the probe answers from there: the focus holds the question's queries as read and the greedy
    answer's, the same a probe after the context without the question would capture."""
    k = 4
    cfg = SessionConfig(budget=1024, chunk=256, question_weight=1.0, answer_lookahead=k)
    s = Session(str(GEMMA), cfg)
    s.prefill(gemma_ctx)
    question = s.rt.tokenize("What is the licence called? It is called")
    s.prefill(question)
    _probe_without_trace(s, question)
    n = len(question) + k
    start = s.next_pos - len(question)
    assert s.focus.pos.tolist() == list(range(start, start + n))

    ref = Session(str(GEMMA), cfg)
    ref.prefill(gemma_ctx)
    ref.set_question(question)
    ref._probe_question()  # asked after the context, at the positions the context gave it
    assert s.probe_answer == ref.probe_answer
    for il in s.layers:
        np.testing.assert_allclose(s.focus.q[il].reshape(n, -1), ref.focus.q[il].reshape(n, -1), rtol=1e-3, atol=1e-3)
    s.close()
    ref.close()


def test_view_marks_the_probes_answer_tokens(gemma_ctx):
    """The view says how many of its newest queries are the probe's greedy answer tokens, so that TOVA's
    last query is the question's last token; without a probe (question-agnostic) there are none."""
    k = 3
    s = Session(str(GEMMA), SessionConfig(budget=1024, chunk=256, policy="tova", question_weight=0.5, answer_lookahead=k))
    s.prefill(gemma_ctx)
    question = s.rt.tokenize("What is the licence called? It is called")
    s.set_question(question)
    view = s.view()
    assert view.pseudo_queries == k
    newest = np.sort(view.query_positions)[-1 - k]
    assert newest == s.next_pos + len(question) - 1  # the question's last token
    s.set_question_weight(0.0)
    assert s.view().pseudo_queries == 0
    s.close()


def test_question_too_long_is_refused():
    s = Session(str(GEMMA), SessionConfig(budget=512, chunk=64, answer_lookahead=0))
    with pytest.raises(BudgetError, match="at most 63"):
        s.set_question(list(range(10, 80)))
    s.close()
    s = Session(str(GEMMA), SessionConfig(budget=512, chunk=64))  # 8 answer tokens are probed too
    with pytest.raises(BudgetError, match="at most 55"):
        s.set_question(list(range(10, 70)))
    s.set_question(list(range(10, 65)))
    s.close()
    with pytest.raises(BudgetError, match="answer_lookahead"):
        SessionConfig(budget=512, chunk=64, answer_lookahead=-1).validate()


def test_turn_queries_become_the_focus_and_weigh_what_was_asked(gemma_ctx):
    cfg = SessionConfig(budget=600, chunk=256, step=64, question_weight=0.25)
    s = Session(str(GEMMA), cfg)
    s.prefill(gemma_ctx[:500])
    turn = gemma_ctx[500:540]
    s.prefill(turn, turn=True)
    assert s.focus.pos.tolist() == list(range(500, 540))
    queries, qpos, w = s._statistics()
    assert len(qpos) == len(s.queries.pos) + 40
    assert w is not None and w.sum() == pytest.approx(1.0) and w[-40:].sum() == pytest.approx(0.25)
    # a turn that fits in the headroom is prefilled whole and compressed once, at its end
    n_ev = len(s.stats.evictions)
    s.prefill(gemma_ctx[540:900], turn=True)  # 540 + 360 > n_ctx: compressed once mid-turn, once at its end
    assert s.n_cells <= cfg.budget
    assert s.focus.pos[-1] == 899 and len(s.stats.evictions) > n_ev
    s.close()
    agnostic = Session(str(GEMMA), SessionConfig(budget=600, chunk=256, step=64, question_weight=0.0))
    agnostic.prefill(gemma_ctx[:500])
    agnostic.prefill(turn, turn=True)
    assert agnostic._statistics()[2] is None and agnostic._statistics()[1] is agnostic.queries.pos
    agnostic.close()


def test_deferred_turn_compresses_once_at_its_end(gemma_ctx):
    """A turn that fits in n_ctx - cells is decoded whole, then compressed once with its queries in view."""
    cfg = SessionConfig(budget=512, chunk=128, step=64)
    s = Session(str(GEMMA), cfg)
    s.prefill(gemma_ctx[:500])
    n_ev = len(s.stats.evictions)
    s.prefill(gemma_ctx[500:620], turn=True)  # 500 + 120 = 620 <= n_ctx 640: no compression before
    assert len(s.stats.evictions) == n_ev + 1
    assert s.stats.evictions[-1].at_token == 620  # after the whole turn
    assert s.focus.pos.tolist() == list(range(500, 620))
    assert s.n_cells == cfg.budget - cfg.step
    s.close()


def test_expected_attention_pooling_keeps_the_neighbours_of_a_peak():
    """kernel_size 3: a cell next to the top-scoring cell takes its score; 1 (kvpress) leaves scores alone."""
    v = _view(None, 6, 4)
    d = 8
    keys = np.zeros((5, 1, d))
    keys[2, 0, 4] = 4.0  # only cell 2 matches the context queries
    v.keys = {0: keys}
    v.values = {0: np.ones((5, 1, d))}
    v.positions = np.array([10, 11, 12, 13, 14])
    plain = expected_attention.score(v)
    pooled = expected_attention.score(v, kernel_size=3)
    assert plain.argmax() == 2 and plain[1] < plain[2] and plain[3] < plain[2]
    np.testing.assert_allclose(pooled[1:4], plain[2])
    assert pooled[0] == max(plain[0], plain[1]) and pooled[4] == max(plain[3], plain[4])


def test_focus_window_survives_save_and_load(gemma_ctx, tmp_path):
    cfg = SessionConfig(budget=600, chunk=256, step=64)
    s = Session(str(GEMMA), cfg)
    s.prefill(gemma_ctx[:300])
    s.prefill(gemma_ctx[300:340], turn=True)
    snapshot.save(s, str(tmp_path / "s.eas"))
    t = Session(str(GEMMA), cfg)
    snapshot.load(t, str(tmp_path / "s.eas"))
    assert t.focus.pos.tolist() == s.focus.pos.tolist() == list(range(300, 340))
    for il in s.layers:
        np.testing.assert_array_equal(t.focus.q[il], s.focus.q[il])
    s.close()
    t.close()


@pytest.mark.parametrize("arch,rows_when_steered", [("llama", False), ("gemma3", True)])
def test_expected_attention_drops_the_newest_querys_rows_where_a_message_steers_an_all_layer_model(
        models, arch, rows_when_steered):
    """The newest query's rows stay on with the context's own queries; on a model whose every layer is
    evicted they go when a user message (or a probed question) steers the statistics, as measured; an
    explicit option wins."""
    s = Session(models[arch], SessionConfig(budget=512, chunk=64, n_threads=1))
    s.prefill([1] + list(range(3, 160)))
    assert s._score_options().get("newest_query", True)  # the context's own queries
    s.prefill(list(range(200, 230)), turn=True)  # a user message: its queries are the focus
    assert s._score_options().get("newest_query", True) is rows_when_steered
    s.set_question_weight(0.0)  # question-agnostic: the context's own queries again
    assert s._score_options().get("newest_query", True)
    s.set_question_weight(0.5)
    s.set_policy("expected-attention", newest_query=True)
    assert s._score_options()["newest_query"] is True
    s.close()
