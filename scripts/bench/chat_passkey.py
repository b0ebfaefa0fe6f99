#!/usr/bin/env python3
"""Pass key through `ea-local chat`'s path, or `ea-local summarize --prompt`'s: one conversation (one CLI
run) per trial, the document and its question as a user gives them, greedy.

    EA_LOCAL_THREADS=1 .venv/bin/python scripts/bench/chat_passkey.py --model smollm2-135m --tokens 1000 \\
        --budget 256 --texts reporting --out results.jsonl [--path file|summarize]

The haystack, needle and question are serve_passkey.py's (the same trials for the same depths and
seeds). chat: the document and question pasted as one message (`Chat.ask`; file: the document given
with `--file`, which opens the first message, the question typed); a message that does not fit the
budget is compressed while or once it is read, its question probed at each compression; with recall
(the default) the question then brings back what it asks for. summarize: the document in a file, the
question as `--prompt`, 16 tokens (`--policy none` with a budget above the document: the full cache).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from ea_local.apps.chat import Chat, ChatOptions  # ea_local first: libllama before numpy
from ea_local.bench.data import answered
from ea_local.bench.stats import fmt_rate
from ea_local.engine.runtime import ContextConfig, Runtime
from ea_local.model.embedded import resolve_model
from ea_local.model.info import read_model_info

import serve_passkey as sp  # this folder: run as a script


def ask_chat(a: argparse.Namespace, info, doc: str) -> tuple[str, int]:
    attach = a.path == "file"  # `ea-local chat --file document.txt`, the question as the first message
    chat = Chat(info, ChatOptions(budget=a.budget, policy=a.policy, recall=not a.no_recall, temperature=0.0,
                                  max_tokens=16, threads=1, seed=0, file="document.txt" if attach else None),
                document=doc if attach else None)
    try:
        chat.start()
        return "".join(chat.ask(sp.CHAT_QUESTION.strip() if attach else doc + sp.CHAT_QUESTION)), chat.s.stats.recalled
    finally:
        chat.s.close()


def ask_summarize(a: argparse.Namespace, doc: str, tmp: Path) -> str:
    f = tmp / "document.txt"
    f.write_text(doc)
    r = subprocess.run([sys.executable, "-m", "ea_local.cli", "summarize", str(f), "--model", a.model,
                        "--prompt", sp.CHAT_QUESTION.strip(), "--budget", str(a.budget), "--policy", a.policy,
                        "--temperature", "0", "--max-tokens", "16", "--threads", "1"]
                       + (["--no-recall"] if a.no_recall else []), capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"summarize exited {r.returncode}: {r.stderr.strip()}")
    return r.stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--path", choices=["chat", "file", "summarize"], default="chat",
                    help="chat: the document pasted with the question; file: `chat --file`, the question typed")
    ap.add_argument("--tokens", type=int, default=1000, help="haystack tokens")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--policy", default="expected-attention")
    ap.add_argument("--no-recall", action="store_true")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--seeds", default="0,1", help="one trial per depth and seed, keyed as serve_passkey.py's")
    ap.add_argument("--haystack", choices=["filler", "prose"], default="prose")
    ap.add_argument("--texts", choices=sorted(sp.PROSE), default="reporting")
    ap.add_argument("--out", default=None, help="JSON lines, one per trial")
    a = ap.parse_args()
    path = str(resolve_model(a.model))
    rt = Runtime(path, ContextConfig(n_ctx=64, n_threads=1))
    sents = sp.haystack(rt, a.haystack, a.tokens, a.texts)
    rt.close()
    info = read_model_info(path)
    depths = [float(x) for x in a.depths.split(",")]
    plan = [t for s in a.seeds.split(",") for t in sp.trials(int(s), depths)]
    out = open(a.out, "a") if a.out else None
    found = 0
    with tempfile.TemporaryDirectory() as tmp:
        for depth, key in plan:
            doc = sp.document(sents, depth, key)
            row = {"model": a.model, "path": a.path, "haystack": a.haystack, "texts": a.texts, "tokens": a.tokens,
                   "budget": a.budget, "policy": a.policy, "recall": not a.no_recall, "depth": depth, "key": key}
            if a.path in ("chat", "file"):
                reply, recalled = ask_chat(a, info, doc)
                row["recalled_cells"] = recalled
            else:
                reply = ask_summarize(a, doc, Path(tmp))
            row.update(found=answered(str(key), reply), answer=reply)
            found += row["found"]
            print(json.dumps(row), flush=True)
            if out:
                out.write(json.dumps(row) + "\n")
                out.flush()
    print(f"{a.path}, {a.policy}, {a.budget} cells, recall {'off' if a.no_recall else 'on'}: "
          f"{fmt_rate(found, len(plan))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
