"""`ea-local serve` on both embedded models (SmolLM2-135M-Instruct: every layer evicted; Gemma 3
270M: iSWA), over HTTP: chat and completions, a follow-up that reuses a compressed slot, the
kv_compression options, streaming, and the chat prompt equal to the one `ea-local chat` renders."""
from __future__ import annotations

import json

import pytest

from .conftest import GPL3
from .serve_helpers import ServerProcess

MODELS = ["smollm2-135m", "gemma3-270m"]
TEXT = GPL3.read_text()


@pytest.fixture(scope="module", params=MODELS)
def server(request):
    s = ServerProcess(request.param, "--budget", "256", "--parallel", "1", "--max-tokens", "8")
    s.client.timeout = 600  # prefill on a shared, loaded CPU
    s.name = request.param
    yield s
    s.stop()


@pytest.fixture(scope="module")
def reference(server):
    """llama-cpp-python's high-level Llama on the server's model file, as a user of that library runs it."""
    from llama_cpp import Llama

    from ea_local.model.embedded import resolve_model

    llm = Llama(model_path=str(resolve_model(server.name)), n_ctx=512, n_threads=1, logits_all=True, verbose=False)
    yield llm
    llm.close()


def post(s: ServerProcess, route: str, body: dict) -> dict:
    r = s.client.post(route, json={"temperature": 0, "max_tokens": 8, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_follow_up_sharing_the_start_of_a_compressed_prompt(server):
    """A ~900-token prompt is compressed into 256 cells; a second prompt shares its first ~300
    tokens, whose last cells were evicted. Reuse keeps only what is cached up to its end."""
    first = post(server, "/v1/completions", {"prompt": TEXT[:3600]})
    assert first["kv_cache"]["evicted_cells"] > 0
    second = post(server, "/v1/completions", {"prompt": TEXT[:1600] + "\n\nWho publishes this license?"})
    shared = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    if server.name == "smollm2-135m":  # all layers global: part of the prefix is reused
        assert 0 < shared < 420
    third = post(server, "/v1/completions", {"prompt": TEXT[:1600] + "\n\nWho publishes this license?"})
    assert third["usage"]["prompt_tokens_details"]["cached_tokens"] == third["usage"]["prompt_tokens"] - 1


def test_a_long_prompt_is_steered_by_its_question(server):
    steered = post(server, "/v1/completions", {"prompt": TEXT[:3600] + "\n\nWhat is this license called?"})
    assert 0 < steered["kv_cache"]["question_tokens"] <= 120
    assert 0 <= steered["kv_cache"]["recalled_cells"] <= 256 // 4  # recall's cap per message
    agnostic = post(server, "/v1/completions", {"prompt": TEXT[4000:7600] + "\n\nWhat is this license called?",
                                                "kv_compression": {"question_agnostic": True}})
    assert agnostic["kv_cache"]["question_tokens"] == 0 and agnostic["kv_cache"]["evicted_cells"] > 0
    assert agnostic["kv_cache"]["recalled_cells"] == 0
    msgs = [{"role": "user", "content": TEXT[8000:11600] + "\n\nWhat does this paragraph say about patents?"}]
    chat = post(server, "/v1/chat/completions", {"messages": msgs})
    assert 0 < chat["kv_cache"]["question_tokens"] <= 120


def test_kv_compression_options(server):
    msgs = [{"role": "user", "content": TEXT[12000:14400] + "\n\nSummarize in one line."}]
    for kv in ({"question_agnostic": True}, {"policy": "streaming-llm"}, {"budget": 200},
               {"policy": "snapkv", "budget": 220, "question_agnostic": True},
               {"budget": 100}, {}):  # a budget under 4 steps frees a quarter of itself, so 100 cells are enough
        out = post(server, "/v1/chat/completions", {"messages": msgs, "kv_compression": kv})
        assert out["kv_cache"]["cells"] <= kv.get("budget", 256)
        assert out["kv_cache"]["policy"] == kv.get("policy", "expected-attention")


def test_chat_follow_up_reuses_the_slot_and_streams(server):
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Name a colour."}]
    one = post(server, "/v1/chat/completions", {"messages": msgs})
    answer = one["choices"][0]["message"]["content"]
    msgs += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And another one?"}]
    two = post(server, "/v1/chat/completions", {"messages": msgs})
    assert two["usage"]["prompt_tokens_details"]["cached_tokens"] >= one["usage"]["prompt_tokens"] - 1
    events = []
    with server.client.stream("POST", "/v1/chat/completions",
                              json={"messages": msgs, "temperature": 0, "max_tokens": 8, "stream": True,
                                    "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    # compared with a request read from the same cache (all but the last prompt token cached):
    # `two` fed its prompt's tail as one batch, which can round a near-tie the other way
    three = post(server, "/v1/chat/completions", {"messages": msgs})
    assert text == three["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"]["completion_tokens"] == three["usage"]["completion_tokens"]


def test_chat_prompt_equals_the_one_chat_renders(server):
    """The server renders a conversation exactly as `ea-local chat` feeds it (chat_template's
    TurnRenderer, as the chat REPL uses it): after the server answered the chat request, the same
    text sent as a completion finds every token but the last in the slot's cache."""
    from ea_local.model.chat_template import TurnRenderer, resolve_template
    from ea_local.engine.runtime import ContextConfig, Runtime
    from ea_local.model.info import read_model_info
    from ea_local.model.embedded import resolve_model

    info = read_model_info(resolve_model(server.name))
    rt = Runtime(str(info.path), ContextConfig(n_ctx=64, n_threads=1))
    try:
        template, _ = resolve_template(info, rt)
        turns = TurnRenderer(template, "Answer in French.")
        text = turns.prefix()
        glue, tail = turns.split()
        text += glue + "How are you?" + tail
        turns.add("user", "How are you?")
        turns.add("assistant", "Très bien.")
        glue, tail = turns.split()
        # the reply as generated: after the plain transcript's "Assistant:" a base model's first
        # token carries its own space, which the message content returned to the client does not
        said = " Très bien." if template.origin == "plain" else "Très bien."
        text += said + glue + "And the weather?" + tail
        n_tokens = len(rt.prompt_tokens(text))
    finally:
        rt.close()
    msgs = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "How are you?"},
            {"role": "assistant", "content": "Très bien."}, {"role": "user", "content": "And the weather?"}]
    chat = post(server, "/v1/chat/completions", {"messages": msgs, "max_tokens": 1})
    assert chat["usage"]["prompt_tokens"] == n_tokens
    again = post(server, "/v1/completions", {"prompt": text, "max_tokens": 1})
    assert again["usage"]["prompt_tokens"] == n_tokens
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == n_tokens - 1


def test_a_message_over_the_budget_is_read_as_ea_local_chat_reads_it(server):
    """A document with a question under it, more than the budget but less than budget + chunk: the
    server and `ea-local chat` (same budget, same messages) probe the same question at the same
    compressions and give the same greedy answer."""
    from ea_local.apps.chat import Chat, ChatOptions
    from ea_local.model.embedded import resolve_model
    from ea_local.model.info import read_model_info

    content = TEXT[8000:9300] + "\n\nWhat does this paragraph say about patents?"
    served = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": content}]})
    chat = Chat(read_model_info(resolve_model(server.name)),
                ChatOptions(budget=256, temperature=0.0, max_tokens=8, seed=0, threads=1))
    try:
        chat.start()
        probes: list[int] = []
        real = chat.s._probe_question
        chat.s._probe_question = lambda: (probes.append(len(chat.s.question)), real())[1]
        answer = "".join(chat.ask(content))
        assert 256 < served["usage"]["prompt_tokens"] <= 256 + 128  # one compression, after the message is read
        assert probes and set(probes) == {served["kv_cache"]["question_tokens"]}
        assert answer.strip() == served["choices"][0]["message"]["content"].strip()
    finally:
        chat.close()


def test_sampling_fields_reach_llama_cpps_sampler(server, reference):
    """frequency_penalty and presence_penalty (OpenAI's) and llama.cpp server's repeat_penalty /
    repeat_last_n: a greedy completion with them equals llama-cpp-python's `create_completion` with the
    same values on the same tokens (penalties over the generated tokens, as both define them), and
    differs from the one without them, so a field the server dropped would fail here."""
    prompt = reference.tokenize(b"List the colours of the rainbow, one per line:\n")
    n = 40
    plain = reference.create_completion(prompt, max_tokens=n, temperature=0)["choices"][0]["text"]
    for fields in ({"frequency_penalty": 1.5, "presence_penalty": 0.5},
                   {"repeat_penalty": 1.3, "repeat_last_n": 16}):
        kw = {k: v for k, v in fields.items() if k != "repeat_last_n"}
        reference.last_n_tokens_size = fields.get("repeat_last_n", 64)  # llama-cpp-python's penalty window
        try:
            want = reference.create_completion(prompt, max_tokens=n, temperature=0, **kw)["choices"][0]["text"]
        finally:
            reference.last_n_tokens_size = 64
        got = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": n, **fields})
        assert got["kv_cache"]["evicted_cells"] == 0
        assert got["choices"][0]["text"] == want
        assert want != plain, fields


def test_logprobs_equal_llama_cpp_pythons(server, reference):
    """`logprobs` of a greedy completion: the same tokens, log-probabilities (to float32 rounding) and
    alternatives as llama-cpp-python's `create_completion(logprobs=3)`; the chat endpoint's `content`
    list spells its answer, token by token, each the likeliest of its alternatives."""
    prompt = reference.tokenize(b"The capital of France is")
    want = reference.create_completion(prompt, max_tokens=12, temperature=0, logprobs=3)["choices"][0]
    got = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "logprobs": 3})["choices"][0]
    assert got["text"] == want["text"] and got["logprobs"]["tokens"] == want["logprobs"]["tokens"]
    assert got["logprobs"]["token_logprobs"] == pytest.approx(want["logprobs"]["token_logprobs"], abs=2e-3)
    for g, w in zip(got["logprobs"]["top_logprobs"], want["logprobs"]["top_logprobs"]):
        assert set(g) == set(w) and [g[k] for k in w] == pytest.approx(list(w.values()), abs=2e-3)
    # offsets into the completion's text (llama-cpp-python counts from a prompt it rebuilds)
    assert [got["text"][o:o + len(t)] for o, t in zip(got["logprobs"]["text_offset"], got["logprobs"]["tokens"])] \
        == got["logprobs"]["tokens"]

    chat = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Name a colour."}],
                                                 "max_tokens": 12, "logprobs": True, "top_logprobs": 2})["choices"][0]
    content = chat["logprobs"]["content"]
    assert "".join(t["token"] for t in content) == chat["message"]["content"]
    for t in content:
        assert len(t["top_logprobs"]) == 2 and t["top_logprobs"][0]["token"] == t["token"]
        assert t["logprob"] == t["top_logprobs"][0]["logprob"] <= 0 and bytes(t["bytes"]).decode() == t["token"]


def test_logprobs_stop_before_a_stop_string(server):
    """With a stop string, the reported tokens spell the text before it; the stop string's are left out."""
    body = {"prompt": "The capital of France is", "max_tokens": 16, "logprobs": 1}
    full = post(server, "/v1/completions", body)["choices"][0]
    tokens = full["logprobs"]["tokens"]
    assert "".join(tokens) == full["text"] and len(tokens) >= 6
    stop = tokens[5].strip() or tokens[5]
    cut = post(server, "/v1/completions", {**body, "stop": [stop]})["choices"][0]
    assert cut["text"] == full["text"][:full["text"].index(stop)]
    kept = cut["logprobs"]["tokens"]
    assert kept == tokens[:len(kept)] and cut["text"].startswith("".join(kept))
    assert len(cut["text"]) - len("".join(kept)) < max(len(t) for t in tokens)  # at most the token the stop cut


def test_response_format_json(server):
    """`response_format` constrains the answer with llama.cpp's grammar sampler: any JSON object, or one
    that follows the request's JSON Schema (the base model too)."""
    msgs = [{"role": "user", "content": "Describe a cat: its name and its age."}]
    out = post(server, "/v1/chat/completions", {"messages": msgs, "max_tokens": 96,
                                                "response_format": {"type": "json_object"}})["choices"][0]
    assert out["message"]["content"].startswith("{")
    if server.name == "smollm2-135m":  # the instruct model closes its object; the base model can repeat itself
        # inside a string until max_tokens (the grammar allows any string)
        assert out["finish_reason"] == "stop" and isinstance(json.loads(out["message"]["content"]), dict)
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    out = post(server, "/v1/chat/completions", {"messages": msgs, "max_tokens": 96, "response_format": {
        "type": "json_schema", "json_schema": {"name": "cat", "schema": schema}}})["choices"][0]
    cat = json.loads(out["message"]["content"])
    assert out["finish_reason"] == "stop" and isinstance(cat["name"], str) and isinstance(cat["age"], int)
