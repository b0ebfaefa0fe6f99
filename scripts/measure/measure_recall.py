#!/usr/bin/env python3
"""Multi-turn recall with and without recall of evicted cells (docs/recall.md).

The bench's multi-turn chats (ea_local/bench/data.py: three facts stated in the first turns, then
turns quoting real prose until --length tokens), streamed through the budget turn by turn (every turn
a user turn: its queries steer the compressions), then one question per fact, each a new turn. Each
(chat, policy, budget) is prefilled once with the archive on (archiving changes no eviction), then
every question is asked twice from the same snapshot: without recall and with it.

    .venv/bin/python scripts/measure/measure_recall.py --model smollm2-135m --chats 7 --length 2048

--facts N (more than 3): the long-memory chat instead, N facts spread evenly over --length tokens of
prose turns (data.long_memory), each asked at the end; --budgets takes cell counts too (2048).

Prints a markdown table (found / asked, 95% Wilson interval, share of the full cache's rate) and the
cost of recall; --json writes every row (after every run, so a stopped run keeps what it measured);
--table A.json B.json prints the table of saved rows (runs split over processes).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

# BLAS threads spinning on a busy 2-core machine made small scoring GEMMs ~30x slower (measured here)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from ea_local import kvhooks  # noqa: E402,F401  (loads llama.cpp before numpy)
from ea_local.bench import data  # noqa: E402
from ea_local.bench.options import BenchOptions  # noqa: E402
from ea_local.engine.snapshot import checkpoint as take, rewind as restore  # noqa: E402
from ea_local.bench.stats import mcnemar_exact, pair, wilson  # noqa: E402
from ea_local.bench.suites.common import session_cfg, skipped, streaming_floor  # noqa: E402
from ea_local.bench.suites.quality import ANSWER_TOKENS, _chat_tokens  # noqa: E402
from ea_local.engine.runtime import ContextConfig, Runtime  # noqa: E402
from ea_local.engine.session import Session, scored_layers  # noqa: E402
from ea_local.model.embedded import resolve_model  # noqa: E402


def ask(s: Session, qt: list[int], recall: bool, budget: int | None, decode_tokens: int = 0) -> tuple[str, dict]:
    """The question as a new turn, 8 greedy answer tokens; then, with decode_tokens, that many more
    timed (decode speed after the turn). Device cells are checked against `budget` after every token
    and against llama.cpp's own count at the end."""
    r0, t_r0, d_r0 = s.stats.recalled, s.stats.recall_s, s.stats.redecode_s
    most = 0
    t0 = time.perf_counter()
    pieces = []
    for piece in s.generate(qt, max_tokens=ANSWER_TOKENS, turn=True, recall=recall):
        pieces.append(piece)
        most = max(most, s.n_cells)
    dt = time.perf_counter() - t0
    cost = {"recalled": s.stats.recalled - r0, "recall_s": s.stats.recall_s - t_r0,
            "redecode_s": s.stats.redecode_s - d_r0, "turn_s": dt}
    if decode_tokens:
        p0, t1 = s.next_pos, time.perf_counter()
        for _ in s.generate([], max_tokens=decode_tokens):
            most = max(most, s.n_cells)
        if s.next_pos > p0:  # an end-of-generation token right away decodes nothing: no speed to report
            cost["decode_s"] = time.perf_counter() - t1
            cost["decode_tok_s"] = (s.next_pos - p0) / cost["decode_s"]
    s.check_cells()  # llama.cpp's cells are the bookkeeping's
    cost.update(cells_after=s.n_cells, cells_max=max(most, s.n_cells))
    if budget is not None and cost["cells_max"] > budget:
        cost["over_budget"] = True
    return "".join(pieces).strip(), cost


def expected_message_scores(queries, q_pos, keys, rope, scale):
    """Recall's alternative scoring, for --scoring expected: per scored layer and KV head, Expected
    Attention of every cell (live and archived, one softmax) under a Gaussian fitted to the message's
    own queries, rotated to the positions after it (policies/expected_attention.py, kvpress' formula,
    without the value norms the archive's digest does not keep); a cell scores its largest over KV
    heads and layers, as the share does."""
    import numpy as np
    from ea_local.policies.expected_attention import expected_attention_layer

    out = None
    for il, k in keys.items():
        k = np.concatenate(list(k)) if isinstance(k, (tuple, list)) else k
        a = expected_attention_layer(queries[il], k, None, rope[il], int(np.max(q_pos)) + 1,
                                     use_vnorm=False, scale=scale).max(axis=0)
        out = a if out is None else np.maximum(out, a)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--chats", type=int, default=7)
    ap.add_argument("--chat-ids", default=None, help="comma-separated chat numbers instead of 0..chats-1")
    ap.add_argument("--length", type=int, default=2048, help="chat tokens before the questions")
    ap.add_argument("--budgets", default="0.25,0.125")
    ap.add_argument("--policies", default="expected-attention,streaming-llm", help="\"\": the full cache only")
    ap.add_argument("--cache-type", default="f16")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recall-max", type=int, default=None, help="most cells a message brings back (default budget/4)")
    ap.add_argument("--skip-full", action="store_true", help="leave out the full-cache runs")
    ap.add_argument("--facts", type=int, default=3, help="more than 3: the long-memory chat with this many facts")
    ap.add_argument("--decode-tokens", type=int, default=0,
                    help="after each answer, decode this many more tokens and time them (recall off and on alternate)")
    ap.add_argument("--scoring-cost", default=None, metavar="N,N",
                    help="only time recall's scoring (message + baseline, pooling) at these archive sizes, alternating")
    ap.add_argument("--scoring", choices=["share", "expected"], default="share",
                    help="recall's scoring: the exact largest attention share (the engine's), or Expected Attention "
                         "with the message's own statistics (compared in docs/recall.md)")
    ap.add_argument("--question-weight", type=float, default=None,
                    help="share of Expected Attention's statistics from the newest message (default: SessionConfig's)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--table", nargs="+", default=None, metavar="JSON", help="print the table of saved rows")
    args = ap.parse_args()
    if args.scoring == "expected":
        import ea_local.engine.session as session_module
        session_module.message_scores = expected_message_scores
    if args.scoring_cost:
        print(scoring_cost(str(resolve_model(args.model)), [int(x) for x in args.scoring_cost.split(",")]))
        return
    if args.table:
        rows = [r for f in args.table for r in json.loads(Path(f).read_text())]
        args.chats = len({(r["chat"], r["length"]) for r in rows if r["policy"] == "full"})
        print(table(rows, args))
        return

    model = str(resolve_model(args.model))
    o = BenchOptions(out=Path("/dev/null"), suites=["multi_turn"], policies=[], budgets=[], model=model,
                     task_length=args.length, cache_type=args.cache_type, threads=args.threads,
                     seed=args.seed)
    rt = Runtime(model, ContextConfig(n_ctx=64, n_gpu_layers=0))
    ids = [int(x) for x in args.chat_ids.split(",")] if args.chat_ids else list(range(args.chats))
    chats = [_chat_tokens(rt, o, i) if args.facts <= 3 else _long_chat(rt, o, i, args.facts) for i in ids]
    rt.close()
    floor = streaming_floor(model)
    rows: list[dict] = []
    fractions = [float(x) for x in args.budgets.split(",")]  # <= 1: a share of the chat; more: cells
    t_start = time.perf_counter()
    for i, (turns, qs) in zip(ids, chats):
        total = sum(map(len, turns))
        runs = [("full", None, total + 256)] * (not args.skip_full) + [
            (p, f, max(1, round(total * f) if f <= 1 else int(f))) for p in args.policies.split(",") if p for f in fractions]
        for pol, frac, cells in runs:
            if why := skipped(floor, cells):
                print(f"chat {i}: {pol} {frac}: skipped ({why})", file=sys.stderr)
                continue
            cfg = session_cfg(o, cells, "streaming-llm" if pol == "full" else pol, chunk=min(256, max(32, cells // 2)))
            cfg.recall = pol != "full"
            cfg.recall_max = args.recall_max
            if args.question_weight is not None:
                cfg.question_weight = args.question_weight
            s = Session(model, cfg)
            for t in turns:
                s.prefill(t, turn=True)
            snap = take(s)
            n_ev = len(s.stats.evictions)
            for qi, (qt, answer) in enumerate(qs):
                for rec in ([False, True] if pol != "full" else [False]):
                    restore(s, snap)
                    reply, cost = ask(s, qt, rec, None if pol == "full" else cells, args.decode_tokens)
                    row = {"chat": i, "length": total, "question": qi, "policy": pol,
                           "budget": "full" if frac is None else f"{100 * frac:g}%" if frac <= 1 else str(cells),
                           "cells": cells, "question_weight": cfg.question_weight,
                           "recall": rec, "evictions": n_ev, "archive": len(snap.archive) if snap.archive else 0,
                           "found": data.answered(answer, reply), "answer": reply, "expected": answer, **cost}
                    rows.append(row)
            s.close()
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
            print(f"chat {i} {pol} {frac}: {n_ev} compressions, "
                  f"{time.perf_counter() - t_start:.0f} s elapsed", file=sys.stderr, flush=True)
    print(table(rows, args))


def _long_chat(rt: Runtime, o: BenchOptions, sample: int, n_facts: int) -> tuple[list[list[int]], list]:
    """The long-memory chat of about o.task_length tokens: as many prose turns as fill it, the facts
    spread over them (the same random draw sized twice: once to count the turns that fit)."""
    paras = data.paragraphs()

    def build(n_filler: int):
        chat = data.long_memory(random.Random(f"long-{o.seed}-{sample}"), n_facts, n_filler, paras)
        toks = [([rt.bos()] if i == 0 and rt.add_bos() else []) + rt.tokenize(t) for i, t in enumerate(chat.turns)]
        return chat, toks

    _, toks = build(4 * n_facts)
    per_turn = sum(map(len, toks)) / len(toks)
    chat, toks = build(max(n_facts, round(o.task_length / per_turn) - n_facts))
    return toks, [(rt.tokenize(q.prompt), q.answer) for q in chat.questions]


def table(rows: list[dict], args) -> str:
    def rate(sel: list[dict]) -> tuple[int, int]:
        return sum(r["found"] for r in sel), len(sel)

    full_rows = [r for r in rows if r["policy"] == "full"]
    full_k, full_n = rate(full_rows)
    full_n = full_n or 1
    full = full_k / full_n if full_n else 0.0
    lo, hi = wilson(full_k, full_n)
    length = sum(r["length"] for r in rows) / max(1, len(rows))
    out = [f"model {args.model}, {args.chats} chats, {full_n} facts, "
           f"{length:.0f} tokens each (mean)", "",
           "| policy | budget | recall | found | 95% interval | of full cache | compressions (mean) | recalled cells (mean) "
           "| score+restore ms (mean) | share of turn | re-decode ms (mean) | share of turn | decode tok/s (median) "
           f"| score+restore share, {ANSWER_TOKENS + args.decode_tokens}-token reply |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
           f"| full | full | - | {full_k}/{full_n} | {lo:.2f}-{hi:.2f} | 1.00 | 0 | - | - | - | - | - | {_tps(full_rows)} | - |"]
    weights = sorted({r.get("question_weight") for r in rows if r["policy"] != "full"}, key=str)

    def group(r: dict) -> tuple:
        return r["policy"], r["budget"], r["recall"], r.get("question_weight")

    keys = sorted({group(r) for r in rows if r["policy"] != "full"},
                  key=lambda k: (k[0], -float(k[1].rstrip("%")), k[2], str(k[3])))
    for pol, b, rec, w in keys:
        sel = [r for r in rows if group(r) == (pol, b, rec, w)]
        if len(weights) > 1:
            pol = f"{pol}, question_weight {w}"
        k, n = rate(sel)
        lo, hi = wilson(k, n)
        ev = sum(r["evictions"] for r in sel) / n
        rc = sum(r["recalled"] for r in sel) / n
        ms = 1000 * sum(r["recall_s"] for r in sel) / n
        turn = max(1e-9, sum(r["turn_s"] for r in sel))
        share = sum(r["recall_s"] for r in sel) / turn
        rd = 1000 * sum(r["redecode_s"] for r in sel) / n
        rd_share = sum(r["redecode_s"] for r in sel) / turn
        over = sum(bool(r.get("over_budget")) for r in sel)
        # the turn with the longer reply --decode-tokens asked for (rows without it: no figure)
        long_turn = sum(r["turn_s"] + r["decode_s"] for r in sel if "decode_s" in r)
        long_share = (f"{100 * sum(r['recall_s'] for r in sel if 'decode_s' in r) / long_turn:.1f}%"
                      if long_turn else "-")
        out.append(f"| {pol} | {b} | {'on' if rec else 'off'} | {k}/{n} | {lo:.2f}-{hi:.2f} | "
                   f"{(k / n) / full if full else 0:.2f} | {ev:.1f} | {rc:.0f} | {ms:.0f} | {100 * share:.1f}% | "
                   f"{rd:.0f} | {100 * rd_share:.1f}% | {_tps(sel)} | {long_share}"
                   + (f" ({over} over budget!)" if over else "") + " |")
    if len(weights) > 1:  # the same facts asked under each weight: exact McNemar against the first
        out += ["", f"Paired on the same facts against question_weight {weights[0]} (exact McNemar: "
                    "this weight only / the other only, two-sided p):", "",
                "| policy | budget | recall | question_weight | found vs | discordant | p |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for pol, b, rec, w in keys:
            if w == weights[0]:
                continue
            this = [r for r in rows if group(r) == (pol, b, rec, w)]
            base = [r for r in rows if group(r) == (pol, b, rec, weights[0])]
            fa, fb = pair(this, base, lambda r: (r["chat"], r["length"], r["question"]))
            t = mcnemar_exact(fa, fb)
            out.append(f"| {pol} | {b} | {'on' if rec else 'off'} | {w} | {t.a_hits}/{t.n} vs {t.b_hits}/{t.n} | "
                       f"{t.a_only} / {t.b_only} | {t.p_value:.3g} |")
    return "\n".join(out)


def scoring_cost(model: str, sizes: list[int], budget: int = 2048, m: int = 16, rounds: int = 5) -> str:
    """Median time of recall's scoring (the message's and the baseline's shares over budget + archive
    keys, contrast, span pooling) with the model's scored layers and shapes, random values (the cost
    does not depend on them), the archive sizes alternating round by round."""
    from ea_local.engine.archive import pool_spans
    from ea_local.engine.recall import contrast, message_scores
    from ea_local.model.info import read_model_info
    from ea_local.model.rope_model import rope_specs
    import numpy as np

    info = read_model_info(model)
    layers = scored_layers(info.global_layers)  # as Session
    rope = rope_specs(info, layers, budget + max(sizes) + 1024)
    rng = np.random.default_rng(0)
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(rounds):
        for n in sizes:
            total = budget + n
            pos = np.arange(total, dtype=np.int64)
            keys = {il: rng.standard_normal((total, info.n_head_kv_per_layer[il], info.head_dims(il)[0]),
                                            dtype=np.float32) for il in layers}
            q = {il: rng.standard_normal((m, info.n_head_per_layer[il], info.head_dims(il)[0]), dtype=np.float32)
                 for il in layers}
            qp = np.arange(total, total + m)
            t0 = time.perf_counter()
            sc = contrast(message_scores(q, qp, keys, rope, info.kq_scale),
                          message_scores(q, qp - m, keys, rope, info.kq_scale))
            pool_spans(pos[:budget], sc[:budget], 8)
            pool_spans(pos[budget:], sc[budget:], 8)
            times[n].append(time.perf_counter() - t0)
    rows = [f"{Path(model).name}: {len(layers)} scored layers, {m} message + {m} baseline queries, {budget} live cells",
            "| archive cells | scoring ms (median of %d) |" % rounds, "| --- | --- |"]
    rows += [f"| {n} | {1000 * sorted(t)[len(t) // 2]:.0f} |" for n, t in times.items()]
    return "\n".join(rows)


def _tps(sel: list[dict]) -> str:
    v = sorted(r["decode_tok_s"] for r in sel if "decode_tok_s" in r)
    return f"{v[len(v) // 2]:.1f}" if v else "-"


if __name__ == "__main__":
    main()
