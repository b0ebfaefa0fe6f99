"""The report's intervals and paired tests from a results dict (no model), the report preset's sizes
and its time estimate's arithmetic."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from ea_local.bench import report, summary
from ea_local.bench.estimate import Costs, estimate
from ea_local.bench.options import BenchOptions, parse_budgets, report_sizes

ROOT = Path(__file__).resolve().parents[1]


def _passkey_rows(found_ea: list[bool], found_sl: list[bool]) -> list[dict]:
    rows = []
    for i, (a, b) in enumerate(zip(found_ea, found_sl)):
        base = {"length": 1024, "depth": (i % 5) / 4, "seed": i // 5, "haystack": "filler", "question": 0,
                "budget": "25%", "mode": "agnostic", "needle_kept": 0.5}
        rows.append({**base, "policy": "full", "budget": "full", "mode": "none", "found": True, "needle_kept": 1.0})
        rows.append({**base, "policy": "expected-attention", "found": a})
        rows.append({**base, "policy": "streaming-llm", "found": b})
    return rows


def _res(pk: list[dict], ppl: list[dict] | None = None) -> dict:
    q = {"passkey": pk}
    if ppl:
        q["perplexity"] = ppl
    return {"command": "ea-local bench --preset report", "started": "t0", "finished": "t1",
            "model": {"name": "m.gguf", "architecture": "gemma3", "file_type": "Q4_K_M", "n_layer": 18,
                      "global_layers": 3},
            "machine": {"cpu": "cpu", "cores": 2, "platform": "linux", "n_gpu_layers": 0},
            "versions": {"python": "3.11"}, "seconds": {"quality": 10.0},
            "settings": {"quick": False, "cache_type": "f16", "seed": 0, "threads": 1,
                         "policies": ["expected-attention", "streaming-llm"], "budgets": ["25%"],
                         "modes": ["agnostic"], "haystack": "filler", "haystacks": ["filler"], "lengths": [1024],
                         "depths": [0, 0.25, 0.5, 0.75, 1], "seeds": 6, "task_samples": 10, "task_length": 2048,
                         "texts": "reporting"},
            "quality": q}


def test_report_cells_carry_wilson_intervals_and_mcnemar_verdicts():
    # EA finds 27/30, StreamingLLM 12/30; 15 trials only EA got right, none the other way: p = 2·0.5¹⁵
    ea = [True] * 27 + [False] * 3
    sl = [True] * 12 + [False] * 18
    md = report.render(_res(_passkey_rows(ea, sl)), [])
    assert "| expected-attention | agnostic | 27/30 (90%, 74–97) |" in md
    assert "| streaming-llm | agnostic | 12/30 (40%, 25–58) |" in md
    assert "Full cache: **30/30 (100%, 89–100)**" in md
    assert "| 25% | agnostic | streaming-llm | 27/30 vs 12/30 | 15 / 0 | <0.001 | expected-attention better |" in md
    # 4/5 against 3/5 with one discordant pair: the report must say it cannot tell them apart
    md = report.render(_res(_passkey_rows([True] * 4 + [False], [True] * 3 + [False] * 2)), [])
    assert "| 25% | agnostic | streaming-llm | 4/5 vs 3/5 | 1 / 0 | 1 | **not significant** |" in md
    assert "4/5 (80%, 38–96)" in md
    assert "full cache fails" not in md


def test_a_task_the_full_cache_fails_is_flagged():
    rows = _passkey_rows([False] * 10, [False] * 10)
    for r in rows:
        if r["policy"] == "full":
            r["found"] = r["depth"] == 0  # 2/10: interval 6–51%, top above 50%: not flagged
    assert "full cache fails" not in report.render(_res(rows), [])
    for r in rows:
        r["found"] = False if r["policy"] == "full" else r["found"]  # 0/10: 0–28%
    assert "**The full cache fails this task**" in report.render(_res(rows), [])


def test_pairing_uses_the_same_trials_only():
    rows = _passkey_rows([True, False, True], [False, False, True])
    rows = [r for r in rows if not (r["policy"] == "streaming-llm" and r["depth"] == 0)]  # one trial missing
    t = summary.paired(rows, "expected-attention", "streaming-llm", "25%", "agnostic")
    assert (t.n, t.a_only, t.b_only) == (2, 0, 0)


def _ppl_row(policy: str, budget: str, nll_per_token: list[float]) -> dict:
    wins = [{"doc": f"d{i}", "nll_sum": v * 100, "n": 100, "chunk_nll": [v * 100], "chunk_n": [100]}
            for i, v in enumerate(nll_per_token)]
    nll = sum(nll_per_token) / len(nll_per_token)
    return {"policy": policy, "budget": budget, "n_tokens": 200, "eval_from": 100, "nll": nll, "ppl": math.exp(nll),
            "windows": wins}


def test_perplexity_cells_carry_bootstrap_intervals():
    base = [2.0, 2.2, 2.4, 2.1, 2.3, 1.9, 2.5, 2.0]
    full = _ppl_row("full", "full", base)
    ea = _ppl_row("expected-attention", "25%", [v + 0.1 for v in base])  # +0.1 NLL on every window
    sl = _ppl_row("streaming-llm", "25%", base)
    for r in (full, ea, sl):
        r["delta_ppl"] = r["ppl"] - full["ppl"]
    md = report.render(_res(_passkey_rows([True], [True]), [full, ea, sl]), [])
    assert "95% bootstrap intervals over the 8 windows" in md
    ci = summary.ppl_ci(full)
    assert ci.lo < full["ppl"] < ci.hi
    d, lo, hi = summary.delta_ci(ea, full)
    assert 0 < lo <= d <= hi  # a paired +0.1 NLL everywhere is a sure increase
    assert f"(Δ {d:+.3f} [{lo:+.3f}, {hi:+.3f}])" in md
    assert "(Δ +0.000 [+0.000, +0.000])" in md  # streaming-llm equals the full cache here
    # an old results.json without windows still renders, without intervals
    for r in (full, ea, sl):
        r.pop("windows")
    md = report.render(_res(_passkey_rows([True], [True]), [full, ea, sl]), [])
    assert "bootstrap" not in md and f"({ea['delta_ppl']:+.3f})" in md


def test_report_preset_sizes():
    o = report_sizes(BenchOptions(model="m", out="o", suites=["all"], policies=["expected-attention"],
                                  budgets=parse_budgets("50%")))
    per_cell = len(o.depths) * o.seeds * len(o.haystack_list())
    assert per_cell >= 30  # pass-key trials per (length, budget, mode)
    assert o.task_samples * len(o.haystack_list()) >= 20  # documents per needle task
    assert o.ppl_docs * (o.ppl_tokens - o.ppl_tokens // 2) >= 32 * 1024  # scored tokens
    assert [b.label for b in o.budgets] == ["25%", "12.5%"] and o.modes == ["agnostic", "question"]


def test_estimate_arithmetic():
    o = BenchOptions(model="m", out="o", suites=["passkey", "perplexity"], policies=["a", "b"],
                     budgets=parse_budgets("25%"), modes=["agnostic"], lengths=[1000], depths=[0.5],
                     ppl_tokens=1000, ppl_docs=2)
    c = Costs(prefill_s_per_token=0.01, compress_s_per_cell=0.001, answer_s=1.0, stream_s_per_token=0.02)
    e = estimate(o, c)
    # pass key: 1 sample: prefill 10 s + full-cache answer 1 s + 2 trials x (compress 1 s + answer 1 s)
    assert e["passkey"] == pytest.approx(10 + 1 + 2 * 2)
    # perplexity: 2 windows x (full + 2 policies) x 1000 tokens x 0.02 s
    assert e["perplexity"] == pytest.approx(2 * 3 * 20)
    assert set(e) == {"passkey", "perplexity"}


@pytest.mark.parametrize("args, msg", [
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--texts", "web"], "unknown text set 'web'"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--ppl-docs", "0"], "--ppl-docs must be at least 1"),
    (["--haystack", "filler,filler"], "repeats a haystack"),
])
def test_new_bad_flags_are_one_line_exit_2(args, msg, tmp_path):
    r = subprocess.run([sys.executable, "-m", "ea_local.cli", "bench", *args, "--out", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and msg in lines[0], r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("model", ["gemma3-270m", "smollm2-135m"])
def test_report_preset_perplexity_windows_exist(model):
    """The preset's 16 windows of 4k tokens are cut in a row from the reporting texts on each
    embedded model's tokenizer; every window is BOS + 4,096 tokens and they do not overlap."""
    from ea_local.bench.suites.quality import ppl_windows
    from ea_local.model.embedded import resolve_model

    o = report_sizes(BenchOptions(model=str(resolve_model(model)), out="o", suites=["all"],
                                  policies=["expected-attention"], budgets=parse_budgets("50%")))
    wins = ppl_windows(o)
    assert len(wins) == o.ppl_docs == 16
    assert all(len(t) == o.ppl_tokens + 1 for _, t in wins)
    assert wins[0][0] == "license:GPL-3" and " + " in wins[1][0]  # GPL-3 is 7.6k tokens: the second window crosses
    assert wins[0][1][1:] != wins[1][1][1:]
    docs = {d for name, _ in wins for d in name.split(" + ")}
    assert len(docs) >= 8


def test_headline_has_columns_only_for_what_ran():
    base = [2.0, 2.2, 2.4, 2.1]
    full = _ppl_row("full", "full", base)
    ea = _ppl_row("expected-attention", "25%", [v + 0.1 for v in base])
    sl = _ppl_row("streaming-llm", "25%", base)
    for r in (full, ea, sl):
        r["delta_ppl"] = r["ppl"] - full["ppl"]
    md = report.render(_res([], [full, ea, sl]), [])  # a perplexity-only run
    head = md[md.index("## Headline"):md.index("## Quality")]
    assert "| policy | perplexity (Δ) |" in head and "expected-attention" in head
    assert "None" not in head and "pass key" not in head and "decode" not in head
    md = report.render(_res(_passkey_rows([True], [False])), [])  # a pass-key-only run
    head = md[md.index("## Headline"):md.index("## Quality")]
    assert "| policy | pass key @ 1024 |" in head and "perplexity" not in head
