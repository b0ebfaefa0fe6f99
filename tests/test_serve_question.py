"""Which tail of a request's prompt the server probes as its question (no model needed)."""
from __future__ import annotations

from ea_local.engine.question import (chat_question_text, chat_tail_text, completion_question_text, last_paragraph,
                                     question_length)


def words(text: str) -> int:  # a stand-in tokenizer: one token per word
    return len(text.split())


CHATML_TAIL = "<|im_end|>\n<|im_start|>assistant\n"


def chatml(messages: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def test_last_paragraph():
    assert last_paragraph("a b\n\nc d\n\nWhat is the key? The key is") == "What is the key? The key is"
    assert last_paragraph("no break at all") == "no break at all"
    assert last_paragraph("doc\n\nquestion?\n\n") == "question?\n\n"  # a trailing blank line is not the break
    assert completion_question_text("doc text\n\nQ: where?\nA:") == "Q: where?\nA:"


def test_chat_question_is_the_last_user_message_and_the_template_tail():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first answer"}, {"role": "user", "content": "What is the pass key?"}]
    r = chatml(msgs)
    assert chat_question_text(r, msgs, words, cap=100) == "What is the pass key?" + CHATML_TAIL


def test_the_template_tail_is_what_follows_the_users_text():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the pass key?"}]
    assert chat_tail_text(chatml(msgs), msgs) == CHATML_TAIL
    # a request that ends with the assistant (a prefix to continue) or an empty user message has none
    assert chat_tail_text(chatml(msgs + [{"role": "assistant", "content": "The key"}]),
                          msgs + [{"role": "assistant", "content": "The key"}]) == ""
    assert chat_tail_text(chatml([{"role": "user", "content": " "}]), [{"role": "user", "content": " "}]) == ""
    # a template that rewrites the message: nothing is left out
    assert chat_tail_text("[INST] padded question? [/INST]", [{"role": "user", "content": "  padded question?  "}]) == ""


def test_a_long_last_message_contributes_its_last_paragraph():
    doc = " ".join(f"w{i}" for i in range(500))
    msgs = [{"role": "user", "content": f"{doc}\n\nWhat is the pass key?"}]
    assert chat_question_text(chatml(msgs), msgs, words, cap=50) == "What is the pass key?" + CHATML_TAIL


def test_no_user_message_or_a_template_that_rewrites_it():
    assert chat_question_text("<s>system text", [{"role": "system", "content": "system text"}], words, 50) == ""
    msgs = [{"role": "user", "content": "  padded question?  "}]
    assert chat_question_text("[INST] padded question? [/INST]", msgs, words, 50) == "padded question? [/INST]"


def test_question_length_caps_and_never_takes_the_whole_prompt():
    assert question_length("a b c", n_prompt=100, count=words, cap=50) == 3
    assert question_length(" ".join(["x"] * 80), n_prompt=100, count=words, cap=50) == 50
    assert question_length("a b c", n_prompt=3, count=words, cap=50) == 0  # all question: nothing to steer
    assert question_length("   ", n_prompt=100, count=words, cap=50) == 0
    assert question_length("a b", n_prompt=100, count=words, cap=0) == 0
