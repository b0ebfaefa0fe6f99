#!/usr/bin/env python3
"""Pass key through `ea-local chat`'s path: one conversation per trial, the document and its question
pasted as one message (`Chat.ask`), greedy, as a user of the REPL would paste them.

    EA_LOCAL_THREADS=1 .venv/bin/python scripts/bench/chat_passkey.py --model smollm2-135m --tokens 1000 \\
        --budget 256 --texts reporting --out results.jsonl

The haystack, needle and question are serve_passkey.py's (the same trials for the same depths and
seeds). A message longer than the room is compressed while it is read, its question probed at each
compression; with recall (the default) the question then brings back what it asks for.
"""
from __future__ import annotations

import argparse
import json
import sys

from ea_local.apps.chat import Chat, ChatOptions  # ea_local first: libllama before numpy
from ea_local.bench.data import answered
from ea_local.bench.stats import fmt_rate
from ea_local.engine.runtime import ContextConfig, Runtime
from ea_local.model.embedded import resolve_model
from ea_local.model.info import read_model_info

import serve_passkey as sp  # this folder: run as a script


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=1000, help="haystack tokens")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--policy", default="expected-attention")
    ap.add_argument("--no-recall", action="store_true")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--seeds", default="0,1", help="one trial per depth and seed, keyed as serve_passkey.py's")
    ap.add_argument("--haystack", choices=["filler", "prose"], default="prose")
    ap.add_argument("--texts", choices=sorted(sp.PROSE), default="reporting")
    ap.add_argument("--out", default=None, help="JSON lines, one per trial")
    a = ap.parse_args()
    path = str(resolve_model(a.model))
    rt = Runtime(path, ContextConfig(n_ctx=64, n_threads=1))
    sents = sp.haystack(rt, a.haystack, a.tokens, a.texts)
    rt.close()
    info = read_model_info(path)
    depths = [float(x) for x in a.depths.split(",")]
    plan = [t for s in a.seeds.split(",") for t in sp.trials(int(s), depths)]
    out = open(a.out, "a") if a.out else None
    found = 0
    for depth, key in plan:
        chat = Chat(info, ChatOptions(budget=a.budget, policy=a.policy, recall=not a.no_recall, temperature=0.0,
                                      max_tokens=16, threads=1, seed=0))
        try:
            chat.start()
            reply = "".join(chat.ask(sp.document(sents, depth, key) + sp.CHAT_QUESTION))
            row = {"model": a.model, "path": "chat", "haystack": a.haystack, "texts": a.texts, "tokens": a.tokens,
                   "budget": a.budget, "policy": a.policy, "recall": not a.no_recall, "depth": depth, "key": key,
                   "found": answered(str(key), reply), "answer": reply, "recalled_cells": chat.s.stats.recalled}
        finally:
            chat.s.close()
        found += row["found"]
        print(json.dumps(row), flush=True)
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()
    print(f"{a.policy}, {a.budget} cells, recall {'off' if a.no_recall else 'on'}: {fmt_rate(found, len(plan))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
