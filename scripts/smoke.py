#!/usr/bin/env python3
"""The end of setup: run the freshly installed llama.cpp once, in a child process, and recover from a crash.

The child is `python -m ea_local.apps.smoke` (load the default model, prefill a few hundred tokens through
one compression, decode a few tokens). If it dies by a crash signal, the build that was installed is
marked as crashing here (scripts/build_llama.py then never picks it again on this machine), the wheel is
rebuilt once with the safe CPU flags and installed, and the child runs again. If that one crashes too,
setup stops with one line naming the build, the signal and what to try.

    .venv/bin/python scripts/smoke.py       # what scripts/setup.sh runs

Standard library only (plus the child, which needs ea_local installed).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_llama  # noqa: E402

# signals that mean "the code crashed" (an instruction the CPU lacks, a bad memory access, ggml's
# GGML_ASSERT -> abort): a rebuild with other CPU flags may help. SIGKILL (the OOM killer) or SIGINT (the
# user) are not the build's fault and end setup instead.
CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGILL, signal.SIGBUS, signal.SIGFPE, signal.SIGABRT}
TIMEOUT_S = 900
TRY = ("try: EA_LOCAL_REPACK=0 (no CPU weight repacking), EA_LOCAL_THREADS=1, or a build without AVX: "
       "EA_LOCAL_CMAKE_ARGS=\"-DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF\" bash scripts/setup.sh; "
       "`ea-local info` shows what is compiled in")


class Result(NamedTuple):
    returncode: int  # negative: killed by that signal (subprocess convention)
    stdout: str
    stderr: str


def run_child(args: list[str] | None = None, timeout: float = TIMEOUT_S) -> Result:
    cmd = [sys.executable, "-m", "ea_local.apps.smoke", *(args or [])]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Result(124, "", f"the smoke run did not finish in {timeout:.0f} s")
    return Result(r.returncode, r.stdout, r.stderr)


def signal_name(returncode: int) -> str | None:
    if returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def smoke_with_fallback(run: Callable[[], Result], rebuild: Callable[[], None] | None, build_name: Callable[[], str],
                        mark_crashed: Callable[[], None], say: Callable[[str], None] = print) -> int:
    """0 when the smoke run passes (rebuilding once with the safe flags after a crash), 1 otherwise.

    run: one smoke run in a child process; rebuild: build and install the safe-flags wheel (raises on
    failure; None when the installed build already has the safe flags); build_name: the installed build in words; mark_crashed: remember that the installed build
    crashes on this machine. All injectable so the tests can crash a child on purpose without building."""
    r = run()
    if r.returncode == 0:
        say(_last_line(r.stdout))
        return 0
    sig = signal_name(r.returncode)
    if sig is None or -r.returncode not in {int(s) for s in CRASH_SIGNALS}:
        why = f"killed by {sig}" if sig else f"exit {r.returncode}"
        say(f"ea-local setup: error: the smoke run of the {build_name()} failed ({why}): "
            f"{_last_line(r.stderr) or _last_line(r.stdout) or 'no output'}")
        return 1
    first = build_name()
    mark_crashed()
    if rebuild is None:
        say(f"ea-local setup: error: the {first} died with {sig}; {TRY}")
        return 1
    say(f"ea-local setup: the smoke run of the {first} died with {sig}; rebuilding once with the safe CPU flags")
    try:
        rebuild()
    except Exception as e:  # noqa: BLE001 - reported as one line
        say(f"ea-local setup: error: the {first} died with {sig} and the safe rebuild failed: {e}")
        return 1
    r2 = run()
    if r2.returncode == 0:
        say(_last_line(r2.stdout) + f" (safe CPU flags: {build_name()})")
        return 0
    sig2 = signal_name(r2.returncode)
    why = f"died with {sig2}" if sig2 else f"failed (exit {r2.returncode}: {_last_line(r2.stderr) or 'no output'})"
    say(f"ea-local setup: error: the {build_name()} {why} after the {first} died with {sig}; {TRY}")
    return 1


def _plan(level: str | None = None) -> "build_llama.Plan":
    """The plan build_llama.py made for this setup (same environment variables, same defaults)."""
    return build_llama.plan(os.environ.get("EA_LOCAL_BACKEND", "cpu"),
                            level or os.environ.get("EA_LOCAL_CPU_FLAGS", "auto"),
                            os.environ.get("EA_LOCAL_RPC_BUILD", "1") != "0",
                            build_llama.shlex.split(os.environ.get("EA_LOCAL_CMAKE_ARGS", "")))


def main() -> int:
    state = {"plan": _plan()}

    def mark() -> None:
        d = build_llama.cache_dir() / "wheels" / state["plan"].key
        d.mkdir(parents=True, exist_ok=True)
        (d / build_llama.CRASHED).write_text("the smoke run died by a signal with this build on this machine\n")

    def rebuild() -> None:
        cmd = [sys.executable, str(Path(__file__).with_name("build_llama.py")), "--install", "--cpu-flags", "safe"]
        if subprocess.run(cmd).returncode != 0:
            raise RuntimeError("scripts/build_llama.py --cpu-flags safe failed (its log is above)")
        state["plan"] = _plan("safe")

    safe = state["plan"].cpu.level == "safe"
    return smoke_with_fallback(run_child, None if safe else rebuild, lambda: state["plan"].describe(), mark)


if __name__ == "__main__":
    sys.exit(main())
