"""`ea-local bench`: the data generators' answers, flag errors, and a --quick run end to end."""
from __future__ import annotations

import math
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ea_local.bench import data
from ea_local.bench.data import FILLER, answered
from ea_local.bench.options import (BenchError, BenchOptions, fit_context, parse_budgets, parse_policies,
                                   parse_tokens)

ROOT = Path(__file__).resolve().parents[1]


# ---- data generators: the answer is what the text says ----

def _resolve_vars(text: str) -> dict[str, int]:
    """An independent interpreter of the variable-tracking text: VAR X = 123 / VAR Y = VAR X."""
    env: dict[str, int] = {}
    for name, rhs in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", text):
        env[name] = env[rhs[4:]] if rhs.startswith("VAR ") else int(rhs)
    return env


def _haystack(kind: str, n: int) -> list[str]:
    return [FILLER] * n if kind == "filler" else [p + "\n\n" for p in data.paragraphs()[:n]]


@pytest.mark.parametrize("seed,hay", [(s, h) for s in range(5) for h in ("filler", "prose")])
def test_variable_tracking_answers_follow_the_chains(seed, hay):
    t = data.variable_tracking(random.Random(seed), _haystack(hay, 50), n_hops=4, n_chains=2)
    env = _resolve_vars(t.context)
    assert len(env) == 8  # every assignment made it into the text, each once
    assert len(t.questions) == 2
    values = set()
    for q in t.questions:
        var = re.search(r"value of VAR ([A-Z]{5})\?", q.prompt).group(1)
        assert str(env[var]) == q.answer
        assert f"VAR {var} = {q.answer}." not in t.context  # the asked variable is reached by hops, not stated
        values.add(q.answer)
    assert len(values) == 2  # the two chains carry different values


@pytest.mark.parametrize("seed,hay", [(s, h) for s in range(5) for h in ("filler", "prose")])
def test_multikey_needle_answers_are_in_the_text(seed, hay):
    t = data.multikey_needle(random.Random(seed), _haystack(hay, 40), n_keys=4)
    found = dict(re.findall(r"special magic numbers for (\w+) is: (\d+)\.", t.context))
    assert len(found) == 4
    for q in t.questions:
        word = re.search(r"magic number for (\w+)\?", q.prompt).group(1)
        assert found[word] == q.answer
    # the needles are spread: the first sits in the first half, the last in the second
    positions = [t.context.index(f"for {w} is") for w in found]
    assert min(positions) < len(t.context) / 2 < max(positions)


def test_an_answer_is_found_only_as_a_whole_number():
    assert answered("27611", "The pass key is 27611. This is the pass key")
    assert answered("27611", "27611")
    assert not answered("27611", "The pass key is 276111. This is the pass")  # a longer number is wrong
    assert not answered("27611", "127611")
    assert answered("ABCDE", "VAR ABCDE.")


def test_place_puts_statements_at_their_depths():
    text = data.place(["x "] * 10, ["A", "B", "C"], [0.0, 0.5, 1.0])
    assert text == "A " + "x " * 5 + "B " + "x " * 5 + "C "
    assert data.place(["p1 ", "p2 ", "p3 ", "p4 "], ["N"], [0.5]) == "p1 p2 N p3 p4 "


def test_held_out_text_barely_overlaps_the_reported_text():
    # settings are tuned on HELD_OUT and reported on LICENSES; GFDL-1.3 reuses GPL-3's two
    # termination paragraphs, which is all the two texts share
    reported = {" ".join(p.split()) for p in data.real_text().split("\n\n")}
    held = [" ".join(p.split()) for p in data.real_text(data.HELD_OUT).split("\n\n")]
    words = len(" ".join(held).split())
    assert words > 6000  # enough for the 8k-token perplexity runs
    shared = [p for p in held if len(p.split()) >= 20 and p in reported]
    assert len(shared) <= 2 and sum(len(p.split()) for p in shared) < 0.02 * words
    with pytest.raises(FileNotFoundError, match="reference texts missing"):
        data.real_text([Path("/nonexistent/licence")])


def test_tuning_filler_trials_are_not_the_reported_ones():
    """The filler is the same text in every set, so only the keys and needles can tell a tuning
    trial from a reported one: they differ, and the reporting set still draws the published keys."""
    from ea_local.bench.options import BenchOptions
    from ea_local.bench.suites.quality import passkey_key, trial_rng

    def opts(texts: str) -> BenchOptions:
        return BenchOptions(model="m", out="o", suites=["passkey"], policies=[], budgets=[], texts=texts)

    rep, tun = opts("reporting"), opts("tuning")
    published = json.loads((ROOT / "docs/bench-report/gemma3-270m/results.json").read_text())["quality"]["passkey"]
    rows = {(r["length"], r["depth"], r["seed"], r["expected"]) for r in published if r["haystack"] == "filler"}
    assert len(rows) == 15
    for length, depth, k, key in rows:
        assert str(passkey_key(rep, length, depth, k)) == key
        assert passkey_key(tun, length, depth, k) != passkey_key(rep, length, depth, k)
    assert trial_rng(rep, "multikey-0-3").random() == random.Random("multikey-0-3").random()
    hay = [FILLER] * 150
    needles = lambda o: data.multikey_needle(trial_rng(o, "multikey-0-3"), hay).questions
    assert [q.answer for q in needles(tun)] != [q.answer for q in needles(rep)]


def test_tasks_are_the_same_in_every_process():
    """A seed builds the same documents whatever Python's string hashing (PYTHONHASHSEED) is."""
    code = ("import random; from ea_local.bench import data; h = [data.FILLER] * 40; "
            "print([(t.context, [(q.prompt, q.answer) for q in t.questions]) for t in "
            "[data.variable_tracking(random.Random(f'vt-{i}'), h, 2, 1, 'completion') for i in range(10)] + "
            "[data.multikey_needle(random.Random(f'mk-{i}'), h) for i in range(3)]])")
    outs = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": str(seed)},
                           capture_output=True, text=True, check=True, cwd=ROOT).stdout for seed in (1, 2, 3)}
    assert len(outs) == 1


def test_multi_turn_facts_come_first_and_match_the_questions():
    paras = data.paragraphs()
    chat = data.multi_turn(random.Random(3), 20, paras)
    assert len(chat.turns) == len(data.FACTS) + 20
    for turn, q in zip(chat.turns, chat.questions):
        assert q.answer in turn  # fact i is stated in turn i
        assert all(q.answer not in later for later in chat.turns[len(data.FACTS):])
    assert len({q.answer for q in chat.questions}) == len(chat.questions)


# ---- option parsing ----

def test_budget_parsing():
    b = parse_budgets("50%,25%,12.5%,1024")
    assert [x.label for x in b] == ["50%", "25%", "12.5%", "1024"]
    assert [x.resolve(8192) for x in b] == [4096, 2048, 1024, 1024]
    for bad in ("0%", "150%", "abc", "25%,,12.5%", "-3", "0", "25%,25%"):
        with pytest.raises(BenchError):
            parse_budgets(bad)


def test_policy_and_length_parsing():
    assert parse_policies("expected-attention,knorm") == ["expected-attention", "knorm"]
    with pytest.raises(BenchError, match="unknown policy"):
        parse_policies("expected-attention,nope")
    assert parse_tokens("2k,4k,8192", "length") == [2048, 4096, 8192]
    with pytest.raises(BenchError):
        parse_tokens("2x", "length")


def _cli(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ea_local.cli", "bench", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("args, msg", [
    (["--policies", "expected-attention,bogus"], "unknown policy 'bogus'"),
    (["--budgets", "25%,x"], "malformed budget 'x'"),
    (["--budgets", "0%"], "must be a percentage in (0%, 100%]"),
    (["--suite", "latency"], "unknown suite 'latency'"),
    (["--lengths", "4q"], "malformed length"),
    (["--ppl-tokens", "2k,4k"], "--ppl-tokens takes one length"),
    (["--modes", "both"], "unknown mode 'both'"),
    (["--policies", "none"], "policy 'none' is the full cache"),
    (["--haystack", "hay"], "unknown haystack 'hay'"),
])
def test_bad_flags_are_one_line_exit_2(args, msg, tmp_path):
    r = _cli(*args, "--out", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and msg in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_sizes_beyond_the_models_context_are_left_out_or_refused_before_anything_runs():
    """An 8k-context model: the default 8k pass key does not fit (8k + 256 cells of full cache), so it is
    left out with a note; a length or task size the user asked for that does not fit is refused."""
    def opts(**kw) -> BenchOptions:
        return BenchOptions(model="m", out="o", policies=["expected-attention"], budgets=parse_budgets("25%"), **kw)

    o = opts(suites=["quality"])
    fitted, note = fit_context(o, 8192, "m.gguf", given=set())
    assert fitted.lengths == [2048, 4096] and "8k left out" in note and "8192" in note
    same, note = fit_context(o, 32768, "m.gguf", given=set())
    assert same.lengths == [2048, 4096, 8192] and note is None
    with pytest.raises(BenchError, match="--lengths needs a full cache of 8448 cells"):
        fit_context(o, 8192, "m.gguf", given={"--lengths"})
    with pytest.raises(BenchError, match="use a smaller --ppl-tokens"):
        fit_context(opts(suites=["perplexity"], ppl_tokens=4096), 4096, "m", given=set())
    with pytest.raises(BenchError, match="--task-length"):
        fit_context(opts(suites=["multi_turn"], task_length=4096), 4096, "m", given=set())


def test_a_length_the_model_cannot_hold_is_one_line_exit_2_before_running(tmp_path):
    from .gguf_factory import write_tiny_gguf

    model = tmp_path / "ctx1k.gguf"
    write_tiny_gguf(model, arch="llama", context_length=1024)
    r = _cli("-m", str(model), "--suite", "passkey", "--lengths", "1k", "--out", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "training context (1024 tokens)" in lines[0] and "--lengths" in lines[0], r.stderr
    assert not (tmp_path / "o").exists()


# ---- one prefill, many trials ----

def test_snapshot_restore_gives_the_same_trial_twice(tiny_llama):
    """Restoring the saved sequence brings back the cells, positions, statistics and logits, so a
    compression + answer after a restore repeats the first one exactly."""
    from ea_local.bench.options import BenchOptions
    from ea_local.engine.snapshot import checkpoint, rewind
    from ea_local.bench.suites.common import ask, session_cfg
    from ea_local.engine.session import Session
    import numpy as np

    o = BenchOptions(model=tiny_llama, out="", suites=["quality"], policies=["expected-attention"], budgets=[],
                     threads=1)
    s = Session(tiny_llama, session_cfg(o, 1024))
    ctx = [s.rt.bos()] + s.rt.tokenize(data.paragraphs()[3] * 3)[:700]
    s.prefill(ctx)
    snap = checkpoint(s)
    logits = s.rt.logits()
    q = s.rt.tokenize(" The answer is")
    runs = []
    for _ in range(2):
        rewind(s, snap)
        assert s.rt.seq_pos_range() == (0, len(ctx) - 1) and s.n_cells == len(ctx)
        assert np.array_equal(s.rt.logits(), logits)
        s.set_one_shot_budget(200)
        s.compress(200, phase="prefill")
        kept = sorted(s.live)
        runs.append((kept, ask(s, q, 6)))
    assert runs[0] == runs[1]
    assert len(runs[0][0]) == 200
    s.close()


def test_every_policy_runs_the_one_shot_protocol(tmp_path):
    """Policy switching on one prefilled session, both modes, on an iSWA model (tiny random gemma3:
    sliding layers with their own cache); streaming parts below its 512-token window are skipped."""
    from .gguf_factory import write_tiny_gguf

    model = tmp_path / "tiny-gemma3.gguf"
    write_tiny_gguf(model, arch="gemma3")
    out = tmp_path / "b"
    r = _cli("--quick", "--suite", "quality", "--model", str(model), "--policies", "context-shift,laq,snapkv,h2o",
             "--budgets", "50%", "--depths", "0.5", "--lengths", "384", "--modes", "agnostic,question",
             "--threads", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    pk = json.loads((out / "results.json").read_text())["quality"]["passkey"]
    for mode in ("agnostic", "question"):
        kept = {x["policy"]: x["needle_kept"] for x in pk if x["mode"] in (mode, "none")}
        assert kept["context-shift"] is None  # positions renumbered: not measurable
        assert all(0 <= kept[p] <= 1 for p in ("laq", "snapkv", "h2o"))
    # every policy, context-shift included, is within its budget in both modes when the question is asked
    assert all(x["cells_after"] <= x["cells"] for x in pk if x["policy"] != "full")
    res = json.loads((out / "results.json").read_text())
    assert all("skipped" in x for x in res["quality"]["perplexity"] if x["policy"] != "full")  # 256 < 512


def test_quality_parts_alone_and_the_prose_haystack(tmp_path, tiny_llama):
    """--suite names quality parts; --haystack prose hides the needles in the GPL; multi-turn recall
    runs in both modes (question-known: every turn steers the compressions)."""
    out = tmp_path / "b"
    r = _cli("--quick", "--suite", "passkey,multikey,multi_turn", "--haystack", "prose", "--model", tiny_llama,
             "--policies", "expected-attention", "--budgets", "50%", "--depths", "0.5", "--modes", "agnostic,question",
             "--threads", "1", "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert list(res["quality"]) == ["passkey", "multikey", "multi_turn"]
    assert "speed" not in res and "memory" not in res and res["settings"]["haystack"] == "prose"
    assert {(x["policy"], x["mode"]) for x in res["quality"]["multi_turn"]} == \
        {("full", "agnostic"), ("expected-attention", "agnostic"), ("expected-attention", "question"),
         ("expected-attention", "question+recall")}  # each question also asked with recall, from the same state
    rec = [x for x in res["quality"]["multi_turn"] if x["mode"] == "question+recall"]
    assert len(rec) == len([x for x in res["quality"]["multi_turn"] if x["mode"] == "question"])
    assert "| expected-attention | question+recall |" in (out / "report.md").read_text()
    assert all(0 <= x["needle_kept"] <= 1 for x in res["quality"]["passkey"])
    md = (out / "report.md").read_text()
    assert "hidden in real prose (the reporting texts below)" in md
    assert "Real text: the **reporting** set" in md and "`license:GPL-3`" in md
    assert [d["name"] for d in res["texts"]["documents"]][:2] == ["license:GPL-3", "license:GPL-2"]



# ---- end to end ----

def test_quick_run_writes_every_file_with_sane_content(tmp_path, tiny_llama):
    """--quick end to end on the tiny random llama (seconds; the default model's run is in docs/bench):
    every suite, both modes, two policies and two budgets, every file."""
    out = tmp_path / "bench"
    pols = ["expected-attention", "streaming-llm"]
    r = _cli("--quick", "--model", tiny_llama, "--policies", ",".join(pols), "--budgets", "50%,25%",
             "--modes", "agnostic,question", "--threads", "1", "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["model"]["architecture"] == "llama" and res["settings"]["cache_type"] == "f16"
    assert res["versions"]["llama-cpp-python"] and res["machine"]["cores"]
    budgets = ["50%", "25%"]
    q = res["quality"]
    for task in ("passkey", "multikey", "variable_tracking", "multi_turn"):
        rows = q[task]
        seen = {(x["policy"], x["budget"], x["mode"]) for x in rows}
        recall = {(p, b, "question+recall") for p in pols for b in budgets} if task == "multi_turn" else set()
        assert seen == {("full", "full", "none" if task != "multi_turn" else "agnostic")} | recall | \
            {(p, b, m) for p in pols for b in budgets for m in ("agnostic", "question")}, task
        assert all(isinstance(x["found"], bool) for x in rows)
    for x in q["passkey"]:
        if x["policy"] != "full":
            assert 0 <= x["needle_kept"] <= 1
            assert x["cells"] == round(x["context"] * (0.5 if x["budget"] == "50%" else 0.25))
    # streaming-llm keeps the sinks and the newest cells: a needle at depth 0.5 of a 768-token
    # context is gone at 25% — a check that the compression really happened
    mid = [x for x in q["passkey"] if x["policy"] == "streaming-llm" and x["budget"] == "25%"
           and x["depth"] == 0.5 and x["length"] == 768 and x["mode"] == "agnostic"]
    assert mid and mid[0]["needle_kept"] == 0.0
    ppl = {(x["policy"], x["budget"]): x["ppl"] for x in q["perplexity"]}
    assert set(ppl) == {("full", "full")} | {(p, b) for p in pols for b in budgets}
    assert all(1 < v < 1000 for v in ppl.values())
    for row in res["speed"]:
        for p in row["points"]:
            assert p["decode_tok_s"] > 0 and p["prefill_tok_s"] > 0
        if row["policy"] != "full":
            assert row["points"][-1]["cells_after"] <= row["cells"]
    assert {(x["policy"], x["budget"]) for x in res["speed"]} == {("full", "full")} | \
        {(p, b) for p in pols for b in budgets}
    mem = {x["budget"]: x for x in res["memory"]}
    assert set(mem) == {"full", *budgets}
    for b in budgets:  # the budget holds: fewer cells and KV bytes than the full cache at the end
        assert max(p["cells"] for p in mem[b]["series"]) <= mem[b]["cells"]
        assert mem[b]["series"][-1]["kv_mib"] < mem["full"]["series"][-1]["kv_mib"]
        assert all(p["rss_mib"] > 50 for p in mem[b]["series"])
    report = (out / "report.md").read_text()
    for heading in ("## Headline", "### pass key", "### perplexity", "## Speed", "## Memory"):
        assert heading in report
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(["accuracy_vs_budget.png", "ppl_vs_budget.png", "decode_speed.png", "kv_memory.png"] +
                          [f"passkey_heatmap_{m}_{b[:-1]}pct.png" for m in ("agnostic", "question") for b in budgets])
    for p in pngs:
        assert (out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / p).stat().st_size > 5000
        assert f"]({p})" in report
    # the report and plots can be re-written from results.json alone
    again = tmp_path / "again"
    r = _cli("--from-results", str(out / "results.json"), "--out", str(again))
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in again.glob("*.png")) == pngs
    assert (again / "report.md").read_text() == report


def test_perplexity_scores_every_token_once_and_reads_a_prefix_as_the_message(tiny_llama):
    from ea_local.bench.quality import perplexity

    toks = [1] + [(7 * i) % 200 + 3 for i in range(400)]
    # 301 tokens in chunks of 64: the last chunk is partial and its last token is only a target
    a = perplexity(tiny_llama, "expected-attention", 1024, 301, 150, chunk=64, tokens=toks, n_threads=1)
    assert sum(a.chunk_n) == 301 - 150 and math.isfinite(a.nll)
    b = perplexity(tiny_llama, "expected-attention", 1024, 301, 150, chunk=64, tokens=toks, prefix=[1, 5, 6, 7],
                   n_threads=1)
    assert sum(b.chunk_n) == 301 - 150 and b.nll != a.nll  # the same text, now after a message


def test_each_policy_keeps_one_colour_of_its_own_in_the_plots():
    """Six policies in two modes are 12 lines, past the default colour cycle's 10: a policy's colour is
    its own, and shared by its two modes."""
    from ea_local.bench.plots import _policy_colours

    six = ["expected-attention", "streaming-llm", "snapkv", "tova", "knorm", "random"]
    colours = _policy_colours([p for p in six for _ in ("agnostic", "question")])
    assert list(colours) == six and len(set(colours.values())) == 6
    assert len(set(_policy_colours([f"p{i}" for i in range(14)]).values())) == 14
