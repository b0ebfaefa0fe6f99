"""Recall on the embedded SmolLM2 model: evicted cells are archived, the message that asks about
them brings them back within the budget, through the Session and the chat path."""
from __future__ import annotations

import numpy as np
import pytest

from ea_local.apps.chat import Chat, ChatOptions
from ea_local.engine.archive import bytes_per_token, parse_size
from ea_local.engine.session import Session, SessionConfig, scored_layers
from ea_local.model.info import read_model_info
from ea_local.model.embedded import chat_model_path

from .conftest import GPL3

APACHE = GPL3.with_name("Apache-2.0")  # real prose, as GPL3

FACT = "User: Please remember this. My locker code is 58213.\nAssistant: Noted: My locker code is 58213.\n"
QUESTION = "User: What is my locker code?\nAssistant: Your locker code is"


def _filler(n: int) -> list[str]:
    paras = [" ".join(p.split()) for p in GPL3.read_text().split("\n\n") if len(p.split()) >= 20]
    return [f"User: Here is a passage I am reading: {p}\nAssistant: Thank you, I have read it.\n" for p in paras[:n]]


def _session(policy: str = "expected-attention", recall: bool = True, **kw) -> Session:
    cfg = SessionConfig(policy=policy, recall=recall, **{"budget": 256, "chunk": 128, "recent": 32, "step": 64, **kw})
    return Session(str(chat_model_path()), cfg)


def _fact_positions(s: Session, toks: list[int]) -> list[int]:
    digits = set(s.rt.tokenize(" 58213")) - set(s.rt.tokenize(" "))
    return [i for i, t in enumerate(toks) if t in digits]


@pytest.mark.parametrize("policy", ["expected-attention", "streaming-llm"])
def test_question_brings_the_fact_back_within_budget(policy):
    s = _session(policy)
    first = [s.rt.bos()] if s.rt.add_bos() else []
    fact = first + s.rt.tokenize(FACT)
    s.prefill(fact, turn=True)
    for t in _filler(6):
        s.prefill(s.rt.tokenize(t), turn=True)
    where = _fact_positions(s, fact)
    gone = [p for p in where if p not in s.live]  # pooled scores may keep a digit or two of it
    assert where and len(gone) > len(where) // 2, "the filler should have evicted the fact"
    a = s.archive
    assert len(a) == s.stats.archived == sum(e.n_evicted for e in s.stats.evictions)
    layers = scored_layers(s.info.global_layers)  # what `ea-local info` shows
    assert a.bytes_per_token == bytes_per_token(s.info, "f16", layers) and a.nbytes == len(a) * a.bytes_per_token
    start = s.next_pos
    s.prefill(s.rt.tokenize(QUESTION), turn=True)
    n = s.recall(since=start)
    assert n > 0 and s.stats.recalls == 1 and s.stats.recalled == n
    assert s.n_cells <= s.cfg.budget
    s.check_cells()  # llama.cpp's cells are exactly the bookkeeping's
    back = [p for p in gone if p in s.live]
    assert len(back) >= len(gone) // 2, f"fact digits back: {back} of {gone}"
    # the answer is generated from the restored cells (greedy)
    reply = "".join(s.generate([], max_tokens=8))
    assert s.n_cells <= s.cfg.budget
    assert "58213" in reply  # the question's tail was decoded again with the fact back in the cache
    s.close()


def test_no_recall_keeps_no_archive():
    s = _session(recall=False)
    s.prefill(s.rt.tokenize(FACT + "".join(_filler(3))), turn=True)
    assert s.archive is None and s.recall(since=0) == 0
    s.close()


def test_restored_cells_evicted_again_and_compaction_renumbers_archive():
    s = _session(archive_tokens=150)  # cells dropped past the bound leave holes for the compaction to close
    s.prefill(s.rt.tokenize(FACT), turn=True)
    for t in _filler(5):
        s.prefill(s.rt.tokenize(t), turn=True)
    assert s.archive.dropped > 0
    arch_before = sorted(s.archive.pos.tolist())
    s.compact()  # live and archived cells renumbered together
    assert s.next_pos == s.n_cells + len(s.archive)
    assert sorted(s.archive.pos.tolist()) != arch_before and max(s.archive.pos) < s.next_pos
    assert not set(s.archive.pos.tolist()) & set(s.live)
    start = s.next_pos
    s.prefill(s.rt.tokenize(QUESTION), turn=True)
    assert s.recall(since=start) > 0  # restored at the renumbered positions, K re-rotated by llama.cpp
    s.check_cells()
    for t in _filler(8)[5:]:  # recalled cells can be evicted (and archived) again
        s.prefill(s.rt.tokenize(t), turn=True)
    assert s.n_cells <= s.cfg.budget and len(s.archive) == 150
    s.check_cells()
    s.truncate(s.next_pos - 10)
    assert max(s.archive.pos) < s.next_pos
    s.close()


def test_archive_bound_in_tokens():
    s = _session(archive_tokens=100)
    for t in _filler(6):
        s.prefill(s.rt.tokenize(t), turn=True)
    assert len(s.archive) == 100 and s.archive.dropped == s.stats.archived - 100
    s.close()


def test_parse_size():
    assert parse_size("4096") == (4096, None)
    assert parse_size("64MiB") == (None, 64 * 2**20)
    assert parse_size("1.5GiB") == (None, int(1.5 * 2**30))
    with pytest.raises(ValueError):
        parse_size("lots")


def test_chat_recalls_and_stats_and_save_load(tmp_path):
    info = read_model_info(chat_model_path())
    opts = ChatOptions(budget=256, temperature=0, max_tokens=12, chunk=128, archive="2MiB")
    chat = Chat(info, opts)
    chat.start()
    assert chat.s.recall_on
    "".join(chat.ask("Please remember this: my locker code is 58213."))
    for p in _filler(5):
        "".join(chat.ask(p.split("\n")[0].removeprefix("User: ")))
    assert chat.s.stats.evictions and len(chat.s.archive) > 0
    "".join(chat.ask("What is my locker code?"))
    lines = chat.stats_lines()
    rec = [ln for ln in lines if ln.startswith("recall")]
    assert rec and "archive" in rec[0] and f"{chat.s.stats.recalls} recalls" in rec[0]
    assert chat.s.stats.recalls >= 1 and chat.s.n_cells <= 256
    assert chat.s.archive.nbytes <= 2 * 2**20
    arch = chat.s.archive.copy()
    path = tmp_path / "c.session"
    chat.save(str(path))
    chat.reset()
    assert len(chat.s.archive) == 0
    chat.load(str(path))
    assert np.array_equal(np.sort(chat.s.archive.pos), np.sort(arch.pos))
    for il in arch.layers:
        assert np.array_equal(chat.s.archive.k[il][np.argsort(chat.s.archive.pos)], arch.k[il][np.argsort(arch.pos)])
    chat.close()
    off = Chat(info, ChatOptions(budget=256, temperature=0, chunk=128, recall=False))
    assert off.s.archive is None and off.stats_lines()[-1] == "recall      off"
    off.close()


def test_chat_budget_raised_keeps_archive_and_positions():
    """/budget past the context moves the conversation to a larger one: the archive, the cells' positions
    and the bookkeeping come along, and the next question still recalls within the new budget."""
    info = read_model_info(chat_model_path())
    chat = Chat(info, ChatOptions(budget=256, temperature=0, max_tokens=8, chunk=128))
    chat.start()
    "".join(chat.ask("Please remember this: my locker code is 58213."))
    for p in _filler(5):
        "".join(chat.ask(p.split("\n")[0].removeprefix("User: ")))
    old = chat.s
    arch, live, next_pos, archived = old.archive.copy(), dict(old.live), old.next_pos, old.stats.archived
    assert len(arch) > 0
    n = old.rt.n_ctx + 100  # more than the context holds: a new, larger one
    msg = chat.set_budget(n)
    s = chat.s
    assert s is not old and s.cfg.budget == n and "archive" in msg
    assert s.live == live and s.next_pos == next_pos and s.stats.archived == archived
    s.check_cells()
    order, o2 = np.argsort(arch.pos), np.argsort(s.archive.pos)
    assert np.array_equal(s.archive.pos[o2], arch.pos[order])
    for il in arch.layers:
        assert np.array_equal(s.archive.k[il][o2], arch.k[il][order])
        assert np.array_equal(s.archive.v[il][o2], arch.v[il][order])
    recalls = s.stats.recalls
    "".join(chat.ask("What is my locker code?"))
    assert s.stats.recalls == recalls + 1 and s.n_cells <= s.cfg.budget
    chat.close()


def test_contrast_ranks_what_only_the_message_looks_for():
    from ea_local.engine.recall import contrast

    msg = np.array([0.30, 0.10, 0.002])  # a turn marker every turn attends, a fact, a cell nobody reads
    base = np.array([0.40, 0.0005, 0.002])
    c = contrast(msg, base)
    assert c[1] > c[0] > 0 and c[1] > c[2]
    assert np.argmax(msg) == 0  # the plain share would have ranked the turn marker first


def test_tight_budget_brings_the_asked_fact_back():
    """At 160 cells (a recall of 40) the question brings back the digits of the fact it asks about, not the
    recent past or the other fact; the queries before the question are its baseline."""
    s = _session(budget=160, chunk=80, recent=20, step=40)
    first = [s.rt.bos()] if s.rt.add_bos() else []
    other = first + s.rt.tokenize("User: Please remember this. My flight number is 40717.\nAssistant: Noted: My flight number is 40717.\n")
    s.prefill(other, turn=True)
    fact = s.rt.tokenize(FACT)
    start_fact = s.next_pos
    s.prefill(fact, turn=True)
    for t in _filler(10):
        s.prefill(s.rt.tokenize(t), turn=True)
    digits = set(s.rt.tokenize(" 58213")) - set(s.rt.tokenize(" "))
    where = [start_fact + i for i, t in enumerate(fact) if t in digits]
    assert where and not any(p in s.live for p in where)
    start = s.next_pos
    s.prefill(s.rt.tokenize(QUESTION), turn=True)
    q, qp = s.message_queries(start)
    b, bp = s.baseline_queries(start, len(qp))
    assert len(bp) == len(qp) and bp.max() < start and np.all(np.diff(bp) > 0)
    n = s.recall(since=start)
    assert 0 < n <= 40 and s.n_cells <= s.cfg.budget
    back = [p for p in where if p in s.live]
    assert len(back) >= len(where) // 2, f"fact digits back: {back} of {where}"
    s.close()


def _passkey_request(s: Session, policy: str, key: str = "17412"):
    """A chat request over a 1k-token Apache-2.0 document with a pass key at half its length, and the
    positions of the key's sentence."""
    from ea_local.engine.sampling import SamplingParams
    from ea_local.model.chat_template import resolve_template
    from ea_local.engine.question import chat_question_text, chat_tail_text, question_cap, question_length
    from ea_local.serve.slots import GenRequest

    template, _ = resolve_template(s.info, s.rt)
    words = " ".join(APACHE.read_text().split()).split(" ")
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    doc = ("There is important info hidden inside a lot of irrelevant text. Find it and memorize it. "
           + " ".join(words[:380]) + " " + needle + " ".join(words[380:760]))
    messages = [{"role": "user", "content": doc + "\n\nWhat is the pass key?"}]
    text = template.render(messages, add_generation_prompt=True)
    count = s.rt.count
    tokens = s.rt.tokenize(text, add_bos=False, special=True)
    cap = question_cap(s.cfg)
    n_q = question_length(chat_question_text(text, messages, count, cap), len(tokens), count, cap)
    a = count(text[:text.index(needle)])
    span = list(range(a, count(text[:text.index(needle)] + needle.rstrip())))
    req = GenRequest(tokens=tokens, params=SamplingParams(temperature=0.0), stop=[], max_tokens=10,
                     policy=policy, budget=128, question_len=n_q,
                     template_tail=count(chat_tail_text(text, messages)))
    return req, span


def test_a_chat_request_recalls_with_the_users_words_not_the_templates_tail():
    """A chat request far over the budget, a pass key in real prose, read through 128 cells by StreamingLLM:
    recall scored with the queries of the user's words brings the key back. The template's tail
    (<|im_end|>, the assistant's header) attends to the system prompt and the turn markers whatever was
    asked; with its queries the recall went there and 10 of the key's 24 cells came back (20 without)."""
    from ea_local.serve.slots import Slot

    s = Session(str(chat_model_path()), SessionConfig(budget=128, policy="streaming-llm", recall=True, n_threads=1))
    req, key = _passkey_request(s, "streaming-llm")
    assert len(req.tokens) > 1000 and 0 < req.template_tail < req.question_len
    res = Slot(0, s).run(req, lambda *_: None)
    assert res.evictions > 0 and res.recalled_cells > 0 and res.cells <= 128
    back = [p for p in key if p in s.live]
    assert len(back) >= 2 * len(key) // 3, f"pass key cells back: {len(back)} of {len(key)}"
    s.close()


@pytest.mark.parametrize("guard", [True, False])
def test_without_recall_a_probed_question_keeps_the_cells_it_asks_for(guard):
    """With recall off, a chat request far over the budget (1k tokens into 128 cells through a server
    slot, Expected Attention, the question probed at every compression) keeps the pass key's sentence:
    at each compression the cells the probe's queries look for, over the document's queries before it,
    stay. Without that guard Expected Attention's own ranking loses the sentence and the answer."""
    from ea_local.serve.slots import Slot

    s = Session(str(chat_model_path()), SessionConfig(budget=128, chunk=64, policy="expected-attention", recall=False,
                                                      guard_question=guard, n_threads=1))  # serve --budget 128's chunk
    req, span = _passkey_request(s, "expected-attention")
    res = Slot(0, s).run(req, lambda *_: None)
    kept = [p for p in span if p in s.live]
    assert res.evictions > 0 and res.recalled_cells == 0 and s.n_cells <= 128
    assert (s.cfg.n_sink, s.cfg.recent) == (32, 32)  # the slot's conversation protection
    if guard:
        assert len(kept) >= 2 * len(span) // 3, f"pass key cells kept: {len(kept)} of {len(span)}"
        assert "17412" in res.text
    else:
        assert len(kept) < len(span) // 3 and "17412" not in res.text
    s.check_cells()
    s.close()


def test_asked_scores_are_the_messages_shares_over_its_baseline():
    from ea_local.engine.recall import asked_scores, contrast, message_scores
    from ea_local.policies.base import RopeSpec

    rng = np.random.default_rng(0)
    rope = {0: RopeSpec(n_dims=8, freq_base=10000.0)}
    keys = {0: rng.standard_normal((20, 1, 8))}
    q, qp = {0: rng.standard_normal((4, 2, 8))}, np.arange(30, 34)
    b, bp = {0: rng.standard_normal((4, 2, 8))}, np.arange(26, 30)
    got = asked_scores(q, qp, b, bp, keys, rope, None)
    assert np.allclose(got, contrast(message_scores(q, qp, keys, rope, None), message_scores(b, bp, keys, rope, None)))
    assert np.allclose(asked_scores(q, qp, {0: b[0][:0]}, bp[:0], keys, rope, None),
                       message_scores(q, qp, keys, rope, None))  # no baseline: the shares alone
