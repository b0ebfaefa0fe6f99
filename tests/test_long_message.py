"""A message that leaves the cache over its budget (a pasted document with a question under it): its
question is known before the message is read, taken as the server takes a request's, and steers
every compression made while or once it is read."""
from __future__ import annotations

import numpy as np

from ea_local.apps.chat import Chat, ChatOptions
from ea_local.model.info import read_model_info


def _document(n_words: int) -> str:
    words = np.random.default_rng(0).integers(0, 100, size=n_words)
    return " ".join(f"w{w}" for w in words)


def _chat(path: str, **kw) -> Chat:
    return Chat(read_model_info(path), ChatOptions(budget=256, chunk=96, max_tokens=4, **kw))


def _text(chat: Chat, tokens: list[int]) -> str:
    return b"".join(chat.s.rt.token_bytes(t, special=True) for t in tokens).decode("utf-8", errors="replace")


def _probing_chat(path: str) -> tuple[Chat, list[list[int]]]:
    """A started chat that records the question of every probe."""
    chat = _chat(path)
    chat.start()
    probed: list[list[int]] = []
    real = chat.s._probe_question
    chat.s._probe_question = lambda: (probed.append(list(chat.s.question)), real())[1]
    return chat, probed


def test_long_message_probes_its_question_at_every_compression(tiny_llama):
    chat, probed = _probing_chat(tiny_llama)
    question = "Which word came first?"
    n_ev = len(chat.s.stats.evictions)
    fed: list[list[int]] = []
    prefill = chat.s.prefill
    chat.s.prefill = lambda toks, **kw: (fed.append(list(toks)), prefill(toks, **kw))[1]
    "".join(chat.ask(_document(600) + "\n\n" + question))
    during = len(chat.s.stats.evictions) - n_ev
    assert fed[0][-len(probed[0]):] == probed[0]  # the prompt's own last tokens, as the server takes them
    assert during >= 2 and len(probed) >= 2  # compressed while reading, the question probed each time
    glue, tail = chat.turns.split()
    # the message's last paragraph and the template's tail (the prompt's own last tokens, so the newline
    # before the question may come with its first token)
    assert all(_text(chat, p).strip() == (question + tail).strip() for p in probed)
    assert chat.s.question == []  # unset after the turn
    # a short message that fits is read as before: its own queries are the focus, no probe
    probed.clear()
    "".join(chat.ask("Thanks."))
    assert probed == []
    chat.s.close()


def test_a_message_over_the_budget_within_one_chunk_is_steered_as_the_server_steers_it(tiny_llama):
    """A message that fits the context (budget + chunk) but not the budget is compressed once, after it
    is read; its question is probed at that compression, as the server probes a request's question
    whenever its new tokens do not fit the budget."""
    chat, probed = _probing_chat(tiny_llama)
    question = "Which word came first?"
    words = next(n for n in range(20, 400, 4)
                 if len(chat.tokens(chat.opening + chat.turns.turn(_document(n) + "\n\n" + question), first=True))
                 > 256 + 24)
    n_prompt = len(chat.tokens(chat.opening + chat.turns.turn(_document(words) + "\n\n" + question), first=True))
    assert 256 < n_prompt <= 256 + 96 - 8
    n_ev = len(chat.s.stats.evictions)
    "".join(chat.ask(_document(words) + "\n\n" + question))
    assert len(chat.s.stats.evictions) - n_ev == 1 and len(probed) == 1
    assert _text(chat, probed[0]).strip() == (question + chat.turns.split()[1]).strip()
    chat.s.close()


def test_question_agnostic_chat_never_probes(tiny_llama):
    chat = _chat(tiny_llama, question_agnostic=True)
    chat.start()
    probed = []
    chat.s._probe_question = lambda: probed.append(1)
    "".join(chat.ask(_document(600) + "\n\nWhich word came first?"))
    assert probed == [] and chat.s.stats.evictions and chat.s.n_cells <= 256
    chat.s.close()


def test_long_message_recalls_with_its_question(tiny_llama):
    """With recall, what comes back for a pasted message compressed while it was read is what its
    question (the message's last tokens) asks for, whatever the policy; a message that fits recalls
    with all of itself."""
    for policy in ("expected-attention", "streaming-llm"):
        chat = _chat(tiny_llama, policy=policy, recall=True)
        chat.start()
        calls: list[tuple[int, int | None, int | None, int]] = []
        real = chat.s.recall
        chat.s.recall = lambda since, until=None, recent=None: (
            calls.append((since, until, recent, chat.s.next_pos)) or real(since, until, recent))
        question = "Which word came first?"
        n_q = len(chat.tokens(question + chat.turns.split()[1]))
        n_tail = len(chat.s.rt.tokenize(chat.turns.split()[1], add_bos=False, special=True))
        "".join(chat.ask(_document(600) + "\n\n" + question))
        since, until, recent, end = calls[0]
        assert len(calls) == 1 and end - since == n_q, policy
        # asked by the user's words, not the template's tail; the question may replace its document's last cells
        assert until == end - n_tail and recent == 0, policy
        start = chat.s.next_pos
        "".join(chat.ask("Thanks."))
        since, until, recent, end = calls[1]
        assert len(calls) == 2 and since == start, policy  # the short message: from its own start
        assert until == end - n_tail and recent is None, policy  # the last exchange stays guarded
        chat.s.close()


def test_chat_protects_the_opening_and_follows_its_budget(tiny_llama):
    """A chat's opening and recent window are a quarter of its budget each (at most 64), through /budget
    too, smaller (same session) or larger (a new context)."""
    chat = _chat(tiny_llama)
    assert (chat.s.cfg.n_sink, chat.s.cfg.recent) == (64, 64)
    chat.set_budget(128)
    assert (chat.s.cfg.n_sink, chat.s.cfg.recent, chat.s.cfg.budget) == (32, 32, 128)
    assert "protected   the first 32 and the newest 32 positions" in chat.stats_lines()
    chat.set_budget(512)
    assert (chat.s.cfg.n_sink, chat.s.cfg.recent, chat.s.cfg.budget) == (64, 64, 512)
    chat.s.close()
