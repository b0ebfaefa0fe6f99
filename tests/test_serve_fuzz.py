"""Random requests, well-formed or not, against a real server on a tiny random-weight llama: every
answer is a 200 or a 4xx with an OpenAI error body, streams may be dropped mid-way, and afterwards
the server is healthy, idle and has logged no traceback."""
from __future__ import annotations

import json
import random

import pytest

from .gguf_factory import write_tiny_gguf
from .serve_helpers import ServerProcess

ODD = [None, 0, 1, -1, 2**31, 2**63, -2**63, 1e308, -1e308, 0.5, 1e-30, 3, 128, "x", "", "NaN", "<s>", "\n" * 50,
       "a" * 3000, [], {}, [1], {"a": 1}, True, False]
GOOD = {"temperature": [0, 0.7, 2], "top_p": [0.5, 1], "top_k": [0, 1, 40], "min_p": [0, 0.1], "stop": ["\n", [" t", "!"]],
        "seed": [1, 2**40], "stream": [True, False], "stream_options": [{"include_usage": True}],
        "frequency_penalty": [-2, 0, 2], "presence_penalty": [1.5], "repeat_penalty": [1.1, 0.5],
        "repeat_last_n": [0, 8], "ignore_eos": [True], "logprobs": [True], "model": ["x"], "n": [1],
        "max_tokens": [1, 16], "max_completion_tokens": [4], "user": ["u"], "tools": [[]],
        "response_format": [{"type": "text"}, {"type": "json_object"}]}
KV = [{}, {"policy": "tova"}, {"policy": "snapkv", "question_agnostic": True}, {"policy": "none"}, {"policy": "x"},
      {"policy": 3}, {"budget": 91}, {"budget": 90}, {"budget": 257}, {"budget": "1"}, {"budget": 1.5},
      {"question_agnostic": "yes"}, {"policy": "streaming-llm", "budget": 128, "question_agnostic": True}, {"bogus": 1}]
TEXTS = ["hi", "t1 t2 t3", "t5 " * 40, " ".join(f"t{i % 9 + 1}" for i in range(700)), "<|im_start|>user\nx<|im_end|>"]
RAW = [b"{", b"[]", b"null", b"\xff\xfe", b'{"messages": NaN}', b'{"prompt": "t1", "max_tokens": 1e999}']


def _messages(rnd: random.Random):
    if rnd.random() < 0.05:
        return rnd.choice(ODD)
    if rnd.random() < 0.5:
        return [{"role": "user", "content": rnd.choice(TEXTS)}]
    out = []
    for _ in range(rnd.randint(0, 4)):
        m = {"role": rnd.choice(["user", "assistant", "system", "developer", "tool", "", None, 5]),
             "content": rnd.choice(TEXTS + [None, [], [{"type": "text", "text": "t1"}], [{"type": "image_url"}],
                                            [{"type": "text"}], 5, {"a": 1}])}
        if rnd.random() < 0.1:
            m.pop(rnd.choice(["role", "content"]))
        out.append(m)
    return out


def _body(rnd: random.Random, chat: bool) -> dict:
    body: dict = {"max_tokens": rnd.choice([1, 4, 8])}
    if rnd.random() < 0.95:
        if chat:
            body["messages"] = _messages(rnd)
        else:
            body["prompt"] = rnd.choice(TEXTS + ["", ["t1"], ["a", "b"], [1, 2, 3], [-1], [10**9], 5, [], None, [[1]]])
    for field in rnd.sample(sorted(GOOD) + ["kv_compression"], rnd.randint(0, 5)):
        if field == "kv_compression":
            body[field] = rnd.choice(KV + ODD[:4])
        elif rnd.random() < 0.8:
            body[field] = rnd.choice(GOOD[field])
        else:
            body[field] = rnd.choice(ODD)
    return body


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    tiny = write_tiny_gguf(tmp_path_factory.mktemp("fuzz") / "tiny.gguf", arch="llama")
    s = ServerProcess(str(tiny), "--budget", "256", "--parallel", "2", "--max-tokens", "8")
    yield s
    s.stop()


@pytest.mark.parametrize("seed", [0, 1])
def test_random_requests_get_200_or_4xx(srv, seed):
    rnd = random.Random(seed)
    seen: dict[int, int] = {}
    for _ in range(120):
        route = rnd.choice(["/v1/chat/completions", "/v1/completions"])
        body = _body(rnd, chat=route.endswith("chat/completions"))
        raw = rnd.choice(RAW) if rnd.random() < 0.05 else json.dumps(body).encode()
        headers = {"content-type": "application/json"}
        if body.get("stream") is True and rnd.random() < 0.5:
            with srv.client.stream("POST", route, content=raw, headers=headers) as r:
                status = r.status_code
                for _ in r.iter_lines():
                    if rnd.random() < 0.3:
                        break  # the client leaves mid-stream
        else:
            r = srv.client.post(route, content=raw, headers=headers)
            status = r.status_code
            if 400 <= status < 500:
                err = r.json()["error"]
                assert err["message"] and "\n" not in err["message"], r.text
        assert status == 200 or 400 <= status < 500, (status, raw[:300])
        seen[status] = seen.get(status, 0) + 1
    assert seen.get(200, 0) >= 20 and sum(v for k, v in seen.items() if k >= 400) >= 20, seen  # both kinds drawn
    srv.wait_idle(timeout=30)
    health = srv.client.get("/health").json()
    assert health["status"] == "ok" and health["slots_idle"] == 2 and max(health["cells"]) <= 256
    assert "Traceback" not in srv.output()
    assert srv.client.post("/v1/completions", json={"prompt": "t1 t2", "max_tokens": 2}).status_code == 200
