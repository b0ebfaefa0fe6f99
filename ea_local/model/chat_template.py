"""Chat templates: the GGUF's own (tokenizer.chat_template), rendered as written, or, for files
without one, llama.cpp's built-in template of the architecture (instruct models) or a plain
"User: / Assistant:" transcript (base models).

The file's own template is run with sandboxed jinja2 the way llama-cpp-python's
`Jinja2ChatFormatter` and Hugging Face's `apply_chat_template` run it: trim_blocks and
lstrip_blocks, the loopcontrols extension, a pass-through `{% generation %}` tag, a `tojson` that
keeps non-ASCII text, and the variables `messages`, `bos_token`, `eos_token`,
`add_generation_prompt`, `raise_exception`, `strftime_now`, `tools`/`functions` (None). It is not
given to `llama_chat_apply_template`: that recognises a ChatML-looking template as "chatml" and
drops what the template itself adds (a default system prompt, for instance). The rendered text
carries its own special tokens (BOS included when the template writes `bos_token`) and is
tokenized with `special=True` and no BOS added, as llama-cpp-python and `apply_chat_template` do.

Incremental feeding: a conversation's KV cache already holds everything up to some point of the
rendered text. `TurnRenderer.split` renders the conversation with sentinels in place of the last
answer and of the new user message; the text between them (the end-of-turn markers and the next
turn's header) and after the user sentinel (the generation prompt) is what must be fed. It also
checks that the template rendered the earlier turns the same way as when they were fed (`exact`).
"""
from __future__ import annotations

import ctypes
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import llama_cpp.llama_cpp as ll

# architecture -> llama.cpp built-in template name, for instruct files without tokenizer.chat_template
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

# a file without a template whose name says it was tuned to follow instructions
_INSTRUCT_NAME = re.compile(r"instruct|chat|(^|[-_. ])it($|[-_. ])|sft|dpo|rlhf", re.IGNORECASE)


class TemplateError(ValueError):
    pass


@dataclass
class ChatTemplate:
    """One way of turning messages into prompt text.

    origin: "gguf" (the file's jinja template), "builtin" (a llama.cpp template by name) or
    "plain" (a User:/Assistant: transcript for base models)."""
    source: str  # the template text, or a llama.cpp built-in name
    origin: str
    name: str  # for messages: "the model's own", "gemma", "plain transcript", ...
    bos_token: str = ""
    eos_token: str = ""
    stop: tuple[str, ...] = ()  # stop strings the generation needs besides end-of-generation tokens
    _jinja: Any = field(default=None, repr=False)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.origin == "plain":
            return _render_plain(messages, add_generation_prompt)
        if self.origin == "builtin":
            out = _apply_llama(self.source, messages, add_generation_prompt)
            if out is None:
                raise TemplateError(f"llama.cpp does not know the chat template {self.source!r}")
            return out
        if self._jinja is None:
            self._jinja = compile_jinja(self.source)
        try:
            return self._jinja.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                      bos_token=self.bos_token, eos_token=self.eos_token,
                                      raise_exception=_raise_exception, strftime_now=_strftime_now,
                                      functions=None, function_call=None, tools=None, tool_choice=None)
        except TemplateError:
            raise
        except Exception as e:  # noqa: BLE001 — template bugs, undefined attributes, sandbox refusals
            raise TemplateError(f"the model's chat template failed: {e}") from e


# ---- the file's own template (jinja2) ----

def _raise_exception(message: str) -> None:
    raise TemplateError(f"the model's chat template refused the messages: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: tuple[str, str] | None = None,
            sort_keys: bool = False) -> str:
    # Hugging Face's chat-template tojson: non-ASCII text kept as is (jinja's own escapes it for HTML)
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_jinja(source: str):
    """The template compiled in a sandbox (no attribute writes, no unsafe calls)."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - llama-cpp-python depends on jinja2
        raise TemplateError("the model's chat template needs jinja2, which is not installed") from e

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (Hugging Face marks trainable text with it): its body as is."""
        tags = {"generation"}

        def parse(self, parser):  # noqa: ANN001
            parser.stream.skip(1)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(source)
    except Exception as e:  # noqa: BLE001
        raise TemplateError(f"the model's chat template does not parse: {e}") from e


# ---- llama.cpp's built-in templates ----

def _apply_llama(tmpl: str, messages: list[dict], add_ass: bool) -> str | None:
    """llama.cpp's renderer; None when it does not know the template."""
    keep = [(m["role"].encode(), m["content"].encode()) for m in messages]
    arr = (ll.llama_chat_message * max(1, len(keep)))()
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


# ---- base models: a transcript they can continue ----

PLAIN_STOP = ("\nUser:", "\nAssistant:")


def _render_plain(messages: list[dict], add_generation_prompt: bool) -> str:
    """System text, then "User: ..." / "Assistant: ..." lines; the generation prompt is "Assistant:",
    so the model's first token carries its own space, as in the text it was trained on."""
    out = []
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "system":
            out.append(content + "\n\n")
        elif role == "assistant":
            out.append(f"Assistant: {content.lstrip(' ')}\n")  # a reply echoed back with its leading space
        else:
            out.append(f"User: {content}\n")
    if add_generation_prompt:
        out.append("Assistant:")
    return "".join(out)


def looks_instruct(info) -> bool:
    """A file without a template whose general.name or file name says instruct/chat/it."""
    names = [str(getattr(info, "name", "") or ""), str(info.path).replace("\\", "/").rsplit("/", 1)[-1]]
    return any(_INSTRUCT_NAME.search(n) for n in names)


def _token_text(rt, token: int) -> str:
    # the token's text as the vocabulary stores it, as llama-cpp-python passes bos_token/eos_token
    if token < 0:
        return ""
    t = ll.llama_vocab_get_text(rt.vocab, token)
    return t.decode("utf-8", errors="replace") if t else ""


def resolve_template(info, rt=None) -> tuple[ChatTemplate, str | None]:
    """(template, notice): the GGUF's template; else a built-in one (instruct-looking files) or a plain
    transcript (base models), with a one-line notice."""
    bos = eos = ""
    if rt is not None:
        bos = _token_text(rt, ll.llama_vocab_bos(rt.vocab))
        eos = _token_text(rt, ll.llama_vocab_eos(rt.vocab))
    file = str(info.path).replace("\\", "/").split("/")[-1]
    if info.chat_template:
        return ChatTemplate(info.chat_template, "gguf", "the model's own", bos, eos), None
    if not looks_instruct(info):
        notice = (f"note: {file} has no chat template and looks like a base model: it continues text rather "
                  "than following instructions (it is fed a plain User:/Assistant: transcript)")
        return ChatTemplate("plain", "plain", "plain transcript", bos, eos, stop=PLAIN_STOP), notice
    name = KNOWN_TEMPLATES.get(info.architecture, DEFAULT_TEMPLATE)
    notice = f"note: {file} has no chat template; using the {name} template known for {info.architecture}"
    return ChatTemplate(name, "builtin", name, bos, eos), notice


class TurnRenderer:
    """Turns a growing conversation into the text still to feed, turn by turn.

    Templates that accept no system message (they call raise_exception) get it folded into the first
    user message, as their authors suggest. `exact` turns False when the template renders earlier
    turns differently from when they were fed (a system prompt placed before the last user message,
    earlier reasoning dropped): the cache then keeps them as they were fed."""

    def __init__(self, template: ChatTemplate, system: str | None = None):
        self.t = template
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.fold_system = False
        self.exact = True
        self._fed: str | None = None  # rendered text before the last answer, as it was fed
        # (text before the new user message, its tail, the user text, its rendering) from split()/turn()
        self._pending: tuple[str, str, str | None, str | None] | None = None

    def _render(self, messages: list[dict]) -> str:
        if self.fold_system:
            messages = _fold_system(messages)
        try:
            return self.t.render(messages, True)
        except TemplateError:
            if self.fold_system or not messages or messages[0]["role"] != "system":
                raise
            out = self.t.render(_fold_system(messages), True)
            self.fold_system = True
            return out

    def prefix(self) -> str:
        """Text before the first user message's content (system prompt, headers): can be fed at once."""
        r = self._render(self.messages + [{"role": "user", "content": USER_SENTINEL}])
        i = r.find(USER_SENTINEL)
        if i < 0:
            raise TemplateError("the chat template drops the user message")
        if not any(m["role"] == "user" for m in self.messages):
            self._fed = r[:i]
        return r[:i]

    def split(self) -> tuple[str, str]:
        """(glue, tail) for the next user message: feed glue + user text + tail.

        glue: what follows the last answer (end of turn, next user header), or "" before the
        first user message when `prefix()` was fed; tail: end of the user turn + generation prompt."""
        msgs = [dict(m) for m in self.messages]
        answered = bool(msgs) and msgs[-1]["role"] == "assistant"
        if answered:
            msgs[-1]["content"] = ANSWER_SENTINEL
        r = self._render(msgs + [{"role": "user", "content": USER_SENTINEL}])
        u = r.rfind(USER_SENTINEL)
        if u < 0:
            raise TemplateError("the chat template drops the user message")
        glue, before = "", r[:u]
        if answered:
            a = r.rfind(ANSWER_SENTINEL, 0, u)
            if a < 0:  # the template drops earlier answers: nothing to close
                self._check(None)
            else:
                self._check(r[:a])
                glue = r[a + len(ANSWER_SENTINEL):u]
            # the answer as the template writes it (it may trim it): what the next turn compares with
            real = self._render(self.messages + [{"role": "user", "content": USER_SENTINEL}])
            before = real[:real.rfind(USER_SENTINEL)]
        else:
            self._check(r[:u])
        tail = r[u + len(USER_SENTINEL):]
        self._pending = (before, tail, None, None)
        return glue, tail

    def turn(self, text: str) -> str:
        """The text to feed for the next user message: glue + the message as the template writes it (some
        trim it) + tail. Call add("user", text) and add("assistant", answer) afterwards."""
        glue, tail = self.split()
        before = self._pending[0]
        full = self._render(self.messages + [{"role": "user", "content": text}])
        if full.startswith(before) and full.endswith(tail) and len(full) >= len(before) + len(tail):
            shown = full[len(before):len(full) - len(tail)]
        else:  # the message changes what comes before it: feed it as written
            shown = text
            self.exact = False
        self._pending = (before, tail, text, shown)
        return glue + shown + tail

    def _check(self, rendered_before: str | None) -> None:
        """Earlier turns must render as they were fed; whitespace the template writes between the generation
        prompt and the answer ("[/INST] answer") is the model's to generate, not a difference."""
        if self._fed is None:
            return
        if rendered_before is None or not rendered_before.startswith(self._fed) \
                or rendered_before[len(self._fed):].strip():
            self.exact = False

    def add(self, role: str, content: str) -> None:
        if role == "user" and self._pending is not None:
            before, tail, text, shown = self._pending
            self._fed = before + (shown if text == content else content) + tail
            self._pending = None
        self.messages.append({"role": role, "content": content})


def _fold_system(messages: list[dict]) -> list[dict]:
    """The system message joined to the first user message (templates without a system role)."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    for m in rest:
        if m["role"] == "user":
            m["content"] = f"{system}\n\n{m['content']}"
            break
    return rest

