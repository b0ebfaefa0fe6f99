"""`ea-local summarize FILE|-`: read a long document through the KV budget, then summarize it.

The document is prefilled in chunks with compression after each one (Session.prefill), so a
text many times the budget fits; an explicit `--prompt` is known before the document is read, so
it steers every compression (Session.set_question; `--question-agnostic` turns that off); the
instruction comes after the document, inside the recent window that is never evicted, and the
answer streams to stdout or to `-o FILE` (written to a temporary file and renamed at the end: an interrupted run leaves no partial file).
"""
from __future__ import annotations

import os
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..engine.session import Session, SessionConfig
from .chat import ChatError, ChatOptions, fmt_mib, read_text_file, session_config, valid_utf8
from ..model.chat_template import TurnRenderer, resolve_template
from ..policies import get_policy

DEFAULT_INSTRUCTION = "Summarize the document above in a few sentences."
SUMMARIZE_OPENING = 32  # protected first cells at most (chat: a quarter of the budget, at most 64)


@dataclass
class SummarizeOptions(ChatOptions):
    prompt: str | None = None
    output: str | None = None
    verbose: bool = False


def _check_output(output: str | None) -> None:
    if not output:
        return
    p = Path(output)
    if p.is_dir():
        raise ChatError(f"-o {output}: is a directory")
    parent = p.resolve().parent
    if not parent.is_dir():
        raise ChatError(f"-o {output}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ChatError(f"-o {output}: directory {parent} is not writable")


def summarize_config(opts: SummarizeOptions) -> SessionConfig:
    """chat's settings with a smaller opening: on an instruct model the template's system part and the
    document's first lines are what a small budget loses first (at 128 cells kvpress' 4 sinks lost
    every pass key), but the instruction comes after the document, so the opening needs no room for
    it, and from 256 cells chat's 64 took keys the scores would have kept (docs/bench-report.md,
    "`summarize` protects the opening"). Recall only with a question, the one thing that can say which
    evicted cells it needs."""
    cfg = session_config(opts)
    cfg.n_sink = min(SUMMARIZE_OPENING, cfg.n_sink)
    cfg.recall = cfg.recall and bool(opts.prompt)
    cfg.validate()
    return cfg


def run_summarize(info, source: str, opts: SummarizeOptions) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    text = read_text_file(source)
    _check_output(opts.output)
    cfg = summarize_config(opts)
    get_policy(opts.policy)
    err = Console(stderr=True)
    s = Session(str(info.path), cfg)
    tmp = None
    try:
        template, notice = resolve_template(info, s.rt)
        if notice:
            print(notice + ("; expect a continuation more than a summary" if template.origin == "plain" else ""),
                  file=sys.stderr, flush=True)
        turns = TurnRenderer(template)
        prefix = turns.prefix()
        _, tail = turns.split()
        rt = s.rt
        head = rt.prompt_tokens(prefix)
        doc = head + rt.tokenize(text.strip(), add_bos=False, special=False)
        question = rt.tokenize("\n\n" + valid_utf8(opts.prompt or DEFAULT_INSTRUCTION) + tail, add_bos=False, special=True)
        if opts.prompt and not opts.question_agnostic:
            s.set_question(question[max(0, len(question) - s.max_question):])  # the question steers what is kept

        t0 = time.perf_counter()
        with Progress(TextColumn("reading"), BarColumn(), TextColumn("{task.completed}/{task.total} tokens"),
                      TextColumn("{task.fields[tps]:.0f} tok/s"), TextColumn("{task.fields[cells]} cells"),
                      TextColumn("{task.fields[ev]} evictions"), TimeElapsedColumn(), console=err,
                      disable=not err.is_terminal, transient=True) as bar:
            task = bar.add_task("read", total=len(doc), cells=0, tps=0.0, ev=0)

            def progress(done: int, total: int) -> None:
                dt = time.perf_counter() - t0
                bar.update(task, completed=done, cells=s.n_cells, tps=done / dt if dt > 0 else 0.0,
                           ev=len(s.stats.evictions))

            s.prefill(doc, progress=progress)
        t_read = time.perf_counter() - t0

        if opts.output:
            fd, tmp = tempfile.mkstemp(prefix=".ea-local-summary-", suffix=".tmp",
                                       dir=str(Path(opts.output).resolve().parent))
            sink = os.fdopen(fd, "w", encoding="utf-8")
        else:
            sink = sys.stdout
        params = opts.sampling(opts.seed if opts.seed is not None else secrets.randbits(31))
        started = False
        pieces = []
        t1 = time.perf_counter()
        n0 = s.stats.tokens_seen
        start = s.next_pos
        s.prefill(question, turn=s.recall_on and not s.question)  # a probed question is read as context, as in chat
        if s.recall_on:
            # the question brings back the evicted cells it needs, asked by the user's words as in chat: not by
            # the template's tail, nor by the greedy answer of a probe made while the question was read
            # (docs/recall.md, "The template's tail"; docs/bench-report.md, "`summarize` recalls with the question's words")
            s.recall_message(start, question, until=s.next_pos - rt.count(tail))
        for piece in s.generate([], params, stop=list(template.stop), max_tokens=opts.max_tokens):
            if not started:
                piece = piece.lstrip()
                if not piece:
                    continue
                started = True
            pieces.append(piece)
            sink.write(piece)
            sink.flush()
        sink.write("\n")
        t_gen = time.perf_counter() - t1
        if opts.output:
            sink.close()
            os.replace(tmp, opts.output)
            tmp = None
        else:
            sys.stdout.flush()
        ev = s.stats.evictions
        res = {"doc_tokens": len(doc), "cells": s.n_cells, "budget": s.cfg.budget, "evictions": len(ev),
               "evicted": sum(e.n_evicted for e in ev), "read_s": t_read, "gen_s": t_gen,
               "generated": s.stats.tokens_seen - n0 - len(question), "summary": "".join(pieces)}
        if opts.verbose or err.is_terminal:
            full = s.kv_bytes(max(s.stats.tokens_seen, s.n_cells))
            print(f"read {len(doc)} tokens in {t_read:.1f} s ({len(doc) / max(t_read, 1e-9):.0f} tok/s) through "
                  f"{s.cfg.budget} cells: {len(ev)} evictions, {res['evicted']} cells evicted, {s.n_cells} kept; "
                  f"KV {fmt_mib(s.kv_bytes())} (full cache {fmt_mib(full)}); {res['generated']} tokens generated"
                  + (f"; written to {opts.output}" if opts.output else ""), file=sys.stderr)
        return res
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        s.close()
