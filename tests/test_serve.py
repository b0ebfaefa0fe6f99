"""`ea-local serve`: real server processes on loopback, driven with httpx and the official `openai` client.

Mechanics (reuse counters, budget, disconnects, queue, errors) run on a tiny random-weight llama,
which is fast and bit-exact; the OpenAI client tests run on the default Gemma 3 270M.
"""
from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import pytest

from .conftest import GEMMA
from .gguf_factory import write_tiny_gguf
from .serve_helpers import ServerProcess

KEY = "test-key-0123"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    # a long training context lets a request generate for seconds (the server caps max_tokens at it), so
    # the tests that hold a slot do not depend on how fast this machine decodes the tiny model (~16k tok/s)
    return str(write_tiny_gguf(tmp_path_factory.mktemp("serve") / "tiny.gguf", arch="llama", context_length=1_000_000))


@pytest.fixture(scope="module")
def srv(tiny):
    s = ServerProcess(tiny, "--budget", "256", "--parallel", "2", "--queue", "1", "--max-body", "262144",
                      "--max-tokens", "16", "--max-prompt-tokens", "8000")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def srv_key(tiny):
    s = ServerProcess(tiny, "--budget", "256", "--parallel", "1", "--queue", "0", api_key=KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def gemma():
    s = ServerProcess(GEMMA, "--budget", "512", "--no-reuse")
    yield s
    s.stop()


def chat(s: ServerProcess, messages, **kw) -> httpx.Response:
    return s.client.post("/v1/chat/completions", json={"messages": messages, **kw}, headers=s.headers)


def sse(lines) -> list:
    """data: payloads of an SSE stream, parsed (the final [DONE] kept as a string)."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            d = line[6:]
            out.append(d if d == "[DONE]" else json.loads(d))
    return out


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["message"] and err["type"] in ("invalid_request_error", "server_error")
    if code:
        assert err["code"] == code, err
    return err


def long_stream(s: ServerProcess, started: threading.Event, stop: threading.Event, out: dict, **body):
    """A streaming request that holds a slot until `stop` is set (then it disconnects)."""
    payload = {"prompt": "t1 t2 t3", "max_tokens": 500_000, "stream": True, "ignore_eos": True,
               **body}
    with httpx.Client(base_url=s.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=payload, headers=s.headers) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    out["chunks"] = out.get("chunks", 0) + 1
                    started.set()
                    if stop.is_set():
                        break
    started.set()


# ---- the basics ----

def test_models_and_health(srv):
    r = srv.client.get("/v1/models")
    assert r.status_code == 200
    data = r.json()["data"]
    assert [m["id"] for m in data] == ["tiny"] and data[0]["object"] == "model"
    assert srv.client.get("/v1/models/tiny").status_code == 200
    assert_error(srv.client.get("/v1/models/other"), 404, "model_not_found")
    h = srv.client.get("/health").json()
    assert h["status"] == "ok" and h["slots"] == 2


def test_openai_client_stream_equals_nonstream_and_usage(gemma):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=gemma.url + "/v1", api_key="unused", max_retries=0)
    msgs = [{"role": "user", "content": "Write a sentence about the sea."}]
    full = client.chat.completions.create(model="anything", messages=msgs, max_tokens=12, temperature=0)
    text = full.choices[0].message.content
    assert text and full.choices[0].finish_reason in ("stop", "length")
    u = full.usage
    assert u.prompt_tokens > 5 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    if full.choices[0].finish_reason == "length":
        assert u.completion_tokens == 12
    chunks = list(client.chat.completions.create(model="anything", messages=msgs, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == u.completion_tokens
    assert chunks[-1].usage.prompt_tokens == u.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])



def test_openai_client_reads_logprobs(gemma):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=gemma.url + "/v1", api_key="unused", max_retries=0)
    msgs = [{"role": "user", "content": "Write a sentence about the sea."}]
    full = client.chat.completions.create(model="anything", messages=msgs, max_tokens=8, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = full.choices[0].logprobs.content
    assert "".join(t.token for t in content) == full.choices[0].message.content
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token for t in content)
    chunks = list(client.chat.completions.create(model="anything", messages=msgs, max_tokens=8, temperature=0,
                                                 logprobs=True, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    legacy = client.completions.create(model="anything", prompt="The sea is", max_tokens=4, temperature=0, logprobs=2)
    assert "".join(legacy.choices[0].logprobs.tokens) == legacy.choices[0].text

def test_raw_stream_format_and_done(gemma):
    body = {"prompt": "The sea is", "max_tokens": 5, "stream": True}
    with gemma.client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    assert all(e["object"] == "text_completion" for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert "usage" not in events[0]  # only with stream_options.include_usage


def test_stop_strings(gemma):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=gemma.url + "/v1", api_key="unused", max_retries=0)
    base = client.completions.create(model="m", prompt="The capital of France is", max_tokens=16, temperature=0)
    text = base.choices[0].text
    words = text.split()
    assert len(words) >= 3, text
    stop = words[2]  # a word in the middle of the greedy continuation
    cut = client.completions.create(model="m", prompt="The capital of France is", max_tokens=16, temperature=0,
                                    stop=[stop, "zzzzqqq"])
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    # streamed: the stop string is held back, never sent
    with gemma.client.stream("POST", "/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 16,
                                                             "stop": stop, "stream": True}) as r:
        ev = sse(r.iter_lines())
    assert "".join(e["choices"][0]["text"] for e in ev[:-1]) == cut.choices[0].text
    assert ev[-2]["choices"][0]["finish_reason"] == "stop"


def test_unknown_fields_ignored_and_kv_extension(srv):
    r = chat(srv, [{"role": "user", "content": "t1 t2"}], max_tokens=3, logit_bias={"5": 1}, user="x",
             kv_compression={"policy": "streaming-llm", "budget": 200})
    assert r.status_code == 200, r.text
    kv = r.json()["kv_cache"]
    assert kv["policy"] == "streaming-llm" and kv["budget"] == 200
    r = chat(srv, [{"role": "user", "content": "t1 t2"}], max_tokens=3, kv_compression={"question_agnostic": True})
    assert r.status_code == 200, r.text


# ---- errors ----

@pytest.mark.parametrize("body,code", [
    (b"{not json", "invalid_json"),
    (b"\xff\xfe{}", "invalid_json"),
    (b"[1, 2]", "invalid_type"),
    (b"{}", "missing_required_parameter"),
    (json.dumps({"messages": "hi"}).encode(), "invalid_type"),
    (json.dumps({"messages": []}).encode(), None),
    (json.dumps({"messages": [{"content": "x"}]}).encode(), "missing_required_parameter"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), "invalid_value"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(), "invalid_value"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}).encode(), "invalid_type"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}).encode(), "invalid_value"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9}).encode(), "invalid_value"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 2}).encode(), "invalid_value"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": 5}).encode(), "invalid_value"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}).encode(), "invalid_type"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "frequency_penalty": 2.5}).encode(), "invalid_value"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "presence_penalty": -3}).encode(), "invalid_value"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "repeat_penalty": 0}).encode(), "invalid_value"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "top_k": -1}).encode(), "invalid_value"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "min_p": 1.5}).encode(), "invalid_value"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "repeat_last_n": "64"}).encode(), "invalid_type"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}).encode(),
     "invalid_value"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}],
                 "response_format": {"type": "json_schema"}}).encode(), "invalid_value"),  # no schema
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "response_format": {
        "type": "json_schema", "json_schema": {"schema": {"$ref": "http://example.com/s.json"}}}}).encode(),
     "invalid_value"),  # a schema the converter cannot turn into a grammar
    (json.dumps({"messages": [{"role": "user", "content": "x"}],
                 "kv_compression": {"policy": "nope"}}).encode(), "unknown_policy"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}],
                 "kv_compression": {"budget": 100000}}).encode(), "invalid_value"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}],
                 "kv_compression": {"budget": 90}}).encode(), "invalid_value"),  # under the floor, 91 cells
    (json.dumps({"messages": [{"role": "user", "content": "x"}],
                 "kv_compression": {"polcy": "knorm"}}).encode(), None),
    (json.dumps({"messages": [{"role": "user", "content": "x"}],
                 "kv_compression": {"policy": "none"}}).encode(), "unsupported_policy"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}],
                 "kv_compression": {"question_agnostic": "yes"}}).encode(), "invalid_type"),
])
def test_bad_chat_requests_are_400(srv, body, code):
    r = srv.client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert_error(r, 400, code)


def test_bad_completion_requests_are_400(srv):
    c = srv.client
    assert_error(c.post("/v1/completions", json={"prompt": ["a", "b"]}), 400, "invalid_value")
    assert_error(c.post("/v1/completions", json={"prompt": [1, 999999]}), 400, "invalid_value")
    assert_error(c.post("/v1/completions", json={"prompt": 5}), 400)
    assert_error(c.post("/v1/completions", json={"prompt": "t1 " * 9000}), 400, "context_length_exceeded")
    assert_error(c.post("/v1/completions", json={"prompt": "x", "model": "/etc/passwd", "n": 3}), 400)


def test_policy_none_refuses_past_budget(tiny):
    """--policy none keeps the full cache: a prompt past the budget is a 400, and the slot works after it."""
    s = ServerProcess(tiny, "--budget", "256", "--policy", "none")
    try:
        assert s.client.post("/v1/completions", json={"prompt": [1] + [300] * 100, "max_tokens": 4}).status_code == 200
        assert_error(s.client.post("/v1/completions", json={"prompt": [1] + [301] * 300, "max_tokens": 4}), 400,
                     "context_length_exceeded")
        assert s.client.post("/v1/completions", json={"prompt": [1] + [302] * 50, "max_tokens": 4}).status_code == 200
    finally:
        s.stop()


def test_unknown_route_and_method(srv):
    assert_error(srv.client.get("/v1/nothing"), 404, "not_found")
    assert_error(srv.client.post("/v2/chat/completions", json={}), 404, "not_found")
    assert_error(srv.client.get("/v1/chat/completions"), 405, "method_not_allowed")


def test_body_limit_413(srv):
    big = json.dumps({"prompt": "x" * 270000}).encode()
    assert_error(srv.client.post("/v1/completions", content=big), 413, "request_too_large")

    def chunks():  # no Content-Length: chunked transfer encoding
        for _ in range(270):
            yield b"x" * 1024

    assert_error(srv.client.post("/v1/completions", content=chunks()), 413, "request_too_large")
    assert srv.client.post("/v1/completions", json={"prompt": "t1", "max_tokens": 2}).status_code == 200


def test_api_key(srv_key):
    c = srv_key.client
    assert_error(c.get("/v1/models"), 401, "invalid_api_key")
    assert_error(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
    assert_error(c.get("/v1/models", headers={"Authorization": f"Basic {KEY}"}), 401, "invalid_api_key")
    assert_error(c.post("/v1/completions", json={"prompt": "t1"}), 401)
    assert_error(c.get("/metrics"), 401)
    assert c.get("/health").status_code == 200  # liveness needs no key
    assert c.get("/v1/models", headers=srv_key.headers).status_code == 200
    openai = pytest.importorskip("openai")
    good = openai.OpenAI(base_url=srv_key.url + "/v1", api_key=KEY, max_retries=0)
    assert good.completions.create(model="tiny", prompt="t1", max_tokens=2).usage.completion_tokens <= 2
    bad = openai.OpenAI(base_url=srv_key.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt="t1", max_tokens=2)


# ---- conversation reuse and the budget ----

def test_followup_prefills_only_new_tokens(srv):
    srv.wait_idle()
    before = srv.metrics()
    p1 = [1] + list(range(300, 360))
    r1 = srv.client.post("/v1/completions", json={"prompt": p1, "max_tokens": 8}).json()
    p2 = p1 + list(range(360, 380))
    r2 = srv.client.post("/v1/completions", json={"prompt": p2, "max_tokens": 8}).json()
    # the slot's cache holds p1 (and 8 generated tokens p2 does not continue): p1 is reused, 20 tokens prefilled
    assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] == len(p1)
    assert r2["kv_cache"]["prefilled_tokens"] == 20
    assert r2["kv_cache"]["slot"] == r1["kv_cache"]["slot"]
    after = srv.metrics()
    assert after["ea_local_prompt_tokens_prefilled_total"] - before["ea_local_prompt_tokens_prefilled_total"] \
        == (len(p1) - r1["usage"]["prompt_tokens_details"]["cached_tokens"]) + 20
    assert after["ea_local_prompt_tokens_reused_total"] - before["ea_local_prompt_tokens_reused_total"] \
        >= len(p1)


def test_long_chat_stays_in_budget_and_reuses(srv):
    """A conversation far longer than the 256-cell budget: every turn's cells <= budget, evictions
    happen, and the server prefills far fewer tokens than the conversation resends."""
    srv.wait_idle()
    rng = np.random.default_rng(1)
    msgs: list[dict] = []
    sent = prefilled = 0
    evicted = 0
    for turn in range(20):
        msgs.append({"role": "user", "content": " ".join(f"t{i}" for i in rng.integers(0, 100, 30))})
        r = chat(srv, msgs, max_tokens=12)
        assert r.status_code == 200, r.text
        body = r.json()
        kv = body["kv_cache"]
        assert kv["cells"] <= 256
        sent += body["usage"]["prompt_tokens"]
        prefilled += kv["prefilled_tokens"]
        evicted += kv["evicted_cells"]
        msgs.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
        m = srv.metrics()
        assert m[f'ea_local_slot_cells{{slot="{kv["slot"]}"}}'] <= 256
    assert evicted > 0
    assert body["usage"]["prompt_tokens"] > 3 * 256  # the last request alone is far past the budget
    assert prefilled < sent / 4, (prefilled, sent)


def test_gemma_50_turns_on_512_cells():
    """A long conversation on the default model: 50 turns, a 512-cell budget, reuse on."""
    s = ServerProcess(GEMMA, "--budget", "512")
    try:
        msgs: list[dict] = []
        prefilled = 0
        for turn in range(50):
            msgs.append({"role": "user", "content": f"Turn {turn}: tell me one fact about the number {turn}."})
            r = chat(s, msgs, max_tokens=6)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["kv_cache"]["cells"] <= 512
            prefilled += body["kv_cache"]["prefilled_tokens"]
            msgs.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
        conversation = body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
        assert conversation > 512
        assert prefilled < conversation, (prefilled, conversation)
        m = s.metrics()
        assert m["ea_local_evicted_cells_total"] > 0
        assert m['ea_local_slot_cells{slot="0"}'] <= 512
    finally:
        s.stop()



def test_logprobs_streamed_as_returned(srv):
    """One reported token per generated one, the same tokens and values streamed as returned whole (this
    model's tokens are mostly lone bytes, written as OpenAI writes them: "bytes:\\xNN")."""
    body = {"prompt": "t1 t2 t3", "max_tokens": 16, "temperature": 0, "ignore_eos": True, "logprobs": 2}
    full = srv.client.post("/v1/completions", json=body).json()["choices"][0]
    tokens = full["logprobs"]["tokens"]
    assert len(tokens) == 16 and len(full["logprobs"]["token_logprobs"]) == 16
    assert all(len(top) == 2 and max(top.values()) >= lp for top, lp in zip(full["logprobs"]["top_logprobs"],
                                                                            full["logprobs"]["token_logprobs"]))
    with srv.client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        chunks = [e for e in sse(r.iter_lines()) if e != "[DONE]"]
    streamed = [lp for c in chunks if c["choices"][0]["logprobs"] for lp in
                zip(c["choices"][0]["logprobs"]["tokens"], c["choices"][0]["logprobs"]["token_logprobs"])]
    assert streamed == list(zip(tokens, full["logprobs"]["token_logprobs"]))
    chat = srv.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "t1"}],
                                                           "max_tokens": 4, "temperature": 0}).json()["choices"][0]
    assert chat["logprobs"] is None  # not asked for
    assert_error(srv.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "t1"}],
                                                               "top_logprobs": 2}), 400, "invalid_value")
    assert_error(srv.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "t1"}],
                                                               "logprobs": True, "top_logprobs": 21}), 400, "invalid_value")
    assert_error(srv.client.post("/v1/completions", json={"prompt": "t1", "logprobs": True}), 400, "invalid_type")

# ---- disconnects, queue, 503 ----

def test_disconnect_mid_stream_frees_slot(srv):
    srv.wait_idle()
    before = srv.metrics()
    started, stop, out = threading.Event(), threading.Event(), {}
    stop.set()  # disconnect right after the first chunk
    t = threading.Thread(target=long_stream, args=(srv, started, stop, out))
    t.start()
    t.join(60)
    assert out["status"] == 200
    srv.wait_idle(timeout=10)
    after = srv.metrics()
    assert after["ea_local_cancelled_total"] == before["ea_local_cancelled_total"] + 1
    assert after["ea_local_completion_tokens_total"] - before["ea_local_completion_tokens_total"] < 4000
    assert "Traceback" not in srv.output()  # a client leaving is not an error


def test_disconnect_during_a_streamed_prefill_is_quiet(srv):
    """A client that leaves while its long prompt is still being read: the slot is freed and the
    server's log shows no traceback (the worker's cancellation is an outcome, not an error)."""
    srv.wait_idle()
    before = srv.metrics()
    prompt = " ".join(f"t{i % 9 + 1}" for i in range(2500))  # ~7.5k tokens
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 500_000, "ignore_eos": True,
                                                         "stream": True}) as r:  # cancelled even on a fast machine
            assert r.status_code == 200, r.read()  # the headers come before the prompt is read; leave now
    srv.wait_idle(timeout=30)
    assert srv.metrics()["ea_local_cancelled_total"] == before["ea_local_cancelled_total"] + 1
    for _ in range(20):  # later requests, so that the collector meets the abandoned request's objects
        assert srv.client.post("/v1/completions", json={"prompt": prompt[:200], "max_tokens": 4}).status_code == 200
    assert "Traceback" not in srv.output() and "never retrieved" not in srv.output()


def test_disconnect_while_waiting_nonstream_frees_slot(srv):
    srv.wait_idle()
    before = srv.metrics()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.url + "/v1/completions", json={"prompt": "t1 t2", "max_tokens": 500_000, "ignore_eos": True},
                   timeout=0.5)
    srv.wait_idle(timeout=10)
    assert srv.metrics()["ea_local_cancelled_total"] == before["ea_local_cancelled_total"] + 1
    assert "Traceback" not in srv.output()


def test_busy_server_answers_503(srv_key):
    started, stop, out = threading.Event(), threading.Event(), {}
    t = threading.Thread(target=long_stream, args=(srv_key, started, stop, out))
    t.start()
    try:
        assert started.wait(30)
        r = srv_key.client.post("/v1/completions", json={"prompt": "t1", "max_tokens": 2}, headers=srv_key.headers)
        assert_error(r, 503, "server_busy")
        assert int(r.headers["retry-after"]) >= 1
    finally:
        stop.set()
        t.join(60)
    srv_key.wait_idle(timeout=10)
    r = srv_key.client.post("/v1/completions", json={"prompt": "t1", "max_tokens": 2}, headers=srv_key.headers)
    assert r.status_code == 200


def test_queue_bound(srv):
    """2 slots busy, 1 request queued, the next one is refused; the queued one runs when a slot frees."""
    srv.wait_idle()
    holders = []
    for _ in range(2):
        started, stop, out = threading.Event(), threading.Event(), {}
        t = threading.Thread(target=long_stream, args=(srv, started, stop, out))
        t.start()
        assert started.wait(30)
        holders.append((t, stop))
    # a queued client that gives up leaves the queue
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.url + "/v1/completions", json={"prompt": "t1", "max_tokens": 2}, timeout=1.0)
    deadline = time.monotonic() + 10
    while srv.client.get("/health").json()["queue"] != 0:
        assert time.monotonic() < deadline, "the abandoned request stayed in the queue"
        time.sleep(0.05)
    queued: dict = {}

    def waiter():
        queued["r"] = httpx.post(srv.url + "/v1/completions", json={"prompt": "t1", "max_tokens": 2}, timeout=60)

    w = threading.Thread(target=waiter)
    w.start()
    deadline = time.monotonic() + 10
    while srv.client.get("/health").json()["queue"] != 1:
        assert time.monotonic() < deadline, "the request did not queue"
        time.sleep(0.05)
    assert srv.metrics()["ea_local_queue_length"] == 1
    assert_error(srv.client.post("/v1/completions", json={"prompt": "t1", "max_tokens": 2}), 503, "server_busy")
    for t, stop in holders:
        stop.set()
    w.join(60)
    assert queued["r"].status_code == 200
    for t, _ in holders:
        t.join(60)
    srv.wait_idle()


# ---- shutdown ----

@pytest.mark.parametrize("reading", [False, True], ids=["decoding", "reading the prompt"])
def test_sigterm_ends_streams_and_exits_0(tiny, reading):
    """Shut down mid-stream, while it decodes or before its first token: the stream still ends with a
    finish_reason and [DONE], and the process exits 0 without a traceback."""
    s = ServerProcess(tiny, "--budget", "256", "--max-prompt-tokens", "8000")
    body = ({"prompt": " ".join(f"t{i % 9 + 1}" for i in range(2500)), "max_tokens": 8} if reading  # ~7.5k tokens
            else {"prompt": "t1", "max_tokens": 500_000, "ignore_eos": True})
    try:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                if not reading:
                    first = next(line for line in lines if line.startswith("data: "))
                    assert json.loads(first[6:])["object"] == "text_completion"
                s.proc.send_signal(15)
                events = sse(lines)
        assert events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert s.proc.wait(30) == 0
        assert "Traceback" not in s.output()
    finally:
        s.stop()


# ---- the CLI ----

@pytest.mark.parametrize("args,msg", [
    (["--parallel", "0"], "--parallel must be at least 1"),
    (["--queue", "-1"], "--queue must be at least 0"),
    (["--policy", "nope"], "nope"),
    (["--budget", "10"], "budget 10"),
    (["--cache-type", "f8"], "unknown cache type"),
])
def test_serve_cli_errors(tiny, args, msg):
    from typer.testing import CliRunner

    from ea_local.cli import app

    r = CliRunner().invoke(app, ["serve", "--model", tiny, *args])
    assert r.exit_code == 2
    assert msg in r.output and "Traceback" not in r.output


# ---- the slot's cache bookkeeping ----

@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_cut_then_feed_equals_fresh_feed(tmp_path, arch):
    from ea_local.engine.session import Session, SessionConfig

    extra = {"sliding_window": 64} if arch == "gemma3" else {}
    p = str(write_tiny_gguf(tmp_path / "m.gguf", arch=arch, context_length=1024, **extra))
    rng = np.random.default_rng(0)
    a = [1] + rng.integers(300, 380, 300).tolist()
    b = rng.integers(300, 380, 50).tolist()
    c = rng.integers(300, 380, 40).tolist()
    cfg = SessionConfig(budget=512, chunk=128, n_threads=1)
    s = Session(p, cfg)
    s.prefill(a + b)
    assert s.keep_prefix(len(a))
    s.prefill(c)
    ref = Session(p, cfg)
    ref.prefill(a + c)
    assert s.live == ref.live and s.transcript.tokens == ref.transcript.tokens and s.transcript.positions == ref.transcript.positions
    np.testing.assert_array_equal(s.rt.logits(), ref.rt.logits())
    # through evictions and compactions, the history still says where every live cell's token sits
    t = Session(p, SessionConfig(budget=256, chunk=128, n_threads=1))
    for _ in range(12):
        t.prefill(rng.integers(300, 380, 150).tolist())
    assert t.stats.compactions >= 1 and t.stats.evictions
    last = {pos: i for i, pos in enumerate(t.transcript.positions)}
    assert all(t.transcript.tokens[last[pos]] == tok for pos, tok in t.live.items())
    assert t.keep_prefix(len(t.transcript.tokens) - 30) and max(t.live) < t.next_pos
    if arch == "gemma3":  # 200 tokens back the 64-token sliding window was pruned: refuse, start over
        assert not t.keep_prefix(len(t.transcript.tokens) - 200)
    for x in (s, ref, t):
        x.close()


# ---- hardening: fuzz and concurrent load, short versions of scripts/bench/fuzz_server.py ----

def test_fuzz_then_concurrent_load_no_leaks(tiny, monkeypatch):
    import importlib.util

    from .serve_helpers import ROOT

    monkeypatch.syspath_prepend(str(ROOT / "scripts" / "bench"))  # its sibling serve_process.py, as when run
    spec = importlib.util.spec_from_file_location("fuzz_server", ROOT / "scripts" / "bench" / "fuzz_server.py")
    fz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fz)
    s = ServerProcess(tiny, "--budget", "256", "--parallel", "2", "--queue", "8", "--max-body", "65536",
                      api_key=fz.KEY)
    try:
        assert fz.fuzz(s, 300, 65536, seed=3)  # every malformed request got its 4xx; a valid one still works
        with httpx.Client(base_url=s.url, timeout=60) as c:  # warm-up before the RSS baseline
            for i in range(10):
                assert fz.valid_request(c, i, __import__("random").Random(i))
        s.wait_idle()
        rss0 = s.rss_kib()
        t0 = time.monotonic()
        assert fz.load(s, clients=8, per_client=20)  # 160 streams, all end with [DONE]
        assert time.monotonic() - t0 < 300
        m = s.metrics()
        assert m['ea_local_slot_busy{slot="0"}'] == 0 and m['ea_local_slot_busy{slot="1"}'] == 0
        assert m["ea_local_queue_length"] == 0
        assert all(m[f'ea_local_slot_cells{{slot="{i}"}}'] <= 256 for i in range(2))
        assert s.rss_kib() - rss0 < 20 * 1024, (rss0, s.rss_kib())  # KiB: no per-request growth
        assert "Traceback" not in s.output()
    finally:
        s.stop()


def test_budget_below_the_sliding_window(tmp_path):
    """iSWA with a budget smaller than the sliding window (gemma3's 512): the sliding cache must still
    hold window + chunk cells, or llama.cpp runs out of room at the window (slots and chat alike)."""
    from ea_local.engine.session import Session, SessionConfig

    p = str(write_tiny_gguf(tmp_path / "g.gguf", arch="gemma3", context_length=4096))  # window 512
    s = Session(p, SessionConfig(budget=256, chunk=128, n_threads=1))
    s.prefill([1] + np.random.default_rng(0).integers(300, 380, 1200).tolist())
    assert s.n_cells <= 256 and s.stats.evictions
    s.close()
