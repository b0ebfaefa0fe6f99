"""Save and restore a Session after one prefill, so one prefill serves every policy and budget.

kvpress' main protocol compresses once after a full prefill; on a 2-core CPU the prefill is the
expensive part (an 8k context takes about a minute), so each sample is prefilled once, its
sequence state copied out of llama.cpp (llama_state_seq_get_data: the KV cells of seq 0 in every
layer), and restored before each policy x budget trial.
"""
from __future__ import annotations

import copy
import ctypes
from dataclasses import dataclass

import llama_cpp.llama_cpp as ll

from ..engine.runtime import LlamaError
from ..engine.session import Session


@dataclass
class Snapshot:
    data: ctypes.Array
    size: int
    live: dict
    next_pos: int
    queries: dict
    query_pos: object
    focus: dict  # the newest user turn's queries (question-known multi-turn)
    focus_pos: object
    stats: object
    budget: int
    logits: object  # of the last prefilled token: what a lookahead policy (laq) and the sampler read first
    archive: object = None  # the archive of evicted cells (recall), copied
    recalled_count: dict | None = None
    before: dict | None = None  # the focus the newest message replaced (recall's baseline)
    before_pos: object = None


def take(s: Session) -> Snapshot:
    if s.policy.needs_queries and s._n_captured:
        s._pull_queries(keep=s.cfg.stats_window)  # the statistics window belongs to the snapshot
    size = ll.llama_state_seq_get_size(s.rt.ctx, 0)
    buf = (ctypes.c_uint8 * size)()
    n = ll.llama_state_seq_get_data(s.rt.ctx, buf, size, 0)
    if n == 0:
        raise LlamaError("llama_state_seq_get_data copied nothing")
    return Snapshot(buf, n, dict(s.live), s.next_pos, {k: v.copy() for k, v in s.queries.items()},
                    s.query_pos.copy(), {k: v.copy() for k, v in s.focus.items()}, s.focus_pos.copy(),
                    copy.deepcopy(s.stats), s.cfg.budget, s.rt.logits(),
                    s.archive.copy() if s.archive is not None else None, dict(s.recalled_count),
                    {k: v.copy() for k, v in s.before.items()}, s.before_pos.copy())


def restore(s: Session, snap: Snapshot) -> None:
    s.rt.clear()
    s.rt.capture_clear()
    if ll.llama_state_seq_set_data(s.rt.ctx, snap.data, snap.size, 0) == 0:
        raise LlamaError("llama_state_seq_set_data could not restore the sequence")
    s.live = dict(snap.live)
    s.next_pos = snap.next_pos
    s.queries = {k: v.copy() for k, v in snap.queries.items()}
    s.query_pos = snap.query_pos.copy()
    s.focus = {k: v.copy() for k, v in snap.focus.items()}
    s.focus_pos = snap.focus_pos.copy()
    s.before = {k: v.copy() for k, v in (snap.before or {}).items()}
    s.before_pos = snap.before_pos.copy() if snap.before_pos is not None else s.focus_pos[:0].copy()
    s._n_captured = 0
    s.stats = copy.deepcopy(snap.stats)
    s.cfg.budget = snap.budget
    s.rt.set_logits(snap.logits)
    if snap.archive is not None and s.archive is not None:
        s.archive = snap.archive.copy()
        s.recalled_count = dict(snap.recalled_count or {})
