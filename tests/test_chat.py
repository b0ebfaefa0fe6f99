"""`ea-local chat`, driven through piped stdin as a script would (subprocess: real exit codes)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from .conftest import GPL3


def chat(*args: str, stdin: str = "", timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ea_local.cli", "chat", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout)


def stats_fields(text: str) -> list[dict]:
    """Every /stats block's numbers: cells, budget, eviction events, cells evicted, tokens seen, turns."""
    out = []
    for m in re.finditer(r"cells\s+(\d+) / (\d+) budget\nevictions\s+(\d+) events, (\d+) cells evicted\n"
                         r"tokens\s+(\d+) seen, (\d+) turns\nKV memory\s+([\d.]+) MiB now, ([\d.]+) MiB with the full "
                         r"cache\nlast compression\s+(.*)\n", text):
        c, b, ev, evc, seen, turns, now, full, last = m.groups()
        out.append(dict(cells=int(c), budget=int(b), events=int(ev), evicted=int(evc), seen=int(seen),
                        turns=int(turns), kv_now=float(now), kv_full=float(full), last=last))
    return out


def long_message(n_chars: int, start: int = 0) -> str:
    """One line of real prose (GPL-3), about n_chars long."""
    text = " ".join(GPL3.read_text().split())
    return text[start:start + n_chars]


# ---- templates (no model weights: llama.cpp's renderer and jinja2) ----

@pytest.mark.parametrize("name,glue,tail", [
    ("gemma", "<end_of_turn>\n<start_of_turn>user\n", "<end_of_turn>\n<start_of_turn>model\n"),
    ("chatml", "<|im_end|>\n<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"),
    ("llama3", "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n",
     "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
])
def test_turn_renderer_builtin(name, glue, tail):
    from ea_local.model.chat_template import ChatTemplate, TurnRenderer

    tr = TurnRenderer(ChatTemplate(name, "builtin", name), system="Be brief.")
    prefix = tr.prefix()
    assert "Be brief." in prefix
    assert tr.split() == ("", tail)
    tr.add("user", "hi")
    tr.add("assistant", "hello")
    assert tr.split() == (glue, tail)
    # feeding prefix + user + tail + answer + glue + user + tail rebuilds the full rendering
    fed = prefix + "hi" + tail + "hello" + glue + "again" + tail
    full = tr.t.render(tr.messages + [{"role": "user", "content": "again"}], True)
    assert fed == full


def test_turn_renderer_jinja_fallback():
    from ea_local.model.chat_template import ChatTemplate, TurnRenderer

    src = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }} [/]\n{% endfor %}"
           "{% if add_generation_prompt %}[ASSISTANT] {% endif %}")
    tr = TurnRenderer(ChatTemplate(src, "gguf", "custom", bos_token="<s>"))
    assert tr.prefix() == "<s>[USER] "
    tr.add("user", "hi")
    tr.add("assistant", "hello")
    assert tr.split() == (" [/]\n[USER] ", " [/]\n[ASSISTANT] ")


# ---- the command ----

@pytest.mark.parametrize("model", ["gemma3-270m", "smollm2-135m"])
def test_chat_piped_answers_and_stats(model):
    # a fixed seed: sampled from a random one, the base model now and then answers only with newlines
    r = chat("--model", model, "--budget", "512", "--max-tokens", "12", "--seed", "1",
             stdin="What is the capital of France?\n/stats\n"
             "Tell me more\\\nabout Paris.\n/stats\n")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout.strip(), "answers go to stdout"
    assert "/stats" not in r.stdout and "cells" not in r.stdout  # stats go to stderr when piped
    if model == "gemma3-270m":  # a base model: one notice, a transcript it can continue
        assert "looks like a base model" in r.stderr and "plain User:/Assistant: transcript" in r.stderr
    else:  # the instruct model's own template: no notice
        assert "note:" not in r.stderr and "SmolLM2-135M-Instruct" in r.stderr
    blocks = stats_fields(r.stderr)
    assert len(blocks) == 3  # two /stats and the closing summary
    first, second = blocks[0], blocks[1]
    assert first["budget"] == 512 and first["turns"] == 1 and second["turns"] == 2  # backslash continued the line
    assert 0 < first["cells"] <= 512 and first["seen"] >= first["cells"]
    assert second["seen"] > first["seen"]
    assert first["last"] == "none yet"
    assert re.search(r"\[turn 2: \d+ prompt \+ \d+ generated tokens", r.stderr)


def test_chat_longer_than_budget_evicts_and_keeps_going():
    msgs = [long_message(1300, start=i * 1300) for i in range(2)]  # ~280 tokens each
    stdin = "\n".join(msgs) + "\n/stats\nWhat was that about?\n/stats\n"
    r = chat("--budget", "512", "--max-tokens", "8", stdin=stdin)
    assert r.returncode == 0, r.stderr
    assert "context full" not in r.stderr.lower()
    blocks = stats_fields(r.stderr)
    assert len(blocks) == 3
    for b in blocks:
        assert b["cells"] <= 512
    last = blocks[1]
    assert last["turns"] == 3 and last["seen"] > 512
    assert last["events"] >= 1 and last["evicted"] >= last["seen"] - 512
    assert last["kv_now"] < last["kv_full"]
    assert re.match(r"\d+ ms \((prefill|decode), \d+ cells at token \d+\)", last["last"])


def test_chat_slash_commands():
    stdin = ("/help\n/policy streaming-llm\n/policy nope\n/budget abc\n/budget 10\n/budget 300\n"
             "/stats\n/budget 700\n/stats\nHello\n/reset\n/stats\n/bogus\n")
    r = chat("--budget", "512", "--max-tokens", "4", "--system", "You are terse.", stdin=stdin)
    assert r.returncode == 0, r.stderr
    err = r.stderr
    assert "/budget N" in err and "Ctrl-D" in err  # /help
    assert "policy: streaming-llm" in err
    assert "error: unknown policy" in err
    assert "error: /budget needs a whole number" in err
    assert "error: budget 10 cannot hold" in err
    assert "budget: 300 cells (same session" in err
    assert "a larger context took the" in err
    assert "conversation reset" in err
    assert "unknown command /bogus" in err
    blocks = stats_fields(err)
    assert [b["budget"] for b in blocks[:3]] == [300, 700, 700]
    assert blocks[2]["turns"] == 0 and blocks[3]["turns"] == 0  # after /reset (and the closing summary)
    assert "streaming-llm" in err.split("policy: streaming-llm")[-1]  # still the policy after recreation


def test_chat_file_longer_than_budget(tmp_path):
    doc = tmp_path / "notes.md"
    doc.write_text("# Notes\n\n" + long_message(3000) + "\n")
    r = chat("--budget", "512", "--max-tokens", "8", "--file", str(doc), stdin="What is this about?\n/stats\n")
    assert r.returncode == 0, r.stderr
    assert re.search(r".*notes\.md: \d+ tokens, read with your first message", r.stderr)
    b = stats_fields(r.stderr)[0]
    assert b["cells"] <= 512 and b["events"] >= 1 and b["seen"] > 600


@pytest.mark.parametrize("case", ["budget", "policy", "cache_type", "not_gguf", "missing_file", "binary_file",
                                  "empty_file", "stdin_file", "unknown_model", "temperature", "top_p", "min_p",
                                  "repeat_penalty"])
def test_chat_bad_input_one_line_exit_2(case, tmp_path):
    args: list[str] = ["--budget", "512"]
    if case == "budget":
        args = ["--budget", "10"]
    elif case == "policy":
        args += ["--policy", "nope"]
    elif case == "cache_type":
        args += ["--cache-type", "q5_9"]
    elif case == "not_gguf":
        p = tmp_path / "x.gguf"
        p.write_text("hello")
        args += ["--model", str(p)]
    elif case == "missing_file":
        args += ["--file", str(tmp_path / "nope.md")]
    elif case == "binary_file":
        p = tmp_path / "b.bin"
        p.write_bytes(b"\x00\x01\x02" * 100)
        args += ["--file", str(p)]
    elif case == "empty_file":
        p = tmp_path / "e.md"
        p.write_text("  \n")
        args += ["--file", str(p)]
    elif case == "unknown_model":
        args += ["--model", "smollm9"]
    elif case in ("temperature", "top_p", "min_p", "repeat_penalty"):
        args += [f"--{case.replace('_', '-')}", {"temperature": "-0.5", "top_p": "0", "min_p": "1.5",
                                                 "repeat_penalty": "0"}[case]]
    else:
        args += ["--file", "-"]
    r = chat(*args, stdin="hello\n")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("ea-local: error:"), r.stderr
