"""Chat templates: the file's own template renders exactly as llama-cpp-python renders it, and the
turn-by-turn feeding adds up to the full rendering (no model weights run: tokenizers and templates only)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from ea_local.model.chat_template import ChatTemplate, TemplateError, TurnRenderer, _fold_system, resolve_template
from ea_local.engine.runtime import ContextConfig, Runtime
from ea_local.model.info import read_model_info
from ea_local.model.embedded import chat_model_path

from .gguf_factory import CHAT_TEMPLATES, write_tiny_gguf

ARVID = "Hello! My name is Arvid and my dog is called Pickle."
CONVERSATIONS = {
    "one user message": [{"role": "user", "content": ARVID}],
    "system and two turns": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "  And 3+3?\n"},
    ],
    "three turns, unicode and newlines": [
        {"role": "user", "content": "Grüße aus Köln 🐕\n\nZweite Zeile"},
        {"role": "assistant", "content": "Hallo! Wie geht's?"},
        {"role": "user", "content": "Gut."},
        {"role": "assistant", "content": "Schön."},
        {"role": "user", "content": "Tschüss {{ not a tag }} {% raw %}"},
    ],
}


def fed_pieces(t: ChatTemplate, msgs: list[dict]) -> tuple[list[str], TurnRenderer]:
    """What a chat feeds for a finished conversation: the prefix, then per user message glue + message + tail,
    then the answer (which the model generates; here its text)."""
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
    tr = TurnRenderer(t, system)
    pieces = [tr.prefix()]
    for m in msgs[1:] if system else msgs:
        pieces.append(tr.turn(m["content"]) if m["role"] == "user" else m["content"])
        tr.add(m["role"], m["content"])
    return pieces, tr


@pytest.fixture(scope="module")
def template_files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("templates")
    files = {name: str(write_tiny_gguf(d / f"tiny-{name}.gguf", arch="gemma3" if name == "gemma" else "llama",
                                       chat_template=src, name=f"tiny {name} instruct"))
             for name, src in CHAT_TEMPLATES.items()}
    files["smollm2"] = str(chat_model_path())
    return files


class Both:
    """ea_local's template for a GGUF next to llama-cpp-python's formatter and tokenizer for the same file."""

    def __init__(self, path: str):
        from llama_cpp import Llama

        self.rt = Runtime(path, ContextConfig(n_ctx=64, n_threads=1))
        self.ours, self.notice = resolve_template(read_model_info(path), self.rt)
        self.llm = Llama(model_path=path, vocab_only=True, verbose=False)
        # what Llama.__init__ builds for a file's template (llama.py: token_get_text of BOS and EOS)
        m = self.llm._model
        self.eos = m.token_get_text(self.llm.token_eos()) if self.llm.token_eos() != -1 else ""
        self.bos = m.token_get_text(self.llm.token_bos()) if self.llm.token_bos() != -1 else ""
        self.source = self.llm.metadata["tokenizer.chat_template"]

    def theirs(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        fmt = Jinja2ChatFormatter(self.source, eos_token=self.eos, bos_token=self.bos,
                                  add_generation_prompt=add_generation_prompt)
        return fmt(messages=messages).prompt

    def their_tokens(self, text: str) -> list[int]:
        # llama.cpp's server (common/chat.cpp): a bos_token the template wrote at the head is dropped when the
        # model adds one, then the prompt is tokenized with the model's specials
        if self.llm.metadata.get("tokenizer.ggml.add_bos_token") == "true" and self.bos and text.startswith(self.bos):
            text = text[len(self.bos):]
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def close(self) -> None:
        self.rt.close()
        self.llm.close()


@pytest.fixture(scope="module")
def both(template_files):
    made: dict[str, Both] = {}

    def get(name: str) -> Both:
        if name not in made:
            made[name] = Both(template_files[name])
        return made[name]

    yield get
    for b in made.values():
        b.close()


MODELS = ["smollm2", "chatml", "llama3", "gemma", "mistral"]


@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("model", MODELS)
def test_prompt_equals_llama_cpp_python(both, model, conv):
    b = both(model)
    assert b.ours.origin == "gguf" and b.notice is None
    assert b.ours.source == b.source
    msgs = CONVERSATIONS[conv]
    for gen in (True, False):
        try:
            want = b.theirs(msgs, gen)
        except ValueError as e:  # the template's raise_exception (mistral: no system role)
            with pytest.raises(TemplateError, match=str(e).split("...")[0][:30]):
                b.ours.render(msgs, gen)
            assert model == "mistral" and msgs[0]["role"] == "system"
            continue
        got = b.ours.render(msgs, gen)
        assert got == want
        assert b.rt.prompt_tokens(got) == b.their_tokens(want)


def test_smollm2_default_system_prompt(both):
    """The template's own default system prompt appears exactly when the conversation has none: the
    text llama.cpp's built-in chatml renderer dropped."""
    b = both("smollm2")
    default = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    plain = b.ours.render([{"role": "user", "content": ARVID}])
    assert plain == default + f"<|im_start|>user\n{ARVID}<|im_end|>\n<|im_start|>assistant\n"
    with_system = b.ours.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": ARVID}])
    assert "SmolLM" not in with_system and with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    toks = b.rt.prompt_tokens(plain)
    assert toks[0] == b.llm.tokenize(b"<|im_start|>", add_bos=False, special=True)[0]  # a special token, no BOS
    tr = TurnRenderer(b.ours)
    assert tr.prefix() == default + "<|im_start|>user\n"


def test_one_bos_when_the_model_wants_one(both):
    """Exactly one BOS heads a prompt of a model that wants one, whether or not its template writes bos_token
    (llama.cpp's server reads chat prompts so); none for a model that does not."""
    llama3, chatml, smollm2 = both("llama3"), both("chatml"), both("smollm2")
    msgs = CONVERSATIONS["one user message"]
    assert "bos_token" in llama3.source and "bos_token" not in chatml.source
    for b in (llama3, chatml):
        assert b.rt.add_bos()
        t = b.rt.prompt_tokens(b.ours.render(msgs))
        assert t[0] == b.rt.bos() and t.count(b.rt.bos()) == 1
    text = smollm2.ours.render(msgs)
    assert not smollm2.rt.add_bos() and smollm2.rt.prompt_tokens(text) == smollm2.rt.tokenize(text, special=True)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
def test_turn_by_turn_feeding_is_exact(both, model, conv):
    """prefix + (glue + user + tail + answer)... concatenated equals the template's rendering of the whole
    conversation; templates without a system role get it folded into the first user message."""
    t = both(model).ours
    msgs = CONVERSATIONS[conv]
    pieces, tr = fed_pieces(t, msgs)
    want_msgs = _fold_system(msgs) if tr.fold_system else msgs
    assert "".join(pieces) == t.render(want_msgs, True)
    assert tr.exact
    assert tr.fold_system == (model == "mistral" and msgs[0]["role"] == "system")


@pytest.mark.parametrize("name", ["chatml", "llama3", "gemma", "mistral-v7", "plain"])
def test_turn_by_turn_feeding_builtin_and_plain(name):
    t = (ChatTemplate("plain", "plain", "plain transcript", stop=("\nUser:",)) if name == "plain"
         else ChatTemplate(name, "builtin", name))
    for conv, msgs in CONVERSATIONS.items():
        pieces, tr = fed_pieces(t, msgs)
        full = t.render(msgs, True)
        # these write "[/INST] answer" / "Assistant: answer": the space is the model's first token's to generate
        lead = {"mistral-v7": "[/INST]", "plain": "Assistant:"}.get(name)
        if lead:
            full = full.replace(lead + " ", lead)
        assert "".join(pieces) == full, conv
        assert tr.exact, conv


def test_template_that_moves_the_system_prompt_is_flagged():
    """A template that puts the system prompt before the last user message renders earlier turns differently
    each turn: the renderer says the feeding is no longer exact instead of pretending it is."""
    src = ("{% for m in messages %}{% if m.role == 'user' %}{% if loop.last and messages[0].role == 'system' %}"
           "[SYS]{{ messages[0].content }}[/SYS]{% endif %}[INST]{{ m.content }}[/INST]"
           "{% elif m.role == 'assistant' %}{{ m.content }}</s>{% endif %}{% endfor %}")
    tr = TurnRenderer(ChatTemplate(src, "gguf", "the model's own"), system="S")
    assert tr.prefix() == "[SYS]S[/SYS][INST]"
    assert tr.split() == ("", "[/INST]") and tr.exact
    tr.add("user", "u1")
    tr.add("assistant", "a1")
    assert tr.split() == ("</s>[SYS]S[/SYS][INST]", "[/INST]")
    assert not tr.exact


def test_jinja_environment_matches_llama_cpp_python():
    """Loop controls, the {% generation %} tag, tojson keeping non-ASCII text, raise_exception, strftime_now."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    src = ("{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
           "{% generation %}<{{ m.role }}>{{ m.content | tojson }}{% endgeneration %}\n"
           "{% if loop.index > 3 %}{% break %}{% endif %}{% endfor %}"
           "{% if tools is none and functions is none %}[no tools]{% endif %}{{ strftime_now('%Y') }}"
           "{% if add_generation_prompt %}<assistant>{% endif %}")
    msgs = [{"role": "system", "content": "x"}] + CONVERSATIONS["three turns, unicode and newlines"]
    ours = ChatTemplate(src, "gguf", "the model's own", "<s>", "</s>").render(msgs)
    assert ours == Jinja2ChatFormatter(src, "</s>", "<s>")(messages=msgs).prompt
    assert "Grüße" in ours and "[no tools]" in ours and ours.endswith("<assistant>")


@pytest.mark.parametrize("src,match", [
    ("{{ raise_exception('no system messages, please') }}", "refused the messages: no system messages"),
    ("{{ messages.append({'role': 'x'}) }}", "chat template failed"),  # the sandbox is immutable
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "chat template failed"),
    ("{% for %}", "does not parse"),
])
def test_bad_templates_are_one_line_errors(src, match):
    t = ChatTemplate(src, "gguf", "the model's own")
    with pytest.raises(TemplateError, match=match) as e:
        t.render([{"role": "user", "content": "hi"}])
    assert "\n" not in str(e.value)


def test_resolve_template_without_one_in_the_file():
    """Instruct-looking files get llama.cpp's template of their architecture; base models a plain transcript."""
    for arch, name in [("gemma3", "gemma"), ("llama", "llama3"), ("qwen2", "chatml"), ("qwen3", "chatml")]:
        info = SimpleNamespace(chat_template=None, architecture=arch, name=f"{arch} 1B Instruct", path=f"/m/{arch}.gguf")
        t, notice = resolve_template(info)
        assert t.source == name and t.origin == "builtin" and name in notice
    info = SimpleNamespace(chat_template=None, architecture="gemma3", name=None, path="/m/gemma-3-270m-it-Q8_0.gguf")
    assert resolve_template(info)[0].origin == "builtin"
    for name, path in [("Gemma 3 270m", "/m/gemma-3-270m-q4_k_m.gguf"), (None, "/m/Llama-3.2-1B.Q4_0.gguf")]:
        t, notice = resolve_template(SimpleNamespace(chat_template=None, architecture="gemma3", name=name, path=path))
        assert t.origin == "plain" and t.stop and "base model" in notice and "\n" not in notice
    t, notice = resolve_template(SimpleNamespace(chat_template="{{ x }}", architecture="llama", name="", path="/m/x"))
    assert t.origin == "gguf" and notice is None


def test_plain_transcript():
    t = ChatTemplate("plain", "plain", "plain transcript")
    tr = TurnRenderer(t, system="A conversation.")
    assert tr.prefix() == "A conversation.\n\nUser: "
    assert tr.split() == ("", "\nAssistant:")
    tr.add("user", "Hi")
    tr.add("assistant", "Hello.")
    assert tr.split() == ("\nUser: ", "\nAssistant:") and tr.exact
