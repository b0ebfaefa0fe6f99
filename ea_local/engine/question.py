"""Which tail of a prompt is its question: one rule for the server's requests and chat's messages.

A request (or a message typed into `ea-local chat`) is known whole before it is read, so its
question is known before the text that comes first. When the prompt does not fit the budget,
that question is probed after the context at every compression (Session.set_question, as
`summarize --prompt` does), so the cells the question will attend to survive the compressions
made before it is read; read as the turn, the focus would be the whole message's queries, for a
pasted document mostly the document's.

- chat: the last user message, with the template's text after it (end of turn, the assistant's
  header: what the probe's answer lookahead continues from). A long last message (a pasted
  document with a question under it) contributes only its last paragraph.
- completion: the prompt's last paragraph (after the last blank line).

Both are capped at `cap` tokens, keeping the end: the probe is decoded after the context, so
its length is taken from the room the prefill has.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .session import SessionConfig

PARAGRAPH = "\n\n"


def question_cap(cfg: "SessionConfig") -> int:
    """Most question tokens a request or a chat message probes: the probe and its answer lookahead fit
    in one chunk, and in the step of cells that prefill's room leaves free, so probing costs no budget."""
    return max(0, min(cfg.step_cells, cfg.chunk - 1) - cfg.answer_lookahead)


def last_paragraph(text: str) -> str:
    """The text after the last blank line (trailing whitespace does not count as one)."""
    i = text.rstrip().rfind(PARAGRAPH)
    return text[i + len(PARAGRAPH):] if i >= 0 else text


def chat_question_text(rendered: str, messages: list[dict], count: Callable[[str], int], cap: int) -> str:
    """The question of a rendered chat prompt: from the last user message's content to the end."""
    user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    if not user.strip():
        return ""
    i = rendered.rfind(user)
    if i < 0:  # the template changed the message (trimmed it, escaped it): its last paragraph then
        j = rendered.rfind(last_paragraph(user).strip())
        return rendered[j:] if j >= 0 else ""
    text = rendered[i:]
    if count(text) > cap:
        text = last_paragraph(user) + rendered[i + len(user):]
    return text


def chat_tail_text(rendered: str, messages: list[dict]) -> str:
    """What the template writes after the last message when it is the user's (its end of turn, the
    assistant's header): their queries attend to the conversation's structure, not to what the user
    asked, so recall leaves them out. "" when the last message is not the user's or cannot be found."""
    if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        return ""
    user = messages[-1]["content"]
    i = rendered.rfind(user)
    return rendered[i + len(user):] if i >= 0 else ""


def completion_question_text(prompt: str) -> str:
    return last_paragraph(prompt)


def question_length(text: str, n_prompt: int, count: Callable[[str], int], cap: int) -> int:
    """Tokens at the end of the prompt that form the question: at most `cap`, and fewer than the
    prompt (a prompt that is all question has no context for it to steer)."""
    if not text.strip() or cap <= 0:
        return 0
    n = min(count(text), cap)
    return n if n < n_prompt else 0
