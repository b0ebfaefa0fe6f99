"""Chat templates: the GGUF's own (tokenizer.chat_template) or, when the file has none, the
architecture's known one.

Rendering goes through llama.cpp's `llama_chat_apply_template`, which recognises the common
templates (gemma, llama3, chatml, mistral, ...) from the template text or a built-in name; a
GGUF template it does not recognise is run with jinja2 (sandboxed) instead.

Incremental feeding: a conversation's KV cache already holds everything up to some point of
the rendered text. `TurnRenderer.split` renders the conversation with sentinels in place of the
last answer and of the new user message; the text between them (the end-of-turn markers and the
next turn's header) and after the user sentinel (the generation prompt) is what must be fed.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import llama_cpp.llama_cpp as ll

# architecture -> llama.cpp built-in template name, for files without tokenizer.chat_template
KNOWN_TEMPLATES = {
    "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma",
    "llama": "llama3",
    "mistral3": "mistral-v7",
    "qwen2": "chatml", "qwen2moe": "chatml", "qwen3": "chatml", "qwen3moe": "chatml",
    "phi3": "phi3",
    "granite": "granite",
}
DEFAULT_TEMPLATE = "chatml"

# plain ASCII, no whitespace: survives trim() and escaping in templates
USER_SENTINEL = "EALOCALUSERSLOT7Q"
ANSWER_SENTINEL = "EALOCALANSWERSLOT3Z"


class TemplateError(ValueError):
    pass


@dataclass
class ChatTemplate:
    source: str  # the template text, or a llama.cpp built-in name
    origin: str  # "gguf" or "builtin"
    name: str  # for messages: "the model's own", "gemma", ...
    bos_token: str = ""
    eos_token: str = ""
    _jinja: object | None = None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self._jinja is None:
            out = _apply_llama(self.source, messages, add_generation_prompt)
            if out is not None:
                return out
            if self.origin == "builtin":
                raise TemplateError(f"llama.cpp does not know the chat template {self.source!r}")
            self._jinja = _compile_jinja(self.source)
        try:
            return self._jinja.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                      bos_token=self.bos_token, eos_token=self.eos_token)
        except Exception as e:  # noqa: BLE001 — jinja raise_exception and template bugs alike
            raise TemplateError(f"the model's chat template failed: {e}") from e


def _apply_llama(tmpl: str, messages: list[dict], add_ass: bool) -> str | None:
    """llama.cpp's renderer; None when it does not recognise the template."""
    keep = [(m["role"].encode(), m["content"].encode()) for m in messages]
    arr = (ll.llama_chat_message * len(keep))()
    for i, (role, content) in enumerate(keep):
        arr[i].role = role
        arr[i].content = content
    size = 256 + 2 * sum(len(c) + len(r) for r, c in keep)
    buf = ctypes.create_string_buffer(size)
    n = ll.llama_chat_apply_template(tmpl.encode(), arr, len(keep), add_ass, buf, size)
    if n < 0:
        return None
    if n > size:
        buf = ctypes.create_string_buffer(n)
        n = ll.llama_chat_apply_template(tmpl.encode(), arr, len(keep), add_ass, buf, n)
    return buf.raw[:n].decode("utf-8", errors="replace")


def _compile_jinja(source: str):
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - llama-cpp-python depends on jinja2
        raise TemplateError("the model's chat template needs jinja2, which is not installed") from e

    def raise_exception(msg):
        raise TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except Exception as e:  # noqa: BLE001
        raise TemplateError(f"the model's chat template does not parse: {e}") from e


def resolve_template(info, rt=None) -> tuple[ChatTemplate, str | None]:
    """(template, notice): the GGUF's template, else the architecture's known one with a notice."""
    bos = eos = ""
    if rt is not None:
        bos = rt.token_bytes(rt.bos(), special=True).decode("utf-8", errors="replace")
        eos_id = ll.llama_vocab_eos(rt.vocab)
        if eos_id >= 0:
            eos = rt.token_bytes(eos_id, special=True).decode("utf-8", errors="replace")
    if info.chat_template:
        return ChatTemplate(info.chat_template, "gguf", "the model's own", bos, eos), None
    name = KNOWN_TEMPLATES.get(info.architecture, DEFAULT_TEMPLATE)
    notice = (f"note: {info.path.split('/')[-1]} has no chat template; using the {name} template "
              f"known for {info.architecture}")
    return ChatTemplate(name, "builtin", name, bos, eos), notice


class TurnRenderer:
    """Turns a growing conversation into the text still to feed, turn by turn."""

    def __init__(self, template: ChatTemplate, system: str | None = None):
        self.t = template
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []

    def prefix(self) -> str:
        """Text before the first user message's content (system prompt, headers): can be fed at once."""
        r = self.t.render(self.messages + [{"role": "user", "content": USER_SENTINEL}], True)
        i = r.find(USER_SENTINEL)
        if i < 0:
            raise TemplateError("the chat template drops the user message")
        return r[:i]

    def split(self) -> tuple[str, str]:
        """(glue, tail) for the next user message: feed glue + user text + tail.

        glue: what follows the last answer (end of turn, next user header), or "" before the
        first user message when `prefix()` was fed; tail: end of the user turn + generation prompt."""
        msgs = [dict(m) for m in self.messages]
        answered = bool(msgs) and msgs[-1]["role"] == "assistant"
        if answered:
            msgs[-1]["content"] = ANSWER_SENTINEL
        r = self.t.render(msgs + [{"role": "user", "content": USER_SENTINEL}], True)
        u = r.rfind(USER_SENTINEL)
        if u < 0:
            raise TemplateError("the chat template drops the user message")
        if answered:
            a = r.rfind(ANSWER_SENTINEL, 0, u)
            if a < 0:  # the template drops earlier answers: nothing to close
                glue = ""
            else:
                glue = r[a + len(ANSWER_SENTINEL):u]
        else:
            glue = ""
        return glue, r[u + len(USER_SENTINEL):]

    def add(self, role: str, content: str) -> None:
        self.messages.append({"role": role, "content": content})
