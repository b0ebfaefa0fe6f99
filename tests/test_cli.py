"""The `ea-local` command line, driven as a user would (subprocess: real exit codes, real stderr)."""
from __future__ import annotations

import subprocess
import sys

import pytest



def ea(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ea_local.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_info_default_model():
    r = ea("info")
    assert r.returncode == 0, r.stderr
    for word in ("gemma3", "18", "256", "neox", "512", "Q4_K_M", "q8_0", "q4_0"):
        assert word in r.stdout


def test_info_tiny_llama(tiny_llama):
    r = ea("info", tiny_llama)
    assert r.returncode == 0, r.stderr
    assert "llama" in r.stdout and "norm" in r.stdout


@pytest.mark.parametrize("kind", ["empty", "not_gguf", "truncated", "directory", "missing", "unsupported"])
def test_info_bad_files_one_line_exit_2(kind, tmp_path, tiny_llama):
    from . import gguf_factory as gf

    p = tmp_path / "bad.gguf"
    if kind == "empty":
        gf.write_empty(p)
    elif kind == "not_gguf":
        gf.write_not_gguf(p)
    elif kind == "truncated":
        gf.write_truncated(tiny_llama, p, 200)
    elif kind == "directory":
        p = tmp_path
    elif kind == "missing":
        p = tmp_path / "nope.gguf"
    else:
        gf.write_unsupported_arch(p, "bert")
    r = ea("info", str(p))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("ea-local: error:")


def test_policies_lists_every_policy():
    from ea_local.policies import POLICIES

    r = ea("policies")
    assert r.returncode == 0
    for name in POLICIES:
        assert name in r.stdout


def test_demo_runs_and_reports():
    r = ea("demo", "--length", "1500", "--budget", "512")
    assert r.returncode == 0, r.stderr
    for word in ("cells kept", "evictions", "KV memory", "model's answer", "base model"):
        assert word in r.stdout


def test_demo_bad_budget_and_policy():
    r = ea("demo", "--budget", "10")
    assert r.returncode == 2 and "cannot hold" in r.stderr and "Traceback" not in r.stderr
    r = ea("demo", "--policy", "nope")
    assert r.returncode == 2 and "unknown policy" in r.stderr
