#!/usr/bin/env python3
"""Does a recalled cache miss a pass key because of *which* cells it holds, or because its later cells
were computed while the key was evicted? (docs/recall.md, "What does not work")

Each trial is read as the server reads a chat request over the budget (question probed, recall with the
user's words, the document's last cells replaceable), then answered greedily. The same prompt is then
prefilled whole into an uncompressed cache, every cell the recalled cache does not hold is removed, the
question is decoded again (as recall does), and it is answered: the same cell set, every cell computed
in the full context. One JSON row per trial.

    scripts/measure/recall_oracle.py --budget 128 --texts Apache-2.0 --depths 0.1 --seed 0

`--n-sink` and `--recent` change the session's protected cells (the first positions, the newest ones) to
try them on the server's path; `--no-oracle` skips the full-context answer; `--instruction-last` moves
the instruction from the message's start to just before its question; `--redecode-context` lets the
re-decode after recall reach before the question into the document's newest cells (the contiguous live
run ending at the newest, up to `recall_redecode`), a lever measured and not kept (docs/recall.md).
`--no-recall` reads with recall off, where the probed question keeps the cells it asks for at each
compression (`SessionConfig.guard_question`); `--no-guard` turns that off, `--guard-with-recall` runs it
with recall on too (measured, not kept: docs/ea-paths.md, "What the question asks for").
"""
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy is loaded
from ea_local import kvhooks  # noqa: E402,F401  (loads llama.cpp before numpy)

from ea_local.bench.corpus import LICENSES  # noqa: E402
from ea_local.bench.data import answered, passkey_needle  # noqa: E402
from ea_local.engine.sampling import SamplingParams  # noqa: E402
from ea_local.engine.session import Session  # noqa: E402
from ea_local.model.chat_template import resolve_template  # noqa: E402
from ea_local.model.embedded import resolve_model  # noqa: E402
from ea_local.serve.app import Server  # noqa: E402
from ea_local.serve.slots import Slot, SlotPool  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import serve_passkey as sp  # noqa: E402
from cell_sets import answer_from, token_span, trial_arguments  # noqa: E402  (this folder)


def main() -> None:
    ap = trial_arguments("0.1")
    ap.add_argument("--policy", default="expected-attention")
    ap.add_argument("--n-sink", type=int, default=None, help="first positions never evicted (default: the session's)")
    ap.add_argument("--recent", type=int, default=None, help="newest positions never evicted (default: the session's)")
    ap.add_argument("--no-oracle", action="store_true", help="only the recalled cache's answer")
    ap.add_argument("--instruction-last", action="store_true", help="the instruction after the document")
    ap.add_argument("--no-recall", action="store_true", help="recall off")
    ap.add_argument("--no-guard", action="store_true", help="the question guard off")
    ap.add_argument("--guard-with-recall", action="store_true", help="the question guard with recall on too")
    ap.add_argument("--redecode-context", action="store_true",
                    help="the re-decode after recall also takes the document's newest cells before the question")
    a = ap.parse_args()
    sp.PROSE.setdefault(a.texts, LICENSES / a.texts)
    path = str(resolve_model(a.model))

    def session(budget: int):
        srv, cfg = sp.slot_config(path, budget, a.policy, recall=not a.no_recall)
        cfg.n_sink = cfg.n_sink if a.n_sink is None else a.n_sink
        cfg.recent = cfg.recent if a.recent is None else a.recent
        cfg.guard_question = not a.no_guard
        return srv, Session(path, cfg)

    srv_cfg, s = session(a.budget)
    if a.guard_with_recall:  # the guard runs where recall is off: each compression sees it off
        compress = s.compress

        def guarded(target: int, phase: str = "decode") -> int:
            s.cfg.recall = False
            try:
                return compress(target, phase)
            finally:
                s.cfg.recall = True
        s.compress = guarded
    if a.redecode_context:
        redecode = s._redecode_tail
        s._redecode_tail = lambda since: redecode(0)
    full = None if a.no_oracle else session(8 * 1024)[1]
    template, _ = resolve_template(s.info, s.rt)
    srv = Server(srv_cfg, SlotPool([Slot(0, s, a.policy, a.budget)], queue=1), s.rt, template)  # its request rules
    sents = sp.haystack(s.rt, "prose", a.tokens, a.texts)
    greedy = SamplingParams(temperature=0.0)
    for depth, key in sp.trials(a.seed, [float(d) for d in a.depths.split(",")]):
        doc = sp.document(sents, depth, key)
        if a.instruction_last:
            doc = doc.removeprefix(sp.INTRO) + "\n\n" + sp.INTRO.strip()
        messages = [{"role": "user", "content": doc + sp.CHAT_QUESTION}]
        toks, n_q, tail = srv.chat_request(messages)
        question = toks[len(toks) - n_q:]
        s.reset()
        s.set_question(question if s.policy.needs_queries else None)
        s.prefill(toks, turn=False)
        s.recall_message(0, question, until=s.next_pos - tail)
        s.set_question(None)
        kept = set(s.live)
        recalled = "".join(s.generate([], greedy, max_tokens=12))
        n0, n1 = token_span(s.rt, toks, passkey_needle(key))
        row = {"texts": a.texts, "budget": a.budget, "policy": a.policy, "n_sink": s.cfg.n_sink,
               **({"instruction": "last"} if a.instruction_last else {}),
               **({"redecode": "context"} if a.redecode_context else {}),
               **({"recall": False} if a.no_recall else {}),
               **({"guard": False} if a.no_guard else {"guard": "with recall"} if a.guard_with_recall else {}),
               "recent": s.cfg.recent, "depth": depth, "key": key, "cells": len(kept),
               "needle_live": sum(n0 <= p < n1 for p in kept), "needle_len": n1 - n0,
               "recalled": answered(str(key), recalled), "answer_recalled": recalled}
        if a.no_oracle:
            print(json.dumps(row), flush=True)
            continue
        oracle = answer_from(full, toks, n_q, kept, greedy)
        print(json.dumps({**row, "same_cells_full_context": answered(str(key), oracle),
                          "answer_full_context": oracle}), flush=True)
    s.close()
    if full is not None:
        full.close()


if __name__ == "__main__":
    main()
