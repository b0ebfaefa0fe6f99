#!/usr/bin/env python3
"""Pass key through the server's path: one request per trial, greedy, the question at the end of the
prompt (`/v1/completions`) or of the user's message (`/v1/chat/completions`), as a user of
`ea-local serve` would ask it.

    EA_LOCAL_THREADS=1 .venv/bin/python scripts/bench/serve_passkey.py --model smollm2-135m --endpoint chat \\
        --tokens 1024 --budget 256,128 --keys 2 --policies expected-attention,streaming-llm,snapkv,tova,none \\
        --agnostic expected-attention,tova --haystack prose --out results.jsonl

One server per run (`--no-reuse`: every request is read from scratch) at the largest budget; each
request names its policy and budget in `kv_compression` (and `question_agnostic` for the policies
`--agnostic` names). `none`, the full cache, gets a server of its own sized for the
prompt. Trials are depths × keys (key k of depth i is drawn from seed·1000 + 100·k + i). A trial
counts as found when the key's digits appear in the answer. Prints found/n per policy, mode and budget
with a Wilson 95% interval, and Expected Attention against every other row on the same trials (exact
McNemar: EA only / other only).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time

from ea_local.engine.runtime import ContextConfig, Runtime  # ea_local first: libllama before numpy
from ea_local.bench.corpus import LICENSES, REPORTING, TUNING
from ea_local.bench.data import answered, passkey_needle
from ea_local.bench.stats import fmt_p, fmt_rate, mcnemar_exact
from ea_local.model.embedded import resolve_model
from ea_local.model.info import read_model_info
from ea_local.policies import get_policy
from ea_local.serve.server import configure

from serve_process import ServerProcess  # this folder: run as a script

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
# real English prose from each text set (bench/corpus.py): settings are chosen on the tuning one;
# any licence of either set by name (e.g. Apache-2.0, a tuning text)
PROSE = {"tuning": LICENSES / "MPL-2.0", "reporting": LICENSES / "GPL-2",
         **{src.ref: LICENSES / src.ref for src in TUNING + REPORTING if src.kind == "license"}}
INTRO = "There is important info hidden inside a lot of irrelevant text. Find it and memorize it. "
QUESTION = "\n\nWhat is the pass key? The pass key is"
CHAT_QUESTION = "\n\nWhat is the pass key?"
EA = "expected-attention"


def haystack(rt: Runtime, kind: str, n_tokens: int, texts: str = "reporting") -> list[str]:
    """Sentences of the haystack, enough for n_tokens; prose from the `texts` set."""
    if kind == "filler":
        unit = FILLER.split(". ")
        sents = [s.strip().rstrip(".") + ". " for s in unit if s.strip()]
    else:
        sents = [s.strip() + ". " for s in " ".join(PROSE[texts].read_text().split()).split(". ") if s.strip()]
    out, n, i = [], 0, 0
    per = {s: len(rt.tokenize(s, add_bos=False, special=False)) for s in set(sents)}
    while n < n_tokens:
        s = sents[i % len(sents)]
        out.append(s)
        n += per[s]
        i += 1
    return out


def slot_config(path: str, budget: int, policy: str, recall: bool = True) -> tuple:
    """(server config, session config) of a slot exactly as `ea-local serve --threads 1` makes them (its
    defaults), for the in-process traces and variants that follow a request through a slot's steps."""
    return configure(read_model_info(path), budget=budget, policy=policy, max_tokens=16,
                     max_prompt_tokens=131072, max_body=4 * 2**20, temperature=0.0, api_key=None,
                     cache_type="f16", seed=0, threads=1, n_gpu_layers=None, rpc=(), recall=recall,
                     archive="64MiB")


def trials(seed: int, depths: list[float], keys: int = 1) -> list[tuple[float, int]]:
    """(depth, pass key) per trial: key k of depth i is drawn from seed·1000 + 100·k + i."""
    return [(d, random.Random(seed * 1000 + 100 * k + i).randint(10000, 99999))
            for k in range(keys) for i, d in enumerate(depths)]


def document(sents: list[str], depth: float, key: int) -> str:
    cut = int(len(sents) * depth)
    return INTRO + "".join(sents[:cut]) + passkey_needle(key) + " " + "".join(sents[cut:]).rstrip()


def request(endpoint: str, doc: str, max_tokens: int) -> tuple[str, dict]:
    if endpoint == "chat":
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": doc + CHAT_QUESTION}],
                                        "max_tokens": max_tokens, "temperature": 0}
    return "/v1/completions", {"prompt": doc + QUESTION, "max_tokens": max_tokens, "temperature": 0}


def answer_text(endpoint: str, j: dict) -> str:
    c = j["choices"][0]
    return c["message"]["content"] if endpoint == "chat" else c["text"]


def mode_name(r: dict) -> str:
    if r["policy"] == "none":
        return "full"
    if not get_policy(r["policy"]).needs_queries:
        return "-"  # reads no question either way
    return "agnostic" if r["agnostic"] else "question"


def summary(rows: list[dict]) -> str:
    cells: dict[tuple, dict] = {}
    for r in rows:
        cells.setdefault((r["policy"], mode_name(r), r["budget"]), {})[(r["depth"], r["key"])] = bool(r["found"])
    out = ["| policy | mode | budget | found |", "| --- | --- | --- | --- |"]
    out += [f"| {p} | {m} | {b if p != 'none' else 'full'} | {fmt_rate(sum(v.values()), len(v))} |"
            for (p, m, b), v in cells.items()]
    out += ["", "| Expected Attention | other | EA only / other only, p |", "| --- | --- | --- |"]
    for (p, m, b), ea in cells.items():
        if p != EA:
            continue
        for (q, m2, b2), other in cells.items():
            if q == EA or not (m2 == "full" or (b2 == b and m2 in (m, "-"))):
                continue
            common = sorted(set(ea) & set(other))
            t = mcnemar_exact([ea[c] for c in common], [other[c] for c in common])
            out.append(f"| {m}, {b} | {q} {m2 if m2 != '-' else ''} | {t.a_only} / {t.b_only}, p {fmt_p(t.p_value)} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    ap.add_argument("--tokens", type=int, default=2048, help="haystack tokens")
    ap.add_argument("--budget", default="512", help="cells, comma-separated")
    ap.add_argument("--depths", default="0.05,0.2,0.35,0.5,0.65,0.8")
    ap.add_argument("--keys", type=int, default=1, help="keys (trials) per depth")
    ap.add_argument("--policies", default="expected-attention,streaming-llm,none")
    ap.add_argument("--agnostic", nargs="?", const=EA, default="",
                    help="also these policies (comma-separated; alone: expected-attention) with "
                         "kv_compression.question_agnostic")
    ap.add_argument("--haystack", choices=["filler", "prose"], default="filler")
    ap.add_argument("--texts", choices=sorted(PROSE), default="reporting",
                    help="prose from this text set: MPL-2.0 (tuning) or GPL-2 (reporting), or a licence of either set by name")
    ap.add_argument("--max-tokens", type=int, default=None, help="answer tokens (8 completions, 16 chat)")
    ap.add_argument("--no-recall", action="store_true", help="serve with --no-recall: evicted cells never come back")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON lines, one per request")
    a = ap.parse_args()
    path = str(resolve_model(a.model))
    rt = Runtime(path, ContextConfig(n_ctx=64, n_threads=1))
    sents = haystack(rt, a.haystack, a.tokens, a.texts)
    rt.close()
    budgets = sorted({int(x) for x in a.budget.split(",")}, reverse=True)
    depths = [float(x) for x in a.depths.split(",")]
    plan = trials(a.seed, depths, a.keys)
    max_tokens = a.max_tokens or (16 if a.endpoint == "chat" else 8)
    policies = a.policies.split(",")
    evicting = [p for p in policies if p != "none"]
    runs = [(p, b, False) for p in evicting for b in budgets]
    runs += [(p, b, True) for p in a.agnostic.split(",") if p for b in budgets if get_policy(p).needs_queries]
    servers = ([(evicting[0], budgets[0], runs)] if evicting else []) + \
        ([("none", a.tokens + 512, [("none", a.tokens + 512, False)])] if "none" in policies else [])
    out = open(a.out, "a") if a.out else None
    rows = []
    for server_policy, server_budget, server_runs in servers:
        srv = ServerProcess(path, "--budget", str(server_budget), "--policy", server_policy, "--parallel", "1",
                            "--no-reuse", *(["--no-recall"] if a.no_recall else []), start_timeout=600)
        srv.client.timeout = 3600
        try:
            for depth, key in plan:
                url, body0 = request(a.endpoint, document(sents, depth, key), max_tokens)
                for policy, budget, agnostic in server_runs:
                    body = dict(body0)
                    if policy != "none":
                        body["kv_compression"] = {"policy": policy, "budget": budget,
                                                  **({"question_agnostic": True} if agnostic else {})}
                    t0 = time.perf_counter()
                    r = srv.client.post(url, json=body)
                    row = {"model": a.model, "endpoint": a.endpoint, "haystack": a.haystack,
                           "texts": a.texts if a.haystack == "prose" else None, "tokens": a.tokens,
                           "budget": budget, "policy": policy, "agnostic": agnostic, "recall": not a.no_recall,
                           "depth": depth, "key": key,
                           "status": r.status_code, "seconds": round(time.perf_counter() - t0, 1)}
                    if r.status_code == 200:
                        j = r.json()
                        text = answer_text(a.endpoint, j)
                        row.update(answer=text, found=answered(str(key), text), prompt_tokens=j["usage"]["prompt_tokens"],
                                   kv_cache=j.get("kv_cache"))
                    else:
                        row.update(found=False, error=r.text[:300])
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if out:
                        out.write(json.dumps(row) + "\n")
                        out.flush()
        finally:
            srv.stop()
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
