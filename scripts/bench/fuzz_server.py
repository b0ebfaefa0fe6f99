"""Hardening run for `ea-local serve`: fuzz, concurrent load, soak, SIGTERM.

1. fuzz: N malformed requests of many kinds (bad JSON, wrong types, out-of-range values, huge and
   chunked bodies, invalid UTF-8, unknown routes and methods, missing or wrong API key); each must
   get its expected 4xx in OpenAI's error shape, and the server must still answer a valid request.
2. load: C concurrent streaming clients x R requests each; all must complete with [DONE].
3. soak: S valid short requests (turns of a growing chat that is restarted every 60 turns, so the
   cache fills and evicts, and standalone completions; streamed and not); RSS and the slots' cells
   are printed after a warm-up and at the end, and the slots must be idle afterwards.
4. SIGTERM during in-flight streams: every stream ends with [DONE] and the process exits 0.

    python scripts/bench/fuzz_server.py [--model M] [--fuzz 1000] [--clients 8] [--per-client 20] [--soak 500]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections import Counter, defaultdict

import httpx

from serve_process import ServerProcess  # this folder: run as a script

KEY = "fuzz-key-7f3a"
AUTH = {"Authorization": f"Bearer {KEY}"}
MSG = [{"role": "user", "content": "Say hi."}]


def _chat(**kw) -> bytes:
    return json.dumps({"messages": MSG, **kw}).encode()


def _random_json_garbage(rng: random.Random) -> bytes:
    good = _chat(max_tokens=2)
    i = rng.randrange(1, len(good) - 1)
    return good[:i]  # truncated JSON


def cases(rng: random.Random, max_body: int):
    """(kind, method, path, body bytes | None, headers, expected status) — an endless mix."""
    C = "/v1/chat/completions"
    P = "/v1/completions"
    wrong_values = [None, True, "x", 3.5, [], {}, -1, 10**12, "5"]
    fields = {"messages": ("messages", [m for m in wrong_values if not isinstance(m, list)]),
              "max_tokens": ("max_tokens", [True, "x", 3.5, [], {}, -1, 0, 10**12, "5"]),
              "temperature": ("temperature", [True, "x", [], {}, -1, 2.5, 10**6]),
              "top_p": ("top_p", [True, "x", [], 0, -0.5, 1.5]),
              "stop": ("stop", [5, True, {}, [1, 2], ["a"] * 50]),
              "seed": ("seed", ["x", 1.5, [], 2**70]),
              "n": ("n", [0, 2, 10, "1", 1.0]),
              "stream": ("stream", ["yes", 1, [], {}]),
              "stream_options": ("stream_options", ["x", 1, [], {"include_usage": "yes"}]),
              "kv_compression": ("kv_compression", ["x", 1, {"policy": "nope"}, {"budget": 10}, {"budget": 10**9},
                                                    {"budget": "big"}, {"polcy": "knorm"}])}
    while True:
        k = rng.randrange(16)
        if k == 0:
            yield "invalid JSON", "POST", C, _random_json_garbage(rng), AUTH, 400
        elif k == 1:
            yield "random bytes", "POST", rng.choice([C, P]), rng.randbytes(rng.randrange(1, 2000)), AUTH, 400
        elif k == 2:
            yield "invalid UTF-8", "POST", C, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', AUTH, 400
        elif k == 3:
            yield "not an object", "POST", rng.choice([C, P]), rng.choice([b"[]", b"1", b'"x"', b"null", b""]), AUTH, 400
        elif k in (4, 5, 6):
            name, bad = fields[rng.choice(list(fields))]
            body = {"messages": MSG, "max_tokens": 2, name: rng.choice(bad)}
            yield f"wrong type/value: {name}", "POST", C, json.dumps(body).encode(), AUTH, 400
        elif k == 7:
            bad = rng.choice([[{"role": "robot", "content": "x"}], [{"content": "x"}], [{"role": "user"}],
                              [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
                              [{"role": "user", "content": 5}], [], ["hi"], [None]])
            yield "bad messages", "POST", C, json.dumps({"messages": bad}).encode(), AUTH, 400
        elif k == 8:
            bad = rng.choice([["a", "b"], [-1], [10**9], [], 5, None, {"x": 1}, [1.5]])
            yield "bad prompt", "POST", P, json.dumps({"prompt": bad, "max_tokens": 2}).encode(), AUTH, 400
        elif k == 9:
            yield "missing API key", rng.choice(["GET", "POST"]), rng.choice([C, P, "/v1/models", "/metrics"]), \
                _chat(max_tokens=2), {}, 401
        elif k == 10:
            yield "wrong API key", "POST", C, _chat(max_tokens=2), \
                {"Authorization": rng.choice(["Bearer nope", f"Basic {KEY}", KEY, "Bearer", f"Bearer {KEY}x"])}, 401
        elif k == 11:
            path = rng.choice(["/", "/v1", "/v2/chat/completions", "/v1/engines", "/admin", "/v1/chat/completions/x",
                               "/%2e%2e/etc/passwd", "/v1/files"])
            yield "unknown route", rng.choice(["GET", "POST"]), path, b"{}", AUTH, 404
        elif k == 12:
            yield "wrong method", rng.choice(["GET", "PUT", "DELETE"]), rng.choice([C, P]), None, AUTH, 405
        elif k == 13:
            # oversized: mostly just over the limit, now and then 10 MB, sometimes chunked (no Content-Length)
            size = 10 * 2**20 if rng.random() < 0.1 else max_body + rng.randrange(1, 4096)
            yield "body too large", "POST", rng.choice([C, P]), b"x" * size, AUTH, 413
        elif k == 14:
            yield "body too large (chunked)", "POST", C, ("chunked", max_body + 1), AUTH, 413
        else:
            yield "n > 1 / huge max_tokens", "POST", C, rng.choice(
                [_chat(n=2), _chat(max_tokens=10**9), _chat(max_completion_tokens=10**7), _chat(max_tokens=-5)]), AUTH, 400


def send(c: httpx.Client, method: str, path: str, body, headers: dict) -> httpx.Response:
    if isinstance(body, tuple):  # chunked upload of body[1] bytes
        total = body[1]

        def gen():
            sent = 0
            while sent < total:
                n = min(65536, total - sent)
                sent += n
                yield b"x" * n

        return c.request(method, path, content=gen(), headers=headers)
    return c.request(method, path, content=body, headers={"content-type": "application/json", **headers})


def fuzz(srv: ServerProcess, n: int, max_body: int, seed: int = 0) -> bool:
    rng = random.Random(seed)
    tried, failed = Counter(), defaultdict(list)
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        for _, (kind, method, path, body, headers, want) in zip(range(n), cases(rng, max_body)):
            tried[kind] += 1
            try:
                r = send(c, method, path, body, headers)
                ok = r.status_code == want and "error" in r.json() and r.json()["error"].get("message")
                if not ok:
                    failed[kind].append(f"{r.status_code} {r.text[:120]}")
            except (httpx.HTTPError, ValueError) as e:
                failed[kind].append(repr(e))
        alive = c.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 2}, headers=AUTH)
    print(f"fuzz: {sum(tried.values())} malformed requests, {sum(map(len, failed.values()))} wrong answers; "
          f"valid request afterwards: {alive.status_code}")
    for kind in sorted(tried):
        print(f"  {kind:32s} {tried[kind]:5d} tried, {len(failed[kind])} wrong" +
              (f"  e.g. {failed[kind][0]}" if failed[kind] else ""))
    return not any(failed.values()) and alive.status_code == 200


def stream_once(c: httpx.Client, body: dict, pieces: list[str] | None = None) -> bool:
    """True when the stream ends with [DONE]; the chat deltas' text goes to `pieces`."""
    with c.stream("POST", body.pop("_path"), json=body, headers=AUTH) as r:
        if r.status_code != 200:
            return False
        last = None
        for line in r.iter_lines():
            if line.startswith("data: "):
                last = line
                if pieces is not None and line != "data: [DONE]":
                    for ch in json.loads(line[6:]).get("choices", []):
                        pieces.append(ch.get("delta", {}).get("content") or "")
        return last == "data: [DONE]"


class Conversation:
    """A chat that grows turn by turn (reusing its slot's cache, evicting past the budget), restarted
    after `turns` turns."""

    def __init__(self, turns: int = 60):
        self.turns = turns
        self.msgs: list[dict] = []

    def next(self, text: str) -> list[dict]:
        if len(self.msgs) >= 2 * self.turns:
            self.msgs = []
        self.msgs.append({"role": "user", "content": text})
        return self.msgs

    def answer(self, text: str) -> None:
        self.msgs.append({"role": "assistant", "content": text})


def valid_request(c: httpx.Client, i: int, rng: random.Random, conv: Conversation | None = None) -> bool:
    """Chat turns of a growing conversation (even i; streamed every other time) and standalone completions."""
    conv = conv or Conversation()
    words = " ".join(rng.choice(["sea", "sky", "tree", "stone", "river", "light"]) for _ in range(rng.randrange(3, 12)))
    kind = i % 4
    if kind == 0:
        r = c.post("/v1/chat/completions", json={"messages": conv.next(words), "max_tokens": 4}, headers=AUTH)
        if r.status_code != 200:
            return False
        conv.answer(r.json()["choices"][0]["message"]["content"])
        return r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    if kind == 1:
        r = c.post("/v1/completions", json={"prompt": words, "max_tokens": 4, "stop": ["."]}, headers=AUTH)
        return r.status_code == 200
    if kind == 2:
        pieces: list[str] = []
        ok = stream_once(c, {"_path": "/v1/chat/completions", "messages": conv.next(words), "max_tokens": 4,
                             "stream": True, "stream_options": {"include_usage": True}}, pieces)
        conv.answer("".join(pieces))
        return ok
    return stream_once(c, {"_path": "/v1/completions", "prompt": words, "max_tokens": 4, "stream": True})


def load(srv: ServerProcess, clients: int, per_client: int) -> bool:
    results: list[bool] = []
    lock = threading.Lock()

    def client(j: int):
        rng = random.Random(j)
        with httpx.Client(base_url=srv.url, timeout=300) as c:
            for i in range(per_client):
                body = {"_path": "/v1/chat/completions", "messages": [{"role": "user", "content": f"client {j} says {i}"}],
                        "max_tokens": 4 + rng.randrange(4), "stream": True}
                try:
                    ok = stream_once(c, body)
                except httpx.HTTPError:
                    ok = False
                with lock:
                    results.append(ok)

    t0 = time.perf_counter()
    ts = [threading.Thread(target=client, args=(j,)) for j in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    h = srv.wait_idle(timeout=30)
    print(f"load: {clients} concurrent streaming clients x {per_client} = {len(results)} requests in "
          f"{time.perf_counter() - t0:.0f} s, {results.count(False)} failed; afterwards {h}")
    return all(results)


def soak(srv: ServerProcess, n: int, budget: int, warmup: int = 60) -> bool:
    rng = random.Random(1)
    fails = 0
    t0 = time.perf_counter()
    conv = Conversation()
    with httpx.Client(base_url=srv.url, timeout=300) as c:
        for i in range(warmup):
            valid_request(c, i, rng, conv)
        srv.wait_idle()
        rss0, cells0 = srv.rss_kib(), srv.client.get("/health").json()["cells"]
        ev0 = srv.metrics().get("ea_local_evicted_cells_total", 0)
        trace = []
        for i in range(n):
            fails += not valid_request(c, i, rng, conv)
            if (i + 1) % 100 == 0:
                trace.append(f"{srv.rss_kib() / 1024:.1f}")
    h = srv.wait_idle()
    rss1 = srv.rss_kib()
    m = srv.metrics()
    over = [x for x in h["cells"] if x > budget]
    print(f"soak: {n} valid requests (after {warmup} warm-up) in {time.perf_counter() - t0:.0f} s, {fails} failed; "
          f"RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB ({(rss1 - rss0) / 1024:+.1f}; every 100: {', '.join(trace)}); "
          f"cells per slot {cells0} -> {h['cells']} (budget {budget}); slots idle {h['slots_idle']}/{h['slots']}, "
          f"queue {h['queue']}; cells evicted during the soak {m.get('ea_local_evicted_cells_total', 0) - ev0:.0f}")
    return fails == 0 and not over


def sigterm(model: str, threads: str) -> bool:
    srv = ServerProcess(model, "--budget", "512", "--parallel", "2")
    done: list[bool] = []

    def client():
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            try:
                done.append(stream_once(c, {"_path": "/v1/completions", "prompt": "Once upon a time",
                                            "max_tokens": 2000, "stream": True}))
            except httpx.HTTPError:
                done.append(False)

    ts = [threading.Thread(target=client) for _ in range(2)]
    for t in ts:
        t.start()
    time.sleep(3)
    t0 = time.perf_counter()
    code = srv.terminate(timeout=60)
    for t in ts:
        t.join()
    srv.stop()
    print(f"SIGTERM with 2 streams in flight: streams ended with [DONE]: {done}; exit status {code} "
          f"after {time.perf_counter() - t0:.1f} s")
    return code == 0 and all(done) and len(done) == 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m", help="a GGUF path or an embedded model's name "
                                                             "(smollm2-135m, gemma3-270m)")
    ap.add_argument("--fuzz", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--per-client", type=int, default=20)
    ap.add_argument("--soak", type=int, default=500)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--parallel", type=int, default=2)
    a = ap.parse_args()
    max_body = 65536
    srv = ServerProcess(a.model, "--budget", str(a.budget), "--parallel", str(a.parallel), "--queue", "64",
                        "--max-body", str(max_body), api_key=KEY)
    ok = True
    try:
        if a.fuzz:
            ok &= fuzz(srv, a.fuzz, max_body)
        if a.clients and a.per_client:
            ok &= load(srv, a.clients, a.per_client)
        if a.soak:
            ok &= soak(srv, a.soak, a.budget)
        alive = srv.proc.poll() is None
        print(f"server still running: {alive}; 'Traceback' in its log: {'Traceback' in srv.output()}")
        ok &= alive and "Traceback" not in srv.output()
    finally:
        srv.stop()
    ok &= sigterm(a.model, "1")
    print("ALL OK" if ok else "FAILURES")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
