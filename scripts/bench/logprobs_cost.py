"""What `logprobs` costs in decode time: the same greedy completion with and without `logprobs: N`,
interleaved on one server (so load drifts hit both), medians over the runs.

    python scripts/bench/logprobs_cost.py [--model smollm2-135m] [--tokens 128] [--runs 7] [--top 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

from serve_process import ServerProcess  # this folder: run as a script


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--top", type=int, default=5, help="alternatives per token (logprobs: N)")
    a = ap.parse_args()
    srv = ServerProcess(a.model, "--budget", "2048", "--threads", "1")
    srv.client.timeout = 600

    def run(extra: dict) -> float:
        t0 = time.perf_counter()
        r = srv.client.post("/v1/completions", json={"prompt": "The history of bread", "max_tokens": a.tokens,
                                                     "temperature": 0, "ignore_eos": True, **extra})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == a.tokens, r.text
        return time.perf_counter() - t0

    try:
        run({}), run({"logprobs": a.top})  # warm-up
        plain, with_lp = [], []
        for _ in range(a.runs):
            plain.append(run({}))
            with_lp.append(run({"logprobs": a.top}))
    finally:
        srv.stop()
    p, w = statistics.median(plain), statistics.median(with_lp)
    print(f"{a.model}, {a.tokens} tokens, {a.runs} runs each: without {p:.3f} s (min {min(plain):.3f}), "
          f"logprobs={a.top} {w:.3f} s (min {min(with_lp):.3f}); ratio {w / p:.3f}")


if __name__ == "__main__":
    main()
