"""Quality under a budget: pass key (length x depth), multi-key needle, variable tracking,
multi-turn recall and perplexity of real text.

One-shot tasks (pass key, needle, variable tracking) follow kvpress' main protocol: the whole
context is prefilled, compressed once to the budget, then the question is asked — one prefill per
sample serves every policy, budget and question (snapshot.py). Multi-turn recall and perplexity
stream through the budget (compression after every turn / chunk, as a chat or a long read does),
so they cannot share a prefill and cost one pass per policy x budget.
"""
from __future__ import annotations

import math
import random
import time
from typing import Callable

from ...engine.runtime import ContextConfig, Runtime
from ...engine.session import Session
from ..data import FILLER, answered, passkey_prompt
from .. import quality as q_mod
from .. import corpus, data
from ..options import BenchOptions, one_shot_cells, ppl_full_cells
from ...engine.snapshot import checkpoint, rewind
from .common import ask, compress_question_known, session_cfg, skipped, streaming_floor

ANSWER_TOKENS = 8
PREFILL_POLICY = "expected-attention"  # session_cfg's default; needs queries, so they are captured
Tick = Callable[[str], None]


def _trials(o: BenchOptions, s: Session, ctx: list[int], questions: list[tuple[list[int], str]],
            base: dict, span: tuple[int, int] | None, tick: Tick) -> list[dict]:
    """Prefill ctx once, then every (question, policy, budget, mode) from a restored snapshot."""
    s.set_policy(PREFILL_POLICY)  # captures queries: the statistics window of the snapshot
    # the last prefill chunk's queries are the statistics: make it a full chunk, not a short remainder
    split = max(0, len(ctx) - s.cfg.chunk)
    if split:
        s.prefill(ctx[:split])
    s.prefill(ctx[split:])
    snap = checkpoint(s)
    rows = []
    for qi, (qt, answer) in enumerate(questions):
        rewind(s, snap)
        reply = ask(s, qt, ANSWER_TOKENS)
        rows.append({**base, "context": len(ctx), "question": qi, "policy": "full", "budget": "full", "cells": len(ctx),
                     "mode": "none", "found": answered(answer, reply), "answer": reply, "expected": answer,
                     "needle_kept": 1.0 if span else None})
        tick("full")
        for pol in o.policies:
            for b in o.budgets:
                cells = b.resolve(len(ctx))
                for mode in o.modes:
                    rewind(s, snap)
                    s.set_policy(pol)
                    # a policy may size its eviction from the budget (context-shift)
                    s.set_one_shot_budget(cells, recent=min(64, cells // 8))
                    t0 = time.perf_counter()
                    if mode == "agnostic":
                        s.compress(cells, phase="prefill")
                    else:
                        compress_question_known(s, qt, cells)
                    t_comp = time.perf_counter() - t0
                    n_after = s.n_cells
                    # a shifting policy renumbers positions: the needle's span no longer names its cells
                    kept = (sum(1 for p in range(*span) if p in s.live) / (span[1] - span[0])
                            if span and not s.policy.shift else None)
                    reply = ask(s, qt, ANSWER_TOKENS)
                    rows.append({**base, "context": len(ctx), "question": qi, "policy": pol, "budget": b.label, "cells": cells,
                                 "mode": mode, "found": answered(answer, reply), "answer": reply, "expected": answer,
                                 "needle_kept": kept, "compress_s": t_comp, "cells_after": n_after})
                    tick(f"{pol} {b.label}")
    return rows


def _room(o: BenchOptions, n: int) -> Session:
    cfg = session_cfg(o, one_shot_cells(n))
    cfg.prefill_stats = None
    return Session(o.model, cfg)


def n_trials(o: BenchOptions, n_questions: int) -> int:
    return n_questions * (1 + len(o.policies) * len(o.budgets) * len(o.modes))


def _prose_tokens(rt: Runtime, texts: str, start: int, n: int) -> list[int]:
    """At least n tokens of the text set beginning with its document `start` (all of it if shorter)."""
    full = corpus.text(texts, start=start)
    cut = 8 * n  # characters: far more than n tokens of English (about 4 per token), far less than the set
    toks = rt.tokenize(full[:cut], add_bos=False, special=False)
    return toks if len(toks) >= n or cut >= len(full) else rt.tokenize(full, add_bos=False, special=False)


def trial_rng(o: BenchOptions, seed: int | str) -> random.Random:
    """A trial's random stream (keys, needles, their positions). The filler haystack is the same
    text in every set, so a set other than the reporting one salts the stream with its name: the
    trials settings are chosen on are not the trials they are reported on. The reporting set keeps
    the unsalted streams its published rows were drawn from."""
    return random.Random(seed if o.texts == "reporting" else f"{o.texts}-{seed}")


def passkey_key(o: BenchOptions, length: int, depth: float, k: int) -> int:
    return trial_rng(o, o.seed * 1000 + int(depth * 100) + length + 7919 * k).randint(10000, 99999)


def passkey(o: BenchOptions, tick: Tick) -> list[dict]:
    """length x haystack x key (seed) x depth trials; key k of a prose haystack hides in the text set
    beginning with its document k, so the keys read different documents."""
    rows = []
    for length in o.lengths:
        s = _room(o, length)
        for hay_kind in o.haystack_list():
            for k in range(o.seeds):
                hay = _prose_tokens(s.rt, o.texts, k, length) if hay_kind == "prose" else None
                for d in o.depths:
                    key = passkey_key(o, length, d, k)
                    ctx, question, span = passkey_prompt(s.rt, length, d, key, haystack=hay)
                    base = {"length": length, "depth": d, "seed": k, "haystack": hay_kind}
                    rows += _trials(o, s, ctx, [(question, str(key))], base, span, tick)
                    s.reset()
        s.close()
    return rows


def _haystack(rt: Runtime, kind: str, n_tokens: int, start: int = 0, texts: str = "reporting") -> list[str]:
    """Units of text (the filler sentence repeated, or paragraphs of real prose from the named text
    set, beginning with its document `start`) of about n_tokens."""
    if kind == "filler":
        return [FILLER] * max(1, n_tokens // len(rt.tokenize(FILLER)))
    units, total = [], 0
    for p in corpus.paragraphs(texts, start=start):
        if total >= n_tokens:
            break
        units.append(p + "\n\n")
        total += len(rt.tokenize(units[-1], add_bos=False, special=False))
    return units


def make_task(o: BenchOptions, name: str, rng: random.Random, hay: list[str]) -> data.Task:
    if name == "multikey":
        return data.multikey_needle(rng, hay, n_keys=o.multikey_keys)
    return data.variable_tracking(rng, hay, n_hops=o.vt_hops, n_chains=o.vt_chains, style=o.vt_style)


def one_shot_task(o: BenchOptions, name: str, tick: Tick) -> list[dict]:
    """multikey (RULER niah_multikey) or variable_tracking (RULER vt): task_samples documents per
    haystack; document i of a prose haystack begins with the text set's document i."""
    rows = []
    s = _room(o, o.task_length + 128)
    bos = [s.rt.bos()] if s.rt.add_bos() else []
    for hay_kind in o.haystack_list():
        for i in range(o.task_samples):
            rng = trial_rng(o, f"{name}-{o.seed}-{i}")
            hay = _haystack(s.rt, hay_kind, o.task_length - 128, start=i, texts=o.texts)
            task = make_task(o, name, rng, hay)
            ctx = bos + s.rt.tokenize(task.context)
            qs = [(s.rt.tokenize(q.prompt), q.answer) for q in task.questions]
            rows += _trials(o, s, ctx, qs, {"length": len(ctx), "sample": i, "haystack": hay_kind}, None, tick)
            s.reset()
    s.close()
    return rows


def task_questions(o: BenchOptions, name: str) -> int:
    return o.multikey_keys if name == "multikey" else o.vt_chains  # one question per needle / chain


def _chat_tokens(rt: Runtime, o: BenchOptions, sample: int) -> tuple[list[list[int]], list[tuple[list[int], str]]]:
    chat = data.multi_turn(trial_rng(o, f"chat-{o.seed}-{sample}"), 400, data.paragraphs())
    turns, total = [], 0
    for i, t in enumerate(chat.turns):
        toks = ([rt.bos()] if i == 0 and rt.add_bos() else []) + rt.tokenize(t)
        turns.append(toks)
        total += len(toks)
        if total >= o.task_length:
            break
    return turns, [(rt.tokenize(q.prompt), q.answer) for q in chat.questions]


def multi_turn(o: BenchOptions, tick: Tick) -> list[dict]:
    """Facts in the first turns, then prose turns until task_length tokens, then one question per fact,
    each a new turn of the chat under the same budget. Question-known mode: every turn is a user turn
    whose queries steer the compressions (Session.prefill(turn=True), as `ea-local chat` does), the
    question's too, and each question is asked twice from the same state: as it was, and with recall
    (the chat's default, docs/recall.md: the question brings back archived cells it needs; mode
    "question+recall"); agnostic: the context's queries alone (question_weight 0)."""
    rows = []
    rt = Runtime(o.model, ContextConfig(n_ctx=64, n_gpu_layers=0))
    chats = [_chat_tokens(rt, o, i) for i in range(o.task_samples)]
    rt.close()
    floor = streaming_floor(o.model)
    for i, (turns, qs) in enumerate(chats):
        total = sum(map(len, turns))
        runs = [("full", None, one_shot_cells(total), "agnostic")] + \
            [(p, b, b.resolve(total), m) for p in o.policies for b in o.budgets for m in o.modes]
        for pol, b, cells, mode in runs:
            label = "full" if b is None else b.label
            if why := skipped(floor, cells):
                rows.append({"sample": i, "policy": pol, "budget": label, "cells": cells, "mode": mode, "skipped": why})
                tick(f"{pol} {label} skipped")
                continue
            cfg = session_cfg(o, cells, "streaming-llm" if pol == "full" else pol, chunk=min(256, max(32, cells // 2)))
            if mode == "agnostic":
                cfg.question_weight = 0.0
            cfg.recall = mode == "question" and pol != "full"  # archiving changes no eviction
            s = Session(o.model, cfg)
            for t in turns:
                s.prefill(t, turn=mode == "question")
            snap = checkpoint(s)
            n_ev = len(s.stats.evictions)
            for qi, (qt, answer) in enumerate(qs):
                for rec in (False, True) if s.recall_on else (False,):
                    rewind(s, snap)
                    r0 = s.stats.recalled
                    reply = "".join(s.generate(qt, max_tokens=ANSWER_TOKENS, turn=True, recall=rec)).strip()
                    rows.append({"sample": i, "length": total, "turns": len(turns), "question": qi, "policy": pol,
                                 "budget": label, "cells": cells, "mode": mode + "+recall" * rec, "evictions": n_ev,
                                 "recalled": s.stats.recalled - r0,
                                 "found": answered(answer, reply), "answer": reply, "expected": answer})
            s.close()
            tick(f"{pol} {label} {mode}")
    return rows


def ppl_windows(o: BenchOptions) -> list[tuple[str, list[int]]]:
    """ppl_docs windows of BOS + ppl_tokens tokens, cut one after another from the text set's documents
    read in a row (GPL-3, then GPL-2, ... for the reporting set), so a window may span two documents
    (as wikitext perplexity spans articles). Each window is labelled with the documents it covers."""
    n = o.ppl_tokens
    rt = Runtime(o.model, ContextConfig(n_ctx=64, n_gpu_layers=0))
    try:
        bos = [rt.bos()] if rt.add_bos() else []
        per_doc = [(d.name, rt.tokenize(d.text, add_bos=False, special=False)) for d in corpus.documents(o.texts)]
    finally:
        rt.close()
    toks = [t for _, ts in per_doc for t in ts]
    owner = [name for name, ts in per_doc for _ in ts]
    body = n + 1 - len(bos)
    if len(toks) < o.ppl_docs * body:
        raise ValueError(f"the {o.texts} texts have {len(toks):,} tokens, fewer than {o.ppl_docs} windows of {n}")
    out = []
    for j in range(o.ppl_docs):
        span = slice(j * body, (j + 1) * body)
        out.append((" + ".join(dict.fromkeys(owner[span])), bos + toks[span]))
    return out


def perplexity(o: BenchOptions, tick: Tick) -> list[dict]:
    """Every window streamed through every (policy, budget); one row per (policy, budget) with the
    pooled NLL and each window's sums, the units of the report's bootstrap interval."""
    n = o.ppl_tokens
    windows = ppl_windows(o)
    runs = [("full", None, ppl_full_cells(o))] + [(p, b, b.resolve(n)) for p in o.policies for b in o.budgets]
    rows = []
    floor = streaming_floor(o.model)
    for pol, b, cells in runs:
        label = "full" if b is None else b.label
        if why := skipped(floor, cells):
            rows.append({"policy": pol, "budget": label, "cells": cells, "skipped": why})
            for _ in windows:
                tick(f"{pol} {label} skipped")
            continue
        cfg = session_cfg(o, cells)
        per = []
        for doc, toks in windows:
            r = q_mod.perplexity(o.model, "streaming-llm" if pol == "full" else pol, cells, n, n // 2,
                                 chunk=min(256, max(32, cells // 2)), tokens=toks, recent=cfg.recent, step=cfg.step,
                                 cache_type=o.cache_type, n_threads=o.threads, n_gpu_layers=o.n_gpu_layers,
                                 seed=o.seed, rpc=o.rpc)
            per.append({"doc": doc, "nll_sum": sum(r.chunk_nll), "n": sum(r.chunk_n),
                        "chunk_nll": r.chunk_nll, "chunk_n": r.chunk_n})
            tick(f"{pol} {label} {doc}")
        nll = sum(w["nll_sum"] for w in per) / sum(w["n"] for w in per)
        rows.append({"policy": pol, "budget": label, "cells": cells, "n_tokens": n, "eval_from": n // 2,
                     "nll": nll, "ppl": math.exp(nll), "windows": per})
    full = rows[0]["ppl"]
    for r in rows:
        if "ppl" in r:
            r["delta_ppl"] = r["ppl"] - full
    return rows


def steps(o: BenchOptions) -> dict[str, int]:
    """Progress units of each part, for the progress bars."""
    per_policy = 1 + len(o.policies) * len(o.budgets)
    hays = len(o.haystack_list())
    return {"passkey": len(o.lengths) * hays * o.seeds * len(o.depths) * n_trials(o, 1),
            "multikey": hays * o.task_samples * n_trials(o, task_questions(o, "multikey")),
            "variable_tracking": hays * o.task_samples * n_trials(o, task_questions(o, "variable_tracking")),
            "multi_turn": o.task_samples * n_trials(o, 1),  # one session per policy x budget x mode
            "perplexity": per_policy * o.ppl_docs}


# the order a run measures them in: the headline's figures (pass key, perplexity) first
PARTS = {"passkey": passkey,
         "perplexity": perplexity,
         "multikey": lambda o, tick: one_shot_task(o, "multikey", tick),
         "variable_tracking": lambda o, tick: one_shot_task(o, "variable_tracking", tick),
         "multi_turn": multi_turn}
