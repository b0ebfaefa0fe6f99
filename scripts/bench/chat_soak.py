#!/usr/bin/env python3
"""Drive `ea-local chat` in tmux as a person would, for many turns; record latency, cells and RSS.

    python scripts/bench/chat_soak.py --turns 200 --budget 512 --max-tokens 16 --csv docs/chat_soak.csv [--model smollm2-135m]

The REPL runs interactively in a detached tmux session (a real terminal: readline, the `>>>`
prompt); messages are typed with `tmux send-keys`. The pane's output is also piped to a log
(`tmux pipe-pane`) so each turn's end — the `[turn N: ...]` line of `--verbose` — is seen without
polling the screen; `tmux capture-pane` takes the screen at the end and after every /stats.
Per turn: latency (Enter to the next prompt), cells used (from the turn line), the chat process's
RSS (`ps`). Every `--stats-every` turns `/stats` is typed and its reply parsed.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

QUESTIONS = [
    "What is the capital of France?", "Name three colours.", "How many legs does a spider have?",
    "What is two plus two?", "Say hello in Spanish.", "What do bees make?", "Name a large ocean.",
    "What is the opposite of hot?", "Which planet is red?", "What do cows drink?", "Name a fruit that is yellow.",
    "How many days are in a week?", "What is ice made of?", "Who wrote Hamlet?", "What is the sun?",
    "Name a musical instrument.", "What language is spoken in Brazil?", "What is a triangle?",
    "How many hours are in a day?", "Where do penguins live?",
]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")
TURN = re.compile(r"\[turn (\d+): (\d+) prompt \+ (\d+) generated tokens, ([\d.]+) tok/s \| cells (\d+)/(\d+) \| "
                  r"(\d+) evictions, (\d+) cells\]")


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout


def rss_kib(pid: int) -> int:
    out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return int(out) if out else -1


class Pane:
    def __init__(self, name: str, command: str, log: Path):
        self.name, self.log = name, log
        log.write_bytes(b"")
        tmux("new-session", "-d", "-s", name, "-x", "160", "-y", "48", command)
        tmux("pipe-pane", "-o", "-t", name, f"cat >> {shlex.quote(str(log))}")
        self.pid = int(tmux("display-message", "-p", "-t", name, "#{pane_pid}").strip())

    def text(self) -> str:
        return ANSI.sub("", self.log.read_bytes().decode("utf-8", errors="replace"))

    def type(self, line: str) -> None:
        tmux("send-keys", "-t", self.name, "-l", line)
        tmux("send-keys", "-t", self.name, "Enter")

    def screen(self) -> str:
        return tmux("capture-pane", "-p", "-t", self.name)

    def wait(self, pred, timeout: float, what: str) -> None:
        t0 = time.monotonic()
        while not pred(self.text()):
            if time.monotonic() - t0 > timeout:
                raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}; screen:\n{self.screen()}")
            if not Path(f"/proc/{self.pid}").exists():
                raise SystemExit(f"the chat process exited while waiting for {what}; screen:\n{self.screen()}")
            time.sleep(0.05)

    def kill(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="passed to ea-local chat: a GGUF path or an embedded model's name")
    ap.add_argument("--turns", type=int, default=200)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--stats-every", type=int, default=25)
    ap.add_argument("--threads", type=int, default=None, help="passed to ea-local chat (1 on a shared machine)")
    ap.add_argument("--timeout", type=float, default=120, help="seconds one turn may take before giving up")
    ap.add_argument("--csv", default=None, help="per-turn records")
    ap.add_argument("--log", default="/tmp/ea_chat_soak.log")
    ap.add_argument("--python", default=sys.executable)
    a = ap.parse_args()

    repo = Path(__file__).resolve().parents[2]
    env = f"PYTHONPATH={shlex.quote(str(repo))} EA_LOCAL_HISTORY=/tmp/ea_chat_soak_history"
    cmd = (f"cd {shlex.quote(str(repo))} && exec env {env} {shlex.quote(a.python)} -m ea_local.cli chat "
           f"--budget {a.budget} --max-tokens {a.max_tokens} --verbose" + (f" --threads {a.threads}" if a.threads else "")
           + (f" --model {shlex.quote(a.model)}" if a.model else ""))
    name = f"ea_soak_{os.getpid()}"
    pane = Pane(name, cmd, Path(a.log))
    rows = []
    stats_cells = []
    out = open(a.csv, "w", newline="") if a.csv else None  # written turn by turn: a cut-short run keeps its rows
    w = None
    try:
        t0 = time.monotonic()
        pane.wait(lambda t: ">>> " in t, 300, "the first prompt")
        print(f"loaded in {time.monotonic() - t0:.1f} s; RSS {rss_kib(pane.pid) / 1024:.0f} MiB", flush=True)
        rss0 = rss_kib(pane.pid)
        for i in range(1, a.turns + 1):
            q = QUESTIONS[(i - 1) % len(QUESTIONS)]
            t = time.monotonic()
            pane.type(q)
            # the turn line, then the next prompt after it
            pane.wait(lambda s: (m := s.rfind(f"[turn {i}:")) >= 0 and ">>> " in s[m:], a.timeout, f"turn {i}")
            lat = time.monotonic() - t
            m = [x for x in TURN.finditer(pane.text()) if int(x.group(1)) == i][-1]
            rows.append(dict(turn=i, latency_s=round(lat, 3), prompt=int(m.group(2)), generated=int(m.group(3)),
                             tok_s=float(m.group(4)), cells=int(m.group(5)), budget=int(m.group(6)),
                             evictions=int(m.group(7)), evicted=int(m.group(8)), rss_kib=rss_kib(pane.pid)))
            if out:
                if w is None:
                    w = csv.DictWriter(out, fieldnames=list(rows[0]))
                    w.writeheader()
                w.writerow(rows[-1])
                out.flush()
            if i % a.stats_every == 0:
                n = pane.text().count("last compression")
                pane.type("/stats")
                pane.wait(lambda s: s.count("last compression") > n and s.rstrip().endswith(">>>"), a.timeout, "/stats")
                st = re.findall(r"cells\s+(\d+) / (\d+) budget", pane.text())[-1]
                stats_cells.append(int(st[0]))
                r = rows[-1]
                print(f"turn {i}: {lat:.2f} s, cells {r['cells']}/{r['budget']} (/stats: {st[0]}), "
                      f"{r['evictions']} evictions, RSS {r['rss_kib'] / 1024:.1f} MiB", flush=True)
        pane.type("/stats")
        time.sleep(1.0)
        screen = pane.screen()
        pane.type("/quit")
        t = time.monotonic()
        while Path(f"/proc/{pane.pid}").exists() and time.monotonic() - t < 30:
            time.sleep(0.1)
    finally:
        pane.kill()

    if out:
        out.close()
    lat = sorted(r["latency_s"] for r in rows)
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]  # noqa: E731
    first = [r["rss_kib"] for r in rows[:50]]
    last = [r["rss_kib"] for r in rows[-50:]]
    print("\n".join([
        f"turns {len(rows)}, budget {a.budget}, max tokens {a.max_tokens}",
        f"latency per turn: p50 {q(0.5):.2f} s, p95 {q(0.95):.2f} s, max {lat[-1]:.2f} s",
        f"cells: max {max(r['cells'] for r in rows)} (turn lines), max {max(stats_cells or [0])} (/stats); "
        f"evictions {rows[-1]['evictions']} events, {rows[-1]['evicted']} cells",
        f"RSS: after load {rss0 / 1024:.1f} MiB; turns 1-50 mean {statistics.mean(first) / 1024:.1f} MiB "
        f"(max {max(first) / 1024:.1f}); last 50 mean {statistics.mean(last) / 1024:.1f} MiB (max {max(last) / 1024:.1f})",
        "final screen:", screen.rstrip(),
    ]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
