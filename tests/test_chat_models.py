"""`chat` and `summarize` on both embedded models; greedy chat answers equal llama-cpp-python's
`Llama.create_chat_completion` on the instruct model; sampling options behave as llama.cpp's."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from ea_local.model.embedded import chat_model_path, model_path

from .conftest import GPL3

CLI = [sys.executable, "-m", "ea_local.cli"]


def run(*args: str, stdin: str = "", timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def reference():
    """llama-cpp-python's high-level Llama on the same file, as a user of that library would run it."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(chat_model_path()), n_ctx=2048, n_threads=1, verbose=False)
    yield llm
    llm.close()


# (extra chat flags, user messages, repeat penalty; create_chat_completion's default is 1.0)
GREEDY_CASES = {
    "one turn, the template's default system prompt": ([], ["Hello! My name is Arvid and my dog is called Pickle."],
                                                        1.0),
    "system prompt, two turns": (["--system", "You are a pirate."],
                                 ["What is the capital of France?", "And of Germany?"], 1.0),
    "two turns, repeat penalty 1.1": ([], ["Write a haiku about the sea.", "Now one about mountains."], 1.1),
}


@pytest.mark.parametrize("case", list(GREEDY_CASES))
def test_greedy_chat_equals_create_chat_completion(reference, case):
    """Every answer of a greedy multi-turn `chat` equals create_chat_completion's on the whole conversation so far:
    the template, the turn-by-turn feeding and the sampler chain agree with llama-cpp-python's."""
    extra, msgs, penalty = GREEDY_CASES[case]
    n = 48
    args = ["chat", "--temperature", "0", "--max-tokens", str(n), "--budget", "2048", "--repeat-penalty", str(penalty),
            *extra]
    r = run(*args, stdin="".join(m + "\n" for m in msgs))
    assert r.returncode == 0, r.stderr[-2000:]
    history = [{"role": "system", "content": extra[1]}] if extra else []
    want = []
    for m in msgs:
        history.append({"role": "user", "content": m})
        out = reference.create_chat_completion(messages=history, temperature=0, max_tokens=n, repeat_penalty=penalty)
        answer = out["choices"][0]["message"]["content"].strip()
        want.append(answer)
        history.append({"role": "assistant", "content": answer})
    assert r.stdout == "".join(a + "\n" for a in want)


def test_arvid_stops_instead_of_looping():
    """The instruct model with its own template answers the greeting and stops well before the limit."""
    r = run("chat", "--temperature", "0", "--max-tokens", "200",
            stdin="Hello! My name is Arvid and my dog is called Pickle.\n")
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r"\[turn 1: (\d+) prompt \+ (\d+) generated tokens", r.stderr)
    assert m and int(m.group(2)) < 200, r.stderr[-1000:]
    assert r.stdout.count("I'm so glad you're here") <= 1


def test_sampling_seed_reproducible_and_varied():
    """Default sampling (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05): the same --seed gives the same
    answer, other seeds other answers."""
    msg = "Tell me a short story about a fox.\n"
    outs = [run("chat", "--max-tokens", "24", "--seed", str(seed), stdin=msg) for seed in (1, 1, 2, 3)]
    for r in outs:
        assert r.returncode == 0, r.stderr[-2000:]
    texts = [r.stdout for r in outs]
    assert texts[0] == texts[1] and texts[0].strip()
    assert len(set(texts)) > 1


@pytest.mark.parametrize("model", ["gemma3-270m", "smollm2-135m"])
def test_summarize_on_both_models(model, tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# GNU GPL\n\n" + GPL3.read_text()[:3200])  # ~700 tokens
    r = run("summarize", str(doc), "--model", model, "--budget", "512", "--max-tokens", "24", "--temperature", "0",
            "-v")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip()
    m = re.search(r"read (\d+) tokens in .* through 512 cells: (\d+) evictions, \d+ cells evicted, (\d+) kept", r.stderr)
    assert m and int(m.group(1)) > 512 and int(m.group(2)) >= 1 and int(m.group(3)) <= 512, r.stderr[-2000:]
    assert ("looks like a base model" in r.stderr) == (model == "gemma3-270m")


def test_base_model_gets_a_plain_transcript():
    """Gemma 3 270M (base) in a chat: the cache holds a User:/Assistant: transcript, no turn markers it never saw,
    and an answer that ran into the next "User:" line is cut there and not fed twice."""
    from ea_local.apps.chat import Chat, ChatOptions
    from ea_local.model.info import read_model_info

    chat = Chat(read_model_info(model_path("gemma3-270m")), ChatOptions(budget=1024, temperature=0, max_tokens=48,
                                                                        system="A conversation between two friends."))
    try:
        assert chat.template.origin == "plain" and "base model" in chat.notice
        chat.start()
        answers = ["".join(chat.ask(q)) for q in ("Hi! How are you today?", "What did you do yesterday?")]
        rt = chat.s.rt
        text = b"".join(rt.token_bytes(chat.s.live[p]) for p in sorted(chat.s.live)).decode("utf-8", "replace")
        assert text.startswith("A conversation between two friends.\n\nUser: Hi! How are you today?\nAssistant:")
        assert "\nUser: What did you do yesterday?\nAssistant:" in text
        assert "<start_of_turn>" not in text and "\nUser:\nUser:" not in text and "\nUser: \nUser:" not in text
        for a in answers:
            assert "User:" not in a
    finally:
        chat.close()


def test_info_lists_the_embedded_models():
    r = run("info")
    assert r.returncode == 0, r.stderr
    listing = r.stdout.split("embedded models (--model NAME):")[1]
    for name, path, use in (("gemma3-270m", model_path("gemma3-270m"), "default of demo and bench"),
                            ("smollm2-135m", chat_model_path(), "default of chat and summarize")):
        assert name in listing and str(path) in listing
        assert use in next(ln for ln in listing.splitlines() if name in ln)
    r = run("info", "smollm2-135m")
    assert r.returncode == 0, r.stderr
    assert "llama" in r.stdout and "30" in r.stdout and "none (every layer attends" in r.stdout
    assert "chat template" in r.stdout and "embedded models" not in r.stdout


def _recording_chat(model: str = "smollm2-135m", **opts):
    """A Chat whose prefills are recorded (token lists, in order)."""
    from pathlib import Path

    from ea_local.apps.chat import Chat, ChatOptions
    from ea_local.model.info import read_model_info

    path = chat_model_path() if model == "smollm2-135m" else model_path(model)
    chat = Chat(read_model_info(path), ChatOptions(budget=256, temperature=0, max_tokens=2, **opts),
                document=Path(opts["file"]).read_text() if opts.get("file") else None)
    fed: list[list[int]] = []
    real = chat.s.prefill
    chat.s.prefill = lambda toks, **kw: (fed.append(list(toks)), real(toks, **kw))[1]
    return chat, fed


def _server_tokens(chat, messages: list[dict]) -> list[int]:
    """What `ea-local serve` reads for a chat request with these messages."""
    return chat.s.rt.prompt_tokens(chat.template.render(messages, add_generation_prompt=True))


@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_a_first_message_is_read_with_the_system_prompt_as_the_server_reads_the_request(model, tmp_path):
    """The system prompt waits for the first message, and the two are read as one prompt, token for
    token what the server reads for the same messages (on ChatML and on the base model's transcript,
    whose "User: " would end in a token of its own if tokenized apart): the same conversation meets
    the same chunks and compressions through `ea-local chat` and `ea-local serve`. Saving first feeds it."""
    system, msg = "Answer in one word.", "What colour is the sky?"
    chat, fed = _recording_chat(model, system=system)
    try:
        n = chat.start()
        assert n > 0 and fed == [] and chat.s.stats.tokens_seen == 0
        "".join(chat.ask(msg))
        assert len(fed) == 1 and fed[0] == _server_tokens(chat, [{"role": "system", "content": system},
                                                                 {"role": "user", "content": msg}])
        rt = chat.s.rt
        if rt.add_bos():  # Gemma 3: one BOS, not one from the transcript and one from the tokenizer
            assert fed[0][0] == rt.bos() and fed[0][1] != rt.bos()
        chat.reset()
        fed.clear()
        chat.save(str(tmp_path / "chat.eal"))
        assert len(fed) == 1 and len(fed[0]) == n and chat.s.stats.tokens_seen == n
    finally:
        chat.close()


def test_a_file_opens_the_first_user_message(tmp_path):
    """`chat --file` puts the document at the head of the first user message, as a user pasting it
    would (the instruct model finds a pass key there, not in the system prompt), read with that message
    as the server reads the same request; later messages do not repeat it; /reset and a session file
    saved before the first message keep it for the next one."""
    from ea_local.apps.chat import Chat, ChatOptions
    from ea_local.model.info import read_model_info

    f = tmp_path / "notes.txt"
    f.write_text("Some notes.\n\nThe pass key is 31415.\n")
    chat, fed = _recording_chat(file=str(f))
    text = lambda toks: b"".join(chat.s.rt.token_bytes(t, special=True) for t in toks).decode()  # noqa: E731
    try:
        chat.start()
        assert fed == []
        first = "Document (notes.txt):\n\nSome notes.\n\nThe pass key is 31415.\n\nWhat is the pass key?"
        "".join(chat.ask("What is the pass key?"))
        assert len(fed) == 1 and fed[0] == _server_tokens(chat, [{"role": "user", "content": first}])
        "".join(chat.ask("Thanks."))
        assert "31415" not in text(fed[1]) and "Thanks." in text(fed[1])
        chat.reset()
        fed.clear()
        "".join(chat.ask("And again?"))
        assert "Document (notes.txt):" in text(fed[0]) and text(fed[0]).index("31415") < text(fed[0]).index("again")
        chat.reset()
        chat.save(str(tmp_path / "chat.eal"))
    finally:
        chat.close()
    other = Chat(read_model_info(chat_model_path()), ChatOptions(budget=256, temperature=0, max_tokens=2))
    try:
        other.start()
        other.load(str(tmp_path / "chat.eal"))
        n0 = other.s.stats.tokens_seen
        "".join(other.ask("What is the pass key?"))
        cached = b"".join(other.s.rt.token_bytes(other.s.live[p], special=True) for p in sorted(other.s.live)).decode()
        assert "The pass key is 31415." in cached and cached.count("<|im_start|>system") == 1
        assert other.s.stats.tokens_seen > n0 and other.opening is None
    finally:
        other.close()
