"""How long a bench run's quality parts will take, from a short calibration on this machine.

Cost model (CPU seconds of this process, so a busy machine does not inflate the calibration; on a
shared machine the run takes longer by the load it shares with): a one-shot sample costs its prefill (tokens / prefill rate) plus, per trial,
a restore + compression (proportional to the context's cells) and an 8-token answer; a streaming
pass (perplexity, multi-turn recall) costs its tokens at the streaming rate, which includes the
compressions and, for perplexity, the vocabulary-wide log-softmax of the scored tokens.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from .options import BenchOptions

CALIB_TOKENS = 512


@dataclass
class Costs:
    prefill_s_per_token: float  # one-shot prefill with query capture
    compress_s_per_cell: float  # restore + one compression, per cell of the context
    answer_s: float  # asking the question and 8 greedy tokens
    stream_s_per_token: float  # perplexity: streamed through a budget, half the tokens scored


def calibrate(o: BenchOptions) -> Costs:
    """About 10-30 s on a 2-core CPU: a 512-token prefill, 3 trials and a 512-token perplexity pass."""
    from ..engine.session import Session
    from . import quality as q_mod
    from ..engine.snapshot import checkpoint, rewind
    from .suites.common import ask, session_cfg
    from . import corpus

    cfg = session_cfg(o, CALIB_TOKENS + 256)
    cfg.prefill_stats = None
    s = Session(o.model, cfg)
    try:
        toks = ([s.rt.bos()] if s.rt.add_bos() else []) + s.rt.tokenize(corpus.text(o.texts)[:4 * CALIB_TOKENS * 4])
        toks = toks[:CALIB_TOKENS]
        s.set_policy("expected-attention")
        t0 = time.process_time()
        s.prefill(toks)
        prefill = (time.process_time() - t0) / len(toks)
        snap = checkpoint(s)
        question = s.rt.tokenize(" What is the pass key? The pass key is")
        comp, ans = [], []
        for _ in range(3):
            t0 = time.process_time()
            rewind(s, snap)
            s.set_one_shot_budget(len(toks) // 4)
            s.compress(len(toks) // 4, phase="prefill")
            t1 = time.process_time()
            ask(s, question, 8)
            comp.append(t1 - t0)
            ans.append(time.process_time() - t1)
    finally:
        s.close()
    n = CALIB_TOKENS
    t0 = time.process_time()
    q_mod.perplexity(o.model, "expected-attention", n // 2, n, n // 2, chunk=n // 4, tokens=toks + toks[1:2],
                     recent=min(64, n // 16), step=min(128, n // 8), cache_type=o.cache_type, n_threads=o.threads,
                     n_gpu_layers=o.n_gpu_layers, rpc=o.rpc)
    stream = (time.process_time() - t0) / n
    return Costs(prefill, min(comp) / len(toks), min(ans), stream)


def estimate(o: BenchOptions, c: Costs) -> dict[str, float]:
    """Seconds per quality part for these options."""
    from .suites.quality import task_questions

    per_q = len(o.policies) * len(o.budgets) * len(o.modes)  # compressed trials per question
    hays = len(o.haystack_list())
    out: dict[str, float] = {}
    parts = o.quality_parts()

    def one_shot(samples: int, ctx: int, questions: int) -> float:
        trial = c.compress_s_per_cell * ctx + c.answer_s
        return samples * (ctx * c.prefill_s_per_token + questions * (c.answer_s + per_q * trial))

    if "passkey" in parts:
        out["passkey"] = sum(one_shot(hays * o.seeds * len(o.depths), n, 1) for n in o.lengths)
    for name in ("multikey", "variable_tracking"):
        if name in parts:
            out[name] = one_shot(hays * o.task_samples, o.task_length, task_questions(o, name))
    if "perplexity" in parts:
        out["perplexity"] = o.ppl_docs * (1 + len(o.policies) * len(o.budgets)) * o.ppl_tokens * c.stream_s_per_token
    if "multi_turn" in parts:  # streaming too, with 3 questions per pass
        out["multi_turn"] = o.task_samples * (1 + per_q) * (o.task_length * c.stream_s_per_token + 3 * c.answer_s)
    return out


def describe(o: BenchOptions, c: Costs, parts: dict[str, float]) -> str:
    total = sum(parts.values())
    each = ", ".join(f"{k} {_hms(v)}" for k, v in parts.items())
    return (f"estimated time: {_hms(total)} of CPU with {o.threads or 'all'} thread(s) ({each}); wall time is longer "
            f"on a busy machine; calibrated here: prefill {1 / c.prefill_s_per_token:.0f} tok/s, "
            f"compression {1000 * c.compress_s_per_cell * 1024:.0f} ms per 1k cells, answer {c.answer_s:.2f} s, "
            f"perplexity stream {1 / c.stream_s_per_token:.0f} tok/s")


def as_dict(c: Costs, parts: dict[str, float]) -> dict:
    return {"costs": asdict(c), "seconds": parts, "total_s": sum(parts.values())}


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600} h {s % 3600 // 60:02d} min" if s >= 3600 else f"{s // 60} min {s % 60:02d} s"
