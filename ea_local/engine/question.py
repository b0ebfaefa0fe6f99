"""The question of a long message, known before the message is read.

A user who pastes a document and asks about it puts the question last; when the message does not
fit the budget, the engine compresses while reading it, before it has seen the question, or once
it is read, with the whole message's queries for a focus. Taking the question from the message's
end first, and probing it at every such compression (Session.set_question, as `summarize --prompt`
and the server do), lets the question choose what survives (docs/query_aware.md).
"""
from __future__ import annotations


def question_text(message: str) -> str:
    """The question of a message: what follows its last paragraph break (the whole message if it has
    none); the caller keeps at most Session.max_question tokens of it, the last ones."""
    body = message.rstrip()
    tail = body.rsplit("\n\n", 1)[-1].strip()
    return tail or body.strip()
