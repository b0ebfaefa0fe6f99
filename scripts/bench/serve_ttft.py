"""Time to first token of follow-up turns, with conversation reuse and without (`--no-reuse`).

Starts `ea-local serve` twice on the default model (or --model), has the same conversation with
each — a long first message (a slice of the GPL-3 text), then short follow-ups — and prints the
median time from sending a follow-up to its first streamed token.

    python scripts/bench/serve_ttft.py [--doc-tokens 1500] [--turns 4] [--budget 2048]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx

from serve_process import ServerProcess  # this folder: run as a script

GPL3 = Path("/usr/share/common-licenses/GPL-3")
FOLLOWUPS = ["Summarize that in one sentence.", "Who is it written for?", "What does it say about patents?",
             "Is it long?", "Name one obligation it sets.", "What about warranties?", "Thanks. Anything else?"]


def stream_turn(c: httpx.Client, msgs: list[dict], max_tokens: int) -> tuple[float, str, dict]:
    t0 = time.perf_counter()
    ttft = None
    pieces, usage = [], {}
    body = {"messages": msgs, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with c.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                usage = ev["usage"]
            for ch in ev["choices"]:
                text = ch["delta"].get("content")
                if text:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    pieces.append(text)
    return ttft if ttft is not None else time.perf_counter() - t0, "".join(pieces), usage


def conversation(srv: ServerProcess, doc: str, turns: int, max_tokens: int) -> list[tuple[float, dict]]:
    msgs = [{"role": "user", "content": f"Read this:\n\n{doc}\n\nWhat is this text?"}]
    out = []
    with httpx.Client(base_url=srv.url, timeout=600) as c:
        for i in range(turns + 1):
            ttft, text, usage = stream_turn(c, msgs, max_tokens)
            if i:  # follow-ups only: the first turn prefills the document either way
                out.append((ttft, usage))
            msgs += [{"role": "assistant", "content": text}, {"role": "user", "content": FOLLOWUPS[i % len(FOLLOWUPS)]}]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--doc-tokens", type=int, default=1500, help="about this many tokens of GPL-3 in turn 1")
    ap.add_argument("--turns", type=int, default=4, help="follow-up turns timed")
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=16)
    a = ap.parse_args()
    if a.model is None:
        from ea_local.model.embedded import default_model_path
        a.model = str(default_model_path())
    doc = " ".join(GPL3.read_text().split()[: int(a.doc_tokens / 1.3)])  # ~1.3 tokens per English word
    res = {}
    for mode in ("--reuse", "--no-reuse"):
        srv = ServerProcess(a.model, "--budget", str(a.budget), mode)
        try:
            res[mode] = conversation(srv, doc, a.turns, a.max_tokens)
        finally:
            srv.stop()
        ttfts = [t for t, _ in res[mode]]
        prompt = [u.get("prompt_tokens", 0) for _, u in res[mode]]
        cached = [u.get("prompt_tokens_details", {}).get("cached_tokens", 0) for _, u in res[mode]]
        print(f"{mode:11s} follow-up TTFT median {statistics.median(ttfts):.3f} s  "
              f"(each: {', '.join(f'{t:.2f}' for t in ttfts)}; prompt tokens {prompt}; cached {cached})")
    r = statistics.median(t for t, _ in res["--no-reuse"]) / statistics.median(t for t, _ in res["--reuse"])
    print(f"reuse makes the follow-up's first token {r:.1f}x sooner")


if __name__ == "__main__":
    main()
