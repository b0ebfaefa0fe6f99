"""RSS of `ea-local serve` with 1 and 4 slots (the slots share one loaded model; each adds a context).

    python scripts/bench/serve_memory.py [--model M] [--budget 2048]
"""
from __future__ import annotations

import argparse

from serve_process import ServerProcess  # this folder: run as a script


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--budget", type=int, default=2048)
    a = ap.parse_args()
    from ea_local.model.info import read_model_info
    from ea_local.model.embedded import default_model_path

    model = a.model or str(default_model_path())
    info = read_model_info(model)
    for n in (1, 4):
        s = ServerProcess(model, "--budget", str(a.budget), "--parallel", str(n))
        try:
            for _ in range(n):  # one request per slot: every context has run a decode
                s.client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
            print(f"--parallel {n}: RSS {s.rss_kib() / 1024:.0f} MiB")
        finally:
            s.stop()
    n_ctx = a.budget + min(512, a.budget // 2)
    print(f"model file {info.file_size / 2**20:.0f} MiB; KV cache per slot (f16, n_ctx {n_ctx}) "
          f"{info.kv_cache_bytes(n_ctx) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
