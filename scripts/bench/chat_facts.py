#!/usr/bin/env python3
"""Facts stated early in a long chat, asked for at its end, through `ea-local chat`'s path: every turn
a message to `Chat.ask` with the model's own (greedy) replies, as a user types them.

    EA_LOCAL_THREADS=1 .venv/bin/python scripts/bench/chat_facts.py --model smollm2-135m --budget 256 \\
        --length 2000 --chats 20 --texts reporting --out rows.jsonl

The chats are the bench's multi-turn task (`bench.data.multi_turn`): three facts ("Please remember
this. My locker code is 48213."), then messages quoting paragraphs of the text set until the
conversation holds `--length` tokens, then one question per fact, asked one after the other. One
JSON row per question; the last line gives found / asked with a 95% interval.
"""
from __future__ import annotations

import argparse
import json
import random
import sys

from ea_local.apps.chat import Chat, ChatOptions  # ea_local first: libllama before numpy
from ea_local.bench import data
from ea_local.bench.corpus import LICENSES
from ea_local.bench.stats import fmt_rate
from ea_local.model.embedded import resolve_model
from ea_local.model.info import read_model_info

TEXTS = {"reporting": ["GPL-3", "GPL-2"], "tuning": ["MPL-2.0", "Apache-2.0", "Artistic"]}


def user_text(turn: str) -> str:
    """The user's words of a transcript turn "User: ...\\nAssistant: ..."."""
    return turn.split("User: ", 1)[1].split("\nAssistant:", 1)[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--policy", default="expected-attention")
    ap.add_argument("--no-recall", action="store_true")
    ap.add_argument("--length", type=int, default=2000, help="conversation tokens before the questions")
    ap.add_argument("--chats", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1, help="chat i is drawn from chat-<seed>-<i>")
    ap.add_argument("--texts", choices=sorted(TEXTS), default="reporting")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens per reply")
    ap.add_argument("--out", default=None, help="JSON lines, one per question")
    a = ap.parse_args()
    info = read_model_info(str(resolve_model(a.model)))
    paras = [" ".join(p.split()) for p in data.real_text([LICENSES / n for n in TEXTS[a.texts]]).split("\n\n")
             if len(p.split()) >= 20]
    out = open(a.out, "a") if a.out else None
    found = asked = 0
    for i in range(a.chats):
        c = data.multi_turn(random.Random(f"chat-{a.seed}-{i}"), 400, paras)
        chat = Chat(info, ChatOptions(budget=a.budget, policy=a.policy, recall=not a.no_recall, temperature=0.0,
                                      max_tokens=a.max_tokens, threads=1, seed=0))
        try:
            chat.start()
            turns = 0
            for t in c.turns:
                if chat.s.next_pos >= a.length:
                    break
                "".join(chat.ask(user_text(t)))
                turns += 1
            n_ctx = chat.s.next_pos
            for qi, q in enumerate(c.questions):
                reply = "".join(chat.ask(user_text(q.prompt)))
                row = {"model": a.model, "texts": a.texts, "chat": i, "seed": a.seed, "budget": a.budget,
                       "policy": a.policy, "recall": not a.no_recall, "length": n_ctx, "turns": turns, "question": qi,
                       "expected": q.answer, "found": data.answered(q.answer, reply), "answer": reply}
                found += row["found"]
                asked += 1
                print(json.dumps(row), flush=True)
                if out:
                    out.write(json.dumps(row) + "\n")
                    out.flush()
        finally:
            chat.s.close()
    print(f"chat facts, {a.policy}, {a.budget} cells, recall {'off' if a.no_recall else 'on'}: {fmt_rate(found, asked)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
