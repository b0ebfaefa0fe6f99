"""The statistics a policy sees on the paths users take: chat and serve turns (prefill(turn=True)),
question-agnostic or not, and query shapes read per layer."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from gguf import GGUFValueType

from ea_local.engine.sampling import SamplingParams
from ea_local.engine.session import Session, SessionConfig, query_shape
from ea_local.model.info import read_model_info
from ea_local.policies import POLICIES

from .gguf_factory import write_tiny_gguf

QUERY_POLICIES = sorted(n for n, p in POLICIES.items() if p.needs_queries)


def _tokens(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, 380, size=n).tolist()


@pytest.mark.parametrize("policy", QUERY_POLICIES)
def test_question_agnostic_turns_compress_from_the_contexts_own_queries(tiny_llama, policy):
    """The serve/chat path in kvpress' protocol: every token arrives as a user turn, question_weight 0.
    Compressions inside and after the turn score with the turn's own queries and never raise."""
    cfg = SessionConfig(budget=200, chunk=64, step=32, recent=32, question_weight=0.0, policy=policy)
    s = Session(tiny_llama, cfg)
    s.prefill([1] + _tokens(700), turn=True)  # compresses mid-turn: nothing was prefilled with turn=False
    assert s.stats.evictions and s.n_cells <= cfg.budget
    assert len(s.focus.pos) == 0 and len(s.queries.pos) > 0
    assert s.queries.pos.max() == s.next_pos - 1  # the context's newest queries
    _, qpos, w = s._statistics()
    assert w is None and np.array_equal(qpos, s.queries.pos)
    text = "".join(s.generate(_tokens(30, 1), SamplingParams(ignore_eos=True), max_tokens=150, turn=True))
    assert text and s.n_cells <= cfg.budget
    s.close()


def test_weight_set_to_zero_after_a_question_aware_turn_still_scores(tiny_llama):
    """A slot that read a turn query-aware (its queries in the focus only) and then serves a
    question-agnostic request: the focus stands in for the empty statistics window."""
    s = Session(tiny_llama, SessionConfig(budget=300, chunk=256, step=32, recent=32))
    s.prefill([1] + _tokens(250), turn=True)  # one chunk, no compression: every query is in the focus
    assert len(s.queries.pos) == 0 and len(s.focus.pos) == 251
    s.set_question_weight(0.0)
    _, qpos, _ = s._statistics()
    assert np.array_equal(qpos, s.focus.pos)
    assert s.compress(100, phase="prefill") == 151
    s.close()


def test_no_query_at_all_falls_back_to_recency(tiny_llama):
    """A truncate can remove every captured query; the next compression keeps sinks and newest cells."""
    s = Session(tiny_llama, SessionConfig(budget=200, chunk=64, step=32, recent=32, stats_window=16))
    s.prefill([1] + _tokens(150))  # the statistics window: the last chunk's queries, positions 128..150
    assert s.queries.pos.min() >= 100
    s.truncate(100)
    assert len(s.queries.pos) == 0 and len(s.focus.pos) == 0
    assert s.compress(60) == 40
    assert sorted(s.live) == [0, 1, 2, 3] + list(range(44, 100))
    s.close()


def test_focus_holds_exactly_the_newest_message(tiny_llama):
    """A reply decoded between two messages stays in the statistics window; the second message's
    queries, and only those, are the focus."""
    s = Session(tiny_llama, SessionConfig(budget=1024, chunk=128, step=64, recent=32))
    first = [1] + _tokens(20)
    s.prefill(first, turn=True)
    reply = list(s.generate([], SamplingParams(ignore_eos=True), max_tokens=40))
    assert reply
    n_reply = s.next_pos - len(first)
    start = s.next_pos
    s.prefill(_tokens(10, 3), turn=True)
    assert s.focus.pos.tolist() == list(range(start, start + 10))
    for q in s.focus.q.values():
        assert q.shape[0] == 10
    # the reply's queries (its last token's too, decoded with the message) are in the statistics window
    reply_pos = set(range(len(first), len(first) + n_reply))
    assert reply_pos - {start - 1} <= set(s.queries.pos.tolist())
    assert not set(s.queries.pos.tolist()) & set(range(start, start + 10))
    s.close()


def test_multi_chunk_message_focus_is_the_whole_message(tiny_llama):
    s = Session(tiny_llama, SessionConfig(budget=1024, chunk=64, step=64, recent=32))
    s.prefill([1] + _tokens(50), turn=True)
    list(s.generate([], SamplingParams(ignore_eos=True), max_tokens=30))
    start = s.next_pos
    s.prefill(_tokens(100, 4), turn=True)  # two chunks of one message
    assert s.focus.pos.tolist() == list(range(start + 36, start + 100))  # its last `chunk` queries
    s.close()


def test_a_short_prefill_chunk_is_topped_up_to_the_statistics_window(tiny_llama):
    """A request's last chunk may be a few tokens: the statistics window keeps the previous chunk's
    newest queries beside them (stats_window in all), not the few alone; a full chunk replaces it."""
    s = Session(tiny_llama, SessionConfig(budget=1024, chunk=256, step=64, recent=32, stats_window=128))
    s.prefill([1] + _tokens(255))
    assert s.queries.pos.tolist() == list(range(256))
    s.prefill(_tokens(4, 1))
    assert s.queries.pos.tolist() == list(range(132, 260))
    assert all(q.shape[0] == 128 for q in s.queries.q.values())
    s.prefill(_tokens(256, 2))
    assert s.queries.pos.tolist() == list(range(260, 516))
    s.close()


def test_a_question_split_across_the_last_two_chunks_is_not_asked_twice(tiny_llama):
    """The prompt's last chunk holds only the question's tail: the question was still read whole, so
    the probe starts from it (focus = the question as read, then the answer lookahead)."""
    k = 4
    s = Session(tiny_llama, SessionConfig(budget=1024, chunk=254, step=64, recent=32, answer_lookahead=k))
    question = _tokens(10, 5)
    prompt = [1] + _tokens(501) + question  # 512 tokens: chunks of 254 and 254, then the question's last 4
    s.prefill(prompt)
    s.set_question(question)
    assert s._question_read()
    s._probe_question()
    start = len(prompt) - len(question)
    assert s.focus.pos.tolist() == list(range(start, start + len(question) + k))
    s.close()


def test_query_shape_is_read_per_layer(tmp_path):
    """A file whose layers have different query head counts: each layer's queries get its own shape."""
    p = write_tiny_gguf(tmp_path / "heads.gguf", n_head_kv=[2, 1],
                        extra_kv={"{arch}.attention.head_count": ([4, 2], GGUFValueType.ARRAY)})
    info = read_model_info(p)
    assert info.n_head_per_layer == (4, 2)
    assert query_shape(info, 0) == (4, 32) and query_shape(info, 1) == (2, 32)


class _FakeRuntime:
    """What llama.cpp's capture returns for a model with 4 query heads in layer 0 and 2 in layer 1."""

    def __init__(self, rows: dict[int, int], positions: list[int]):
        self.rows, self.positions = rows, positions

    def captured(self, il: int, row: int):
        assert row == self.rows[il], f"layer {il}: asked for rows of {row} floats, the layer has {self.rows[il]}"
        m = len(self.positions)
        return np.asarray(self.positions, dtype=np.int64), np.arange(m * row, dtype=np.float32).reshape(m, row)

    def capture_clear(self) -> None:
        pass


def test_captured_queries_are_reshaped_with_each_layers_head_count(tiny_llama):
    s = Session(tiny_llama, SessionConfig(budget=256, chunk=64, step=32, recent=32))
    info = dataclasses.replace(s.info, n_head_per_layer=(4, 2))
    real_rt = s.rt
    s.info, s.q_shape = info, {il: query_shape(info, il) for il in s.layers}
    s.rt = _FakeRuntime({0: 4 * 32, 1: 2 * 32}, [5, 6, 7])
    try:
        s._n_captured = 3
        s._pull_queries(keep=128)
        assert s.queries.q[0].shape == (3, 4, 32) and s.queries.q[1].shape == (3, 2, 32)
        assert s.queries.pos.tolist() == [5, 6, 7]
    finally:
        s.rt = real_rt
        s.close()
