#!/usr/bin/env python3
"""Which cells does SmolLM2 need to answer a pass key from a compressed chat prompt? Hand-picked cell
sets, every cell computed in the full context: an upper bound for any eviction policy at that many
cells (docs/recall.md, "What does not work (yet)").

Each trial is the server's chat request (scripts/bench/serve_passkey.py's document and question, the
model's chat template). The prompt is prefilled whole into an uncompressed cache, every cell outside
the set is removed, the question is decoded again (as recall does), and it is answered greedily. Sets,
each `--budget` cells (sinks: the first 4 positions; opening: the chat template's system part and the
document's first sentence, the instruction to find the key; needle: the key's sentences; newest: the
prompt's last cells, the question and the template's tail among them, as many as the budget leaves):

    full                      every cell
    sinks+newest              StreamingLLM's choice
    sinks+needle+newest
    sinks+needle±8+newest     the needle with 8 neighbours on each side
    sinks+instruction+needle+newest
    opening+needle+newest     the template's system part too

With `--newest N,...` the sets are instead the shape the server's path answers from after a compression
and recall: the conversation's protected opening (a quarter of `--budget`, at most 64), the needle with
8 neighbours on each side, and the prompt's newest N cells, the question among them (whatever
the budget; the set's size is printed).

    scripts/measure/cell_sets.py --budget 128 --texts Apache-2.0 --depths 0.1,0.5 --seed 0
    scripts/measure/cell_sets.py --budget 128 --texts GPL-3 --depths 0.1,0.3,0.5,0.7,0.9 --newest 16,20,32,48,64
"""
import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy is loaded
from ea_local import kvhooks  # noqa: E402,F401  (loads llama.cpp before numpy)
import numpy as np  # noqa: E402

from ea_local.bench.corpus import LICENSES  # noqa: E402
from ea_local.bench.data import answered, passkey_needle  # noqa: E402
from ea_local.engine.sampling import SamplingParams  # noqa: E402
from ea_local.engine.session import Session, conversation_protection  # noqa: E402
from ea_local.model.chat_template import resolve_template  # noqa: E402
from ea_local.model.embedded import resolve_model  # noqa: E402
from ea_local.serve.app import Server  # noqa: E402
from ea_local.serve.slots import Slot, SlotPool  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import serve_passkey as sp  # noqa: E402


def token_span(rt, toks: list[int], text: str) -> tuple[int, int]:
    """[first, last + 1) of the tokens that spell the first occurrence of `text`."""
    offsets, spelled = [], b""
    for t in toks:
        offsets.append(len(spelled))
        spelled += rt.token_bytes(t)
    c0 = spelled.find(text.encode())
    if c0 < 0:
        raise ValueError(f"{text!r} is not in the prompt")
    c1 = c0 + len(text.encode())
    return (max(i for i, o in enumerate(offsets) if o <= c0),
            max(i for i, o in enumerate(offsets) if o < c1) + 1)


def answer_from(full: Session, toks: list[int], n_q: int, keep: set[int], params: SamplingParams) -> str:
    """The answer to the prompt `toks` prefilled whole into `full` (an uncompressed session) with only the
    cells at `keep` left, its question (the last n_q tokens) decoded again as recall does."""
    full.reset()
    full.prefill(toks, turn=False)
    drop = np.array(sorted(p for p in full.live if p not in keep), dtype=np.int64)
    if len(drop):
        full._remove(drop, global_only=False)
        full._redecode_tail(len(toks) - n_q)
    return "".join(full.generate([], params, max_tokens=12))


def trial_arguments(depths: str) -> argparse.ArgumentParser:
    """The options that name a set of chat pass-key trials (this script's and recall_oracle.py's)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--texts", default="reporting", help="reporting, tuning or a licence file name")
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--depths", default=depths)
    ap.add_argument("--seed", type=int, default=0)
    return ap


def main() -> None:
    ap = trial_arguments("0.1,0.5")
    ap.add_argument("--newest", help="comma-separated N: the opening + needle±8 + newest N sets instead")
    a = ap.parse_args()
    sp.PROSE.setdefault(a.texts, LICENSES / a.texts)
    path = str(resolve_model(a.model))
    srv_cfg, cfg = sp.slot_config(path, 8 * 1024, "none", recall=False)
    full = Session(path, cfg)
    template, _ = resolve_template(full.info, full.rt)
    srv = Server(srv_cfg, SlotPool([Slot(0, full, "none", cfg.budget)], queue=1), full.rt, template)
    sents = sp.haystack(full.rt, "prose", a.tokens, a.texts)
    greedy = SamplingParams(temperature=0.0)

    for depth, key in sp.trials(a.seed, [float(d) for d in a.depths.split(",")]):
        messages = [{"role": "user", "content": sp.document(sents, depth, key) + sp.CHAT_QUESTION}]
        toks, n_q, _ = srv.chat_request(messages)
        n = len(toks)
        n0, n1 = token_span(full.rt, toks, passkey_needle(key))
        i0, i1 = token_span(full.rt, toks, sp.INTRO.strip())
        sinks, needle, instruction = set(range(4)), set(range(n0, n1)), set(range(i0, i1))

        def newest(fixed: set[int]) -> set[int]:
            return fixed | set(range(n - (a.budget - len(fixed)), n))

        sets = {"full": set(range(n))}
        if a.newest:
            kept = set(range(conversation_protection(a.budget))) | set(range(n0 - 8, n1 + 8))
            sets |= {f"opening+needle±8+newest{k}": kept | set(range(n - k, n))
                     for k in map(int, a.newest.split(","))}
        else:
            sets |= {
                "sinks+newest": newest(sinks),
                "sinks+needle+newest": newest(sinks | needle),
                "sinks+needle±8+newest": newest(sinks | set(range(n0 - 8, n1 + 8))),
                "sinks+instruction+needle+newest": newest(sinks | instruction | needle),
                "opening+needle+newest": newest(set(range(i1)) | needle),
            }
        answers = {name: answer_from(full, toks, n_q, keep, greedy) for name, keep in sets.items()}
        print(json.dumps({"texts": a.texts, "budget": a.budget, "sizes": {k: len(v) for k, v in sets.items()},
                          "depth": depth, "key": key, "prompt": n, "needle": [n0, n1], "instruction": [i0, i1],
                          "found": {k: answered(str(key), v) for k, v in answers.items()}, "answers": answers}),
              flush=True)
    full.close()


if __name__ == "__main__":
    main()
