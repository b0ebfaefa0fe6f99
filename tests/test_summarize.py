"""`ea-local summarize`, driven as a user would (subprocess: real exit codes, real stderr)."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest

from .conftest import GPL3, default_sigint


def summarize(*args: str, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ea_local.cli", "summarize", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def document(n_chars: int) -> str:
    return "# GNU GPL\n\n" + GPL3.read_text()[:n_chars]


STATS = re.compile(r"read (\d+) tokens in .* through (\d+) cells: (\d+) evictions, (\d+) cells evicted, (\d+) kept")


def test_summarize_longer_than_budget_to_stdout(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(document(3200))  # ~700 tokens
    r = summarize(str(doc), "--model", "gemma3-270m", "--budget", "512", "--max-tokens", "16", "-v")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "base model" in r.stderr
    m = STATS.search(r.stderr)
    assert m, r.stderr
    n_doc, budget, events, evicted, kept = map(int, m.groups())
    assert n_doc > budget == 512 and events >= 1 and kept <= 512 and evicted >= n_doc - 512


def test_summarize_output_file_and_prompt(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(document(2600))
    out = tmp_path / "summary.txt"
    r = summarize(str(doc), "--budget", "512", "--chunk", "128", "--max-tokens", "12", "-o", str(out),
                  "--prompt", "List three keywords of the text above.", "--policy", "streaming-llm")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    assert out.read_text().strip()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.md", "summary.txt"]  # no temporary left


def test_summarize_stdin():
    r = summarize("-", "--budget", "512", "--max-tokens", "8", stdin=document(1500))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


@pytest.mark.parametrize("case", ["missing", "binary", "empty", "directory", "budget", "policy", "not_gguf",
                                  "out_dir_missing", "chunk"])
def test_summarize_bad_input_one_line_exit_2(case, tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(document(500))
    src, args = str(doc), ["--budget", "512"]
    if case == "missing":
        src = str(tmp_path / "nope.md")
    elif case == "binary":
        doc.write_bytes(b"\x7fELF\x00\x00\x01" * 50)
    elif case == "empty":
        doc.write_text("")
    elif case == "directory":
        src = str(tmp_path)
    elif case == "budget":
        args = ["--budget", "50"]
    elif case == "policy":
        args += ["--policy", "nope"]
    elif case == "not_gguf":
        p = tmp_path / "m.gguf"
        p.write_bytes(b"GGUX" + b"\x00" * 64)
        args += ["--model", str(p)]
    elif case == "out_dir_missing":
        args += ["-o", str(tmp_path / "no" / "such" / "dir.txt")]
    else:
        args += ["--chunk", "0"]
    r = summarize(src, *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("ea-local: error:"), r.stderr


def test_summarize_ctrl_c_exits_130_without_partial_file(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(document(30000))  # long enough to still be reading when the signal comes
    out = tmp_path / "summary.txt"
    p = subprocess.Popen([sys.executable, "-m", "ea_local.cli", "summarize", str(doc), "--model", "gemma3-270m",
                          "--budget", "512", "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=default_sigint)
    assert "base model" in p.stderr.readline()  # printed once the model is loaded, before reading
    time.sleep(1)
    assert p.poll() is None, p.communicate()
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert not out.exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["doc.md"]


def test_summarize_protects_the_opening_and_recalls_only_with_a_question():
    """The document's opening (on an instruct model, the template's system part first) is protected, a
    quarter of the budget up to 32, and its newest tokens as in chat, a quarter up to 64; recall needs a
    question."""
    from ea_local.apps.summarize import SummarizeOptions, summarize_config

    c = summarize_config(SummarizeOptions(budget=128))
    assert (c.n_sink, c.recent, c.recall) == (32, 32, False)
    c = summarize_config(SummarizeOptions(budget=2048, prompt="Which version is this?"))
    assert (c.n_sink, c.recent, c.recall, c.guard_question) == (32, 64, True, True)


@pytest.mark.parametrize("chunk,compressed_while_asking", [(32, True), (64, False)])
def test_summarize_recalls_with_the_prompts_own_words(chunk, compressed_while_asking, tmp_path, monkeypatch):
    """With --prompt, recall is asked by the prompt's words, as chat asks with the user's: not by the
    template's tail after them, nor by the greedy answer of a probe made while the question was read;
    and it may replace the document's last cells (recent 0), since the question ends its own document.
    In-process, to see the call. With 32-token chunks this document (760 tokens)
    leaves the cache full, so the question's own read is compressed and probed: its answer tokens must not
    ask; with 64 the question is read without a compression."""
    from ea_local.apps.summarize import SummarizeOptions, run_summarize
    from ea_local.engine.session import Session
    from ea_local.model.embedded import resolve_model
    from ea_local.model.info import read_model_info

    calls, compressed_at = [], []
    recall, compress = Session.recall, Session.compress

    def spy_compress(self, target, phase="decode"):
        if not calls:  # before the recall: the document's and the question's reads
            compressed_at.append(self.next_pos)
        return compress(self, target, phase)

    def spy_recall(self, since, until=None, recent=None):
        calls.append((since, until, recent, self.next_pos, self.message_queries(since, until)[1].tolist()))
        return recall(self, since, until, recent)

    monkeypatch.setattr(Session, "compress", spy_compress)
    monkeypatch.setattr(Session, "recall", spy_recall)
    doc = tmp_path / "doc.md"
    doc.write_text(document(3360))
    info = read_model_info(str(resolve_model("smollm2-135m")))
    run_summarize(info, str(doc), SummarizeOptions(budget=128, chunk=chunk, max_tokens=4, temperature=0.0, threads=1,
                                                   seed=0, prompt="Which version is this?"))
    (since, until, recent, next_pos, asked), = calls
    assert recent == 0 and since < until < next_pos  # the template's tail after the words is left out
    assert asked == list(range(since, until))  # every word's query, none of a probe's answer
    assert any(p > since for p in compressed_at) == compressed_while_asking  # the document ends where the question starts
