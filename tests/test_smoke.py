"""scripts/smoke.py + ea_local/apps/smoke.py: setup's smoke run and its fallback to the safe build.

The children are real `python -m ea_local.apps.smoke` processes on the default model; the ones that crash
kill themselves on purpose (--crash SIGNAL, after the first decode). The rebuild is a stand-in: no
compiler runs here."""
from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
_spec = importlib.util.spec_from_file_location("ea_smoke_script", ROOT / "scripts" / "smoke.py")
smoke = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(smoke)

BUILD = "cpu build 0123abcd (CPU: x86 auto: AVX AVX2 AVX512; AMX off)"


class Recorder:
    def __init__(self, children: list[list[str]]):
        self.children = children  # the child arguments of each run, in order
        self.runs = 0
        self.rebuilds = 0
        self.marks = 0
        self.lines: list[str] = []

    def run(self) -> "smoke.Result":
        args = self.children[min(self.runs, len(self.children) - 1)]
        self.runs += 1
        return smoke.run_child(args)

    def rebuild(self) -> None:
        self.rebuilds += 1

    def mark(self) -> None:
        self.marks += 1

    def go(self, rebuild=True) -> int:
        return smoke.smoke_with_fallback(self.run, self.rebuild if rebuild else None, lambda: BUILD, self.mark,
                                         self.lines.append)


def test_smoke_child_runs_a_compression_and_decodes():
    r = smoke.run_child()
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("smoke run OK: 400 tokens through a 256-cell budget (")
    assert "4 tokens decoded" in r.stdout


def test_crash_rebuilds_once_with_the_safe_flags_then_passes():
    rec = Recorder([["--crash", "SIGSEGV"], []])
    assert rec.go() == 0
    assert (rec.runs, rec.rebuilds, rec.marks) == (2, 1, 1)
    assert rec.lines[0] == f"ea-local setup: the smoke run of the {BUILD} died with SIGSEGV; rebuilding once with " \
                           "the safe CPU flags"
    assert rec.lines[1].startswith("smoke run OK") and len(rec.lines) == 2


@pytest.mark.parametrize("sig", ["SIGSEGV", "SIGILL"])
def test_crash_after_the_safe_rebuild_names_build_signal_and_what_to_try(sig):
    rec = Recorder([["--crash", sig]])
    assert rec.go() == 1
    assert (rec.runs, rec.rebuilds) == (2, 1)
    last = rec.lines[-1]
    assert last.startswith("ea-local setup: error: ") and BUILD in last and f"died with {sig}" in last
    assert "try: EA_LOCAL_REPACK=0" in last


def test_already_safe_build_is_not_rebuilt():
    rec = Recorder([["--crash", "SIGSEGV"]])
    assert rec.go(rebuild=False) == 1
    assert (rec.runs, rec.rebuilds, rec.marks) == (1, 0, 1)
    assert "died with SIGSEGV" in rec.lines[-1] and "try:" in rec.lines[-1]


def test_failed_rebuild_is_one_line():
    rec = Recorder([["--crash", "SIGSEGV"]])

    def broken() -> None:
        raise RuntimeError("scripts/build_llama.py --cpu-flags safe failed")

    rec.rebuild = broken
    assert rec.go() == 1 and rec.runs == 1
    assert rec.lines[-1].endswith("the safe rebuild failed: scripts/build_llama.py --cpu-flags safe failed")


def test_errors_that_are_not_crashes_are_not_rebuilt():
    rec = Recorder([["--model", "/nonexistent/model.gguf"]])
    assert rec.go() == 1 and rec.rebuilds == 0 and rec.marks == 0
    assert "(exit 1)" in rec.lines[-1] and "no such model file" in rec.lines[-1]
    # the OOM killer's SIGKILL is not the build's fault either
    rec = Recorder([["--crash", "SIGKILL"]])
    assert rec.go() == 1 and rec.rebuilds == 0
    assert "killed by SIGKILL" in rec.lines[-1]


def test_signal_names():
    assert smoke.signal_name(-int(signal.SIGSEGV)) == "SIGSEGV"
    assert smoke.signal_name(0) is None and smoke.signal_name(1) is None


def test_child_rejects_an_unknown_signal_in_one_line():
    r = subprocess.run([sys.executable, "-m", "ea_local.apps.smoke", "--crash", "NOPE"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown signal SIGNOPE" in r.stderr and "Traceback" not in r.stderr
