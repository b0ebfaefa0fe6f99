#!/usr/bin/env python3
"""Follow one pass-key chat request through the server's path, compression by compression: the
share of the needle's tokens still cached and the probe's greedy answer that steered the scores.

    EA_LOCAL_THREADS=1 .venv/bin/python scripts/bench/probe_trace.py --model smollm2-135m --tokens 3800 \\
        --budget 947 --depth 0.3 --key 27611 --haystack prose --texts tuning --full

The session is set up as a slot sets it up for a request that does not fit (`Slot.run`: the
question probed, the prompt read with `turn=False`, then recall asked by the question's words); the
prompt is serve_passkey.py's chat request. `--server-budget`: the budget the server was started with,
when the request names a smaller one (a server sized for 256 reads 128-token chunks at 128 cells).
`--full` also asks the full cache the question after the same prefixes, to tell a probe that
wanders because of what was evicted from one that wanders on the text itself.
"""
from __future__ import annotations

import argparse
import sys

from ea_local.engine.sampling import SamplingParams  # ea_local first: libllama before numpy
from ea_local.engine.session import Session, SessionConfig, conversation_protection
from ea_local.model.chat_template import resolve_template
from ea_local.model.embedded import resolve_model
from ea_local.engine.question import chat_question_text, chat_tail_text, question_length

import serve_passkey as sp  # this folder: run as a script


def text_of(s: Session, tokens: list[int]) -> str:
    return b"".join(s.rt.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=3800, help="haystack tokens")
    ap.add_argument("--budget", type=int, default=947)
    ap.add_argument("--server-budget", type=int, help="the server's --budget, when the request names a smaller one "
                    "(serve_passkey.py sizes its server for the largest budget)")
    ap.add_argument("--policy", default="expected-attention")
    ap.add_argument("--question-weight", type=float, default=SessionConfig.question_weight)
    ap.add_argument("--depth", type=float, default=0.3)
    ap.add_argument("--key", type=int, default=27611)
    ap.add_argument("--haystack", choices=["filler", "prose"], default="prose")
    ap.add_argument("--texts", choices=sorted(sp.PROSE), default="reporting")
    ap.add_argument("--full", action="store_true", help="also the full cache's answer after each prefix")
    a = ap.parse_args()
    path = str(resolve_model(a.model))
    srv, cfg = sp.slot_config(path, a.server_budget or a.budget, a.policy)
    s = Session(path, cfg)
    s.set_budget(a.budget, protect=conversation_protection(a.budget))  # as Slot._configure
    template, _ = resolve_template(s.info, s.rt)
    doc = sp.document(sp.haystack(s.rt, a.haystack, a.tokens, a.texts), a.depth, a.key)
    messages = [{"role": "user", "content": doc + sp.CHAT_QUESTION}]
    text = template.render(messages, add_generation_prompt=True)
    toks = s.rt.tokenize(text, add_bos=False, special=True)
    count = s.rt.count

    max_q = srv.max_question
    n_q = question_length(chat_question_text(text, messages, count, max_q), len(toks), count, max_q)
    needle = f"The pass key is {a.key}. Remember it. {a.key} is the pass key."
    before = text[:text.index(needle)]
    lo, hi = count(before), count(before + needle)

    def needle_kept() -> float:
        return sum(1 for p in range(lo, hi) if p in s.live) / (hi - lo)

    print(f"prompt {len(toks)} tokens, question {n_q}, needle at {lo}..{hi}, chunk {cfg.chunk}")
    full = Session(path, SessionConfig(budget=len(toks) + 64, policy="none", n_threads=1)) if a.full else None
    fed = seen = 0

    def trace(done: int, total: int) -> None:
        nonlocal fed, seen
        if len(s.stats.evictions) == seen:
            return
        seen = len(s.stats.evictions)
        at = s.stats.evictions[-1].at_token
        line = (f"compression after {at} tokens: needle kept {needle_kept():.0%}, "
                f"probe answered {text_of(s, s.probe_answer)!r}")
        if full is not None:
            full.prefill(toks[fed:at])
            fed = at
            reply = "".join(full.generate(toks[-n_q:], SamplingParams(temperature=0), max_tokens=cfg.answer_lookahead))
            full.truncate(at)
            line += f"; full cache answers {reply!r}"
        print(line, flush=True)

    s.set_question_weight(a.question_weight)
    s.set_question(toks[len(toks) - n_q:])
    s.prefill(toks, progress=trace, turn=False)
    trace(len(toks), len(toks))  # the compression after the last chunk
    if s.recall_on:  # as Slot.run: the question asks back what it needs, its words only (not the template's tail)
        back = s.recall_message(0, s.question, until=s.next_pos - count(chat_tail_text(text, messages)))
        print(f"recall brought back {back} cells: needle kept {needle_kept():.0%}")
    reply = "".join(s.generate([], SamplingParams(temperature=0), max_tokens=16))
    print(f"answer {reply!r} ({'found' if str(a.key) in reply else 'missed'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
