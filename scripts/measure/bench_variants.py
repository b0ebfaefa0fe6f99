#!/usr/bin/env python3
"""`ea-local bench` with Expected Attention option sets registered as extra policies, so that one run
(one prefill per document) measures a setting against the default on the same trials.

    .venv/bin/python scripts/measure/bench_variants.py NAME=OPTION:VALUE[,OPTION:VALUE...] ... -- BENCH ARGS
    .venv/bin/python scripts/measure/bench_variants.py ea-plain=newest_query:False -- \\
        bench -m gemma3-270m --preset report --suite multikey --policies expected-attention,ea-plain

A variant gets exactly the options named, not the engine's per-model defaults for
`expected-attention` (pooling over 7 cells on models whose every layer is evicted: name kernel_size:7).
"""
from __future__ import annotations

import dataclasses
import functools
import sys

from ea_local.policies import POLICIES
from ea_local.policies import expected_attention


def value(text: str) -> object:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(text, text)


def main(argv: list[str]) -> None:
    if "--" not in argv:
        sys.exit(__doc__)
    cut = argv.index("--")
    for spec in argv[:cut]:
        name, _, opts = spec.partition("=")
        options = {k: value(v) for k, _, v in (o.partition(":") for o in opts.split(",") if o)}
        unknown = set(options) - set(POLICIES["expected-attention"].options)
        if unknown:
            sys.exit(f"expected-attention has no option {', '.join(sorted(unknown))}")
        POLICIES[name] = dataclasses.replace(POLICIES["expected-attention"], name=name,
                                             score=functools.partial(expected_attention.score, **options))
    sys.argv = ["ea-local"] + argv[cut + 1:]
    from ea_local.cli import app
    app()


if __name__ == "__main__":
    main(sys.argv[1:])
