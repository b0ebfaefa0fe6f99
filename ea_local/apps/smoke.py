"""The smoke run at the end of setup: does the llama.cpp just built run on this machine?

`python -m ea_local.apps.smoke` loads the default model, prefills a few hundred tokens through a budget
that forces a compression, and decodes a few tokens; one line on stdout and exit 0 when all went well.
scripts/smoke.py runs it in a child process, so that a build that dies by a signal (an instruction the
CPU lacks, a crashing kernel such as llama.cpp's AMX matmul) is seen and rebuilt instead of reaching the
user. `--crash SIGNAL` makes it kill itself with that signal after the first decode: how the tests
exercise that fallback without a broken build.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

PREFILL = 400  # tokens: more than the budget + one chunk, so the prefill compresses
BUDGET = 256
CHUNK = 128
DECODE = 4


def run(model: str | None = None, crash: str | None = None) -> str:
    from ..engine.session import Session, SessionConfig  # engine first: loads libllama before numpy
    from ..bench.data import FILLER
    from ..engine.sampling import SamplingParams
    from ..model.embedded import resolve_model

    path = str(resolve_model(model))
    t0 = time.perf_counter()
    s = Session(path, SessionConfig(budget=BUDGET, chunk=CHUNK, step=CHUNK))
    try:
        text = FILLER * (PREFILL // 8)
        toks = ([s.rt.bos()] if s.rt.add_bos() else []) + s.rt.tokenize(text)
        toks = toks[:PREFILL]
        s.prefill(toks[:CHUNK])
        if crash:
            os.kill(os.getpid(), signal.Signals[crash])
        s.prefill(toks[CHUNK:])
        if not s.stats.evictions:
            raise RuntimeError(f"{len(toks)} tokens through a {BUDGET}-cell budget did not compress")
        before = s.next_pos
        list(s.generate([], SamplingParams(temperature=0.0, ignore_eos=True), max_tokens=DECODE))
        decoded = s.next_pos - before
        if decoded != DECODE:
            raise RuntimeError(f"decoded {decoded} tokens, asked for {DECODE}")
        n_ev = sum(e.n_evicted for e in s.stats.evictions)
        return (f"smoke run OK: {len(toks)} tokens through a {BUDGET}-cell budget ({len(s.stats.evictions)} "
                f"compression(s), {n_ev} cells evicted), {decoded} tokens decoded, {time.perf_counter() - t0:.1f} s")
    finally:
        s.close()


def _signal_name(name: str) -> str:
    name = name.upper()
    name = name if name.startswith("SIG") else "SIG" + name
    if name not in signal.Signals.__members__:
        raise argparse.ArgumentTypeError(f"unknown signal {name}")
    return name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ea_local.apps.smoke", description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GGUF file or short name (default: the embedded model)")
    ap.add_argument("--crash", type=_signal_name, metavar="SIGNAL",
                    help="kill this process with SIGNAL after the first decode (tests setup's fallback)")
    a = ap.parse_args(argv)
    try:
        print(run(a.model, a.crash), flush=True)
    except Exception as e:  # noqa: BLE001 - one line for setup to show, not a traceback
        print(f"smoke run failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
