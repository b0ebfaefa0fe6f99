"""The main job (`ea-local demo`): a long document read through a small KV budget.

A pass key is hidden in a long filler text; the document is prefilled in chunks with
eviction, then the model is asked for the key. It prints what was kept and evicted, the
memory saved and the answer.
"""
from __future__ import annotations

import random
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..bench.data import answered, passkey_prompt
from ..engine.session import Session, SessionConfig

def run_demo(info, budget: int, policy: str, length: int, cache_type: str, seed: int,
             threads: int | None, n_gpu_layers: int | None, rpc: tuple[str, ...] = (),
             question_agnostic: bool = False) -> dict:
    if length < 1:
        raise ValueError(f"length must be a positive number of tokens, got {length}")
    con = Console(stderr=False)
    err = Console(stderr=True)
    cfg = SessionConfig(budget=budget, policy=policy, cache_type=cache_type, seed=seed,
                        n_threads=threads, n_gpu_layers=n_gpu_layers, chunk=min(512, budget // 2), rpc=rpc)
    s = Session(info.path, cfg)
    key = random.Random(seed).randint(10000, 99999)
    ctx, question, span = passkey_prompt(s.rt, length, 0.4, key)
    con.print(f"[bold]ea-local demo[/]: {info.architecture} {info.file_type or ''} "
              f"({info.path.split('/')[-1]}), budget {budget} cells, policy {policy}, KV cache {cache_type}")
    if not info.has_chat_template:
        con.print("note: this is a base model (no chat template): it continues text rather than chatting")
    if not question_agnostic:  # the question comes with the document: it steers what is kept
        s.set_question(question)
    con.print(f"reading {len(ctx)} tokens with a pass key at depth 40% (tokens {span[0]}..{span[1] - 1}); the "
              + ("question is asked after reading" if question_agnostic else "question is known while reading"))
    t0 = time.perf_counter()
    with Progress(TextColumn("prefill"), BarColumn(), TextColumn("{task.completed}/{task.total} tokens"),
                  TextColumn("{task.fields[cells]} cells"), TimeElapsedColumn(), console=err,
                  disable=not err.is_terminal) as bar:
        task = bar.add_task("prefill", total=len(ctx), cells=0)
        s.prefill(ctx, progress=lambda done, total: bar.update(task, completed=done, cells=s.n_cells))
    t_prefill = time.perf_counter() - t0
    kept_needle = sum(1 for p in range(*span) if p in s.live)
    answer = "".join(s.generate(question, max_tokens=8)).strip()
    found = answered(str(key), answer)

    tab = Table(show_header=False)
    tab.add_row("tokens read", str(len(ctx) + len(question)))
    tab.add_row("cells kept (budget)", f"{s.n_cells} ({budget})")
    tab.add_row("evictions", f"{len(s.stats.evictions)} events, {sum(e.n_evicted for e in s.stats.evictions)} cells")
    tab.add_row("needle tokens kept", f"{kept_needle}/{span[1] - span[0]}")
    full = s.kv_bytes(s.next_pos) if not s.iswa else (
        s.next_pos * s.info.kv_bytes_per_token_for(cache_type).total)
    tab.add_row("KV memory", f"{s.kv_bytes() / 2**20:.1f} MiB (full cache: {full / 2**20:.1f} MiB, "
                             f"{100 * (1 - s.kv_bytes() / full):.0f}% saved)")
    tab.add_row("scoring time", f"{sum(e.score_s for e in s.stats.evictions):.2f} s of {t_prefill:.1f} s prefill")
    tab.add_row("pass key", str(key))
    tab.add_row("model's answer", repr(answer) + ("  [green]found[/]" if found else "  [red]not found[/]"))
    con.print(tab)
    s.close()
    return {"found": found, "answer": answer, "key": key, "kept_needle": kept_needle}
