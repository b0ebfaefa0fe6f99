"""What the suites share: session settings scaled to small budgets, asking a question, timing."""
from __future__ import annotations

from ...engine.session import Session, SessionConfig
from ..options import BenchOptions


def session_cfg(o: BenchOptions, budget: int, policy: str = "expected-attention", chunk: int = 512) -> SessionConfig:
    # tiny --quick budgets cannot hold the engine's default recent window (64), so it scales down below
    # 512 cells as the engine's step does (SessionConfig.step_cells); at a full run's sizes both are the defaults
    return SessionConfig(budget=budget, policy=policy, chunk=chunk, recent=min(64, budget // 8),
                         cache_type=o.cache_type, n_threads=o.threads,
                         n_gpu_layers=o.n_gpu_layers, seed=o.seed, rpc=o.rpc)


def ask(s: Session, question: list[int], max_tokens: int) -> str:
    """Prefill the question and answer greedily without compressing any further."""
    s.stop_compressing()  # the context was compressed already: the question and answer only add cells
    return "".join(s.generate(question, max_tokens=max_tokens)).strip()


def compress_question_known(s: Session, question: list[int], budget: int) -> None:
    """Second mode: the question is known before compression. The engine probes it (Session.set_question:
    decoded after the context, its queries steer the statistics, its cells removed again), then it is
    asked on the compressed cache, so the answer never saw the full cache."""
    s.set_question(question)
    try:
        s.compress(budget, phase="prefill")
    finally:
        s.set_question(None)


def streaming_floor(model: str) -> int:
    """Smallest budget a streaming (chunk-by-chunk) session can run on this model.

    On iSWA models the sliding layers keep their own window-sized cache, and llama.cpp sizes it
    from n_ctx = budget + chunk (llama_kv_cache_iswa: min(n_ctx, n_swa + n_ubatch)): below the
    window it has no room and decoding fails, so such budgets are reported as skipped."""
    from ...model.info import read_model_info

    info = read_model_info(model)
    return info.sliding_window if info.sliding_layers and info.sliding_window else 0


def skipped(floor: int, cells: int) -> str | None:
    if cells < floor:
        return (f"{cells} cells is below the sliding window ({floor} tokens) that this iSWA model's "
                "streaming prefill needs")
    return None
