#!/usr/bin/env python3
"""The levers of Expected Attention (statistics, recent window, pooling, aggregation), measured on
held-out data (docs/quality.md, "Levers").

    .venv/bin/python scripts/measure/measure_levers.py --part ppl|passkey|all [--out docs/quality/levers.jsonl]

ppl: perplexity of held-out licence text (bench.data.HELD_OUT, not the reported GPL text; --ppl-text
reported for that one) at 12.5% and 25% for the protected recent window, the statistics window, pooling and n_future_positions.
passkey: the question-agnostic one-shot pass key (8k filler -> 25%, kvpress' protocol) at depths and a
seed the reported run does not use, one prefill per depth shared by every setting (bench snapshot).
One JSON line per measurement, appended to --out. Every "ea" setting is Expected Attention with
aggregate="mean" plus the one change its name says.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

from ea_local.bench.quality import as_dict, perplexity  # ea_local first: libllama before numpy
from ea_local.bench.data import HELD_OUT, LICENSES, real_text
from ea_local.engine.snapshot import checkpoint, rewind
from ea_local.bench.suites.common import ask
from ea_local.bench.data import answered, passkey_prompt
from ea_local.engine.session import Session, SessionConfig
from ea_local.engine.windows import QueryWindow
from ea_local.model.info import read_model_info
from ea_local.model.embedded import default_model_path
import numpy as np
from rows import jsonl_emitter  # scripts/measure/rows.py

# name -> Session settings (recent, prefill_stats) and EA options; "policy" swaps in a baseline
PPL_SETTINGS = {
    "streaming-llm": {"policy": "streaming-llm"},
    "ea": {},
    "ea recent 256": {"recent": 256},
    "ea stats last 128": {"prefill_stats": 128},
    "ea pool 5": {"opts": {"kernel_size": 5}},
    "ea n_future 128": {"opts": {"n_future_positions": 128}},
    "ea aggregate share": {"opts": {"aggregate": "share"}},
    "ea aggregate union": {"opts": {"aggregate": "union"}},
    "ea recent 256 + stats 128": {"recent": 256, "prefill_stats": 128},
}  # + "ea layer L only" for each global layer L
# name -> statistics window ("all": every context query, kvpress' own choice; N: the last N) and EA options
PASSKEY_SETTINGS = {
    "ea": {},
    "ea stats all context queries": {"stats": "all"},
    "ea stats last 128": {"stats": 128},
    "ea pool 5": {"opts": {"kernel_size": 5}},
    "ea pool 3": {"opts": {"kernel_size": 3}},
    "ea n_future 2048": {"opts": {"n_future_positions": 2048}},
    "ea no value norm": {"opts": {"use_vnorm": False}},
    "ea aggregate max": {"opts": {"aggregate": "max"}},
    "ea aggregate share": {"opts": {"aggregate": "share"}},
    "ea aggregate union": {"opts": {"aggregate": "union"}},
    "ea n_future 16": {"opts": {"n_future_positions": 16}},
}  # + "ea layer L only" for each scored layer L


def _opts(setting: dict) -> dict:
    """EA options of a setting: mean over layers, no pooling, unless it names another (baselines: none)."""
    if setting.get("policy", "expected-attention") != "expected-attention":
        return {}
    return {"aggregate": "mean", "kernel_size": 1, **setting.get("opts", {})}


def ppl_part(model: str, n: int, fracs: list[float], threads: int | None, emit, only: set[str],
             text_name: str) -> None:
    text = real_text(HELD_OUT if text_name == "held-out" else LICENSES)
    settings = dict(PPL_SETTINGS, **{f"ea layer {il} only": {"opts": {"layers": [il]}}
                                     for il in read_model_info(model).global_layers})
    if not only or "full" in only:
        full = perplexity(model, "streaming-llm", n + 512, n, n // 2, text=text, n_threads=threads)
        emit({"part": "ppl", "text": text_name, "setting": "full", **as_dict(full)})
    for frac in fracs:
        for name, st in settings.items():
            if only and name not in only:
                continue
            r = perplexity(model, st.get("policy", "expected-attention"), int(n * frac), n, n // 2, text=text,
                           recent=st.get("recent", 64), prefill_stats=st.get("prefill_stats"),
                           policy_options=_opts(st), n_threads=threads)
            emit({"part": "ppl", "text": text_name, "setting": name, "fraction": frac, **as_dict(r)})


def passkey_part(model: str, length: int, frac: float, depths: list[float], seed: int, threads: int | None,
                 emit, only: set[str]) -> None:
    chunk = 512
    s = Session(model, SessionConfig(budget=length + 256, chunk=chunk, n_threads=threads))
    cells = int(length * frac)
    settings = dict(PASSKEY_SETTINGS, **{f"ea layer {il} only": {"opts": {"layers": [il]}} for il in s.layers})
    settings = {k: v for k, v in settings.items() if not only or k in only}
    for d in depths:
        key = random.Random(seed * 1000 + int(d * 100) + length).randint(10000, 99999)
        ctx, question, span = passkey_prompt(s.rt, length, d, key)
        s.reset()
        s.set_policy("expected-attention")
        every_q: dict[int, list[np.ndarray]] = {}
        every_pos = []
        split = max(0, len(ctx) - chunk)  # as the bench does: the last chunk is a full one
        for start, end in [(a, min(a + chunk, split)) for a in range(0, split, chunk)] + [(split, len(ctx))]:
            part = ctx[start:end]  # each chunk's queries become the statistics window
            s.prefill(part)
            for il, q in s.queries.last(len(part)).q.items():
                every_q.setdefault(il, []).append(q)
            every_pos.append(s.queries.last(len(part)).pos)
        snap = checkpoint(s)
        for name, st in settings.items():
            rewind(s, snap)
            s.set_policy("expected-attention", **_opts(st))
            if st.get("stats") == "all":
                s.set_statistics(QueryWindow({il: np.concatenate(qs) for il, qs in every_q.items()}, np.concatenate(every_pos)))
            elif st.get("stats"):
                s.set_statistics(s.queries.last(st["stats"]))
            s.set_one_shot_budget(cells)
            s.compress(cells, phase="prefill")
            kept = sum(1 for p in range(*span) if p in s.live) / (span[1] - span[0])
            reply = ask(s, question, 8)
            emit({"part": "passkey", "setting": name, "length": len(ctx), "cells": cells, "depth": d, "seed": seed,
                  "found": answered(str(key), reply), "needle_kept": kept, "answer": reply})
    s.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["ppl", "passkey", "all"], default="all")
    ap.add_argument("--out", type=Path, default=Path("docs/quality/levers.jsonl"))
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--fracs", default="0.125,0.25")
    ap.add_argument("--ppl-text", choices=["held-out", "reported"], default="held-out",
                    help="held-out licences (settings are chosen on these) or GPL-3 + GPL-2 (reported)")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--depths", default="0.05,0.15,0.25,0.4")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", default="", help="comma list of setting names to run (default: all)")
    a = ap.parse_args()
    model = str(default_model_path())
    only = {x.strip() for x in a.only.split(",") if x.strip()}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    emit = jsonl_emitter(a.out)

    if a.part in ("ppl", "all"):
        ppl_part(model, a.ppl_tokens, [float(f) for f in a.fracs.split(",")], a.threads, emit, only, a.ppl_text)
    if a.part in ("passkey", "all"):
        passkey_part(model, a.length, 0.25, [float(d) for d in a.depths.split(",")], a.seed, a.threads, emit, only)


if __name__ == "__main__":
    main()
