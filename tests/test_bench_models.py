"""`ea-local bench --model A,B`: each model measured on its own, results in --out/NAME/."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .gguf_factory import write_tiny_gguf


def bench(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ea_local.cli", "bench", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_model_list_measures_each_model(tmp_path):
    a = write_tiny_gguf(tmp_path / "tiny-a.gguf", arch="llama")
    b = write_tiny_gguf(tmp_path / "tiny-b.gguf", arch="qwen2")
    out = tmp_path / "bench"
    r = bench("--quick", "--suite", "memory", "--policies", "streaming-llm", "--budgets", "50%", "--threads", "1",
              "--model", f"{a},{b}", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    for name, arch in (("tiny-a", "llama"), ("tiny-b", "qwen2")):
        res = json.loads((out / name / "results.json").read_text())
        assert res["model"]["path"] == str(tmp_path / f"{name}.gguf") and res["model"]["architecture"] == arch
        assert res["memory"] and (out / name / "report.md").is_file()
        assert f"wrote {out / name}/results.json" in r.stdout
    assert not (out / "results.json").exists()


@pytest.mark.parametrize("spec, msg", [
    ("gemma3-270m,gemma3-270m", "distinct models"),
    ("gemma3-270m,", "distinct models"),
    ("gemma3-270m,/nope/x.gguf", "no such model file: /nope/x.gguf"),
])
def test_bad_model_lists_are_one_line_exit_2(spec, msg, tmp_path):
    r = bench("--model", spec, "--out", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and msg in lines[0], r.stderr
    assert not (tmp_path / "o").exists()
