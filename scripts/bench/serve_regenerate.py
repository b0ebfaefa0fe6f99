#!/usr/bin/env python3
"""Regenerate through `ea-local serve`: each pass-key chat request sent twice, greedy, to a server that
reuses its slot (as a client's "regenerate" does); prints whether the second answer is the first.

    EA_LOCAL_THREADS=1 .venv/bin/python scripts/bench/serve_regenerate.py --model smollm2-135m --budget 256

The trials are serve_passkey.py's (prose, the reporting text GPL-2 unless --texts). One slot serves every
request, so a trial's first request may reuse the previous trial's cached prefix.
"""
from __future__ import annotations

import argparse
import json
import sys

from ea_local.engine.runtime import ContextConfig, Runtime  # ea_local first: libllama before numpy
from ea_local.bench.data import answered
from ea_local.model.embedded import resolve_model

import serve_passkey as sp  # this folder: run as a script
from serve_process import ServerProcess


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=1000, help="haystack tokens")
    ap.add_argument("--texts", choices=sorted(sp.PROSE), default="reporting")
    ap.add_argument("--seeds", default="0,1", help="serve_passkey.py seeds (5 depths each)")
    a = ap.parse_args()
    path = str(resolve_model(a.model))
    rt = Runtime(path, ContextConfig(n_ctx=64, n_threads=1))
    sents = sp.haystack(rt, "prose", a.tokens, a.texts)
    srv = ServerProcess(path, "--budget", str(a.budget), "--parallel", "1", start_timeout=600)
    srv.client.timeout = 600
    same = found = found_again = n = 0
    try:
        for seed in (int(x) for x in a.seeds.split(",")):
            for depth, key in sp.trials(seed, [0.1, 0.3, 0.5, 0.7, 0.9]):
                url, body = sp.request("chat", sp.document(sents, depth, key), 16)
                first, again = (srv.client.post(url, json=body).json() for _ in range(2))
                t1, t2 = sp.answer_text("chat", first), sp.answer_text("chat", again)
                n, same = n + 1, same + (t1 == t2)
                found, found_again = found + answered(str(key), t1), found_again + answered(str(key), t2)
                print(json.dumps({"depth": depth, "key": key, "first": t1, "again": t2,
                                  "recalled": [first["kv_cache"]["recalled_cells"], again["kv_cache"]["recalled_cells"]]}),
                      flush=True)
    finally:
        srv.stop()
    print(f"same answer {same}/{n}; key found {found}/{n} first, {found_again}/{n} again")
    return 0


if __name__ == "__main__":
    sys.exit(main())
