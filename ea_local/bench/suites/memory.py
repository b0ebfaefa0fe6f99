"""Memory over a long chat: KV bytes held and allocated, and the process RSS, after every turn,
for the full cache and each budget (the first policy: memory does not depend on the policy).

Each configuration runs in a fresh process (multiprocessing, spawn) so RSS is not inflated by the
contexts of the runs before it.
"""
from __future__ import annotations

import multiprocessing as mp
import random
from concurrent.futures import ProcessPoolExecutor
from typing import Callable

from ..options import BenchOptions, chat_full_cells

Tick = Callable[[str], None]


def rss_bytes() -> int:
    """Resident set size now (Linux /proc); elsewhere the peak from getrusage."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def chat_run(o: BenchOptions, policy: str, cells: int) -> list[dict]:
    """One long chat through one budget; runs in a child process."""
    from ...engine.session import Session
    from .. import data
    from .common import session_cfg

    chunk = min(256, max(32, cells // 2))
    s = Session(o.model, session_cfg(o, cells, policy, chunk=chunk))
    chat = data.multi_turn(random.Random(f"memory-{o.seed}"), 1000, data.paragraphs())
    alloc = s.info.kv_cache_bytes(s.rt.n_ctx, o.cache_type, n_ubatch=chunk, swa_full=not s.iswa)
    rows = [{"tokens": 0, "cells": 0, "kv_mib": 0.0, "kv_alloc_mib": alloc / 2**20, "rss_mib": rss_bytes() / 2**20}]
    for i, turn in enumerate(chat.turns):
        s.prefill(([s.rt.bos()] if i == 0 and s.rt.add_bos() else []) + s.rt.tokenize(turn))
        rows.append({"tokens": s.stats.tokens_seen, "cells": s.n_cells, "kv_mib": s.kv_bytes() / 2**20,
                     "kv_alloc_mib": alloc / 2**20, "rss_mib": rss_bytes() / 2**20,
                     "evictions": len(s.stats.evictions)})
        if s.stats.tokens_seen >= o.chat_tokens:
            break
    s.close()
    return rows


def steps(o: BenchOptions) -> int:
    return 1 + len(o.budgets)


def run(o: BenchOptions, tick: Tick) -> list[dict]:
    policy = o.policies[0]
    runs = [("full", "full", chat_full_cells(o))] + [(policy, b.label, b.resolve(o.chat_tokens)) for b in o.budgets]
    from .common import skipped, streaming_floor

    floor = streaming_floor(o.model)
    out = []
    for pol, label, cells in runs:
        if why := skipped(floor, cells):
            out.append({"policy": pol, "budget": label, "cells": cells, "skipped": why, "series": []})
            tick(label)
            continue
        with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as ex:
            series = ex.submit(chat_run, o, "streaming-llm" if pol == "full" else pol, cells).result()
        out.append({"policy": pol, "budget": label, "cells": cells, "series": series})
        tick(label)
    return out
