"""The question of a long message, known before the message is read.

A user who pastes a document and asks about it puts the question last; when the message is
longer than the room left in the cache, the engine compresses while reading it, before it has
seen the question. Taking the question from the message's end first, and probing it at every
compression (Session.set_question, as `summarize --prompt` does), lets the question choose what
survives (docs/query_aware.md).
"""
from __future__ import annotations


def question_text(message: str) -> str:
    """The question of a message: what follows its last paragraph break (the whole message if it has
    none); the caller keeps at most Session.max_question tokens of it, the last ones."""
    body = message.rstrip()
    tail = body.rsplit("\n\n", 1)[-1].strip()
    return tail or body.strip()
