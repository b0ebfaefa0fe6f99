"""Which CPU instruction sets the llama.cpp build compiles in.

Standard library only, and importable by file path without the ea_local package: the build script
(scripts/build_llama.py) loads it before anything is installed.

Why not llama.cpp's own default (GGML_NATIVE=ON, i.e. `-march=native`): on an Intel CPU with AMX it
compiles ggml's AMX matmul and repacks Q4_K weights into its buffer, and the first decode segfaults in
`ggml_backend_amx_mul_mat` (llama.cpp issue 20824; DESIGN.md). So on x86 Linux the build turns
GGML_NATIVE off and names every instruction set itself, from the flags the kernel reports in
/proc/cpuinfo, with AMX always off. Every GGML_* option is passed explicitly ON or OFF: with
GGML_NATIVE=OFF ggml turns SSE4.2/AVX/AVX2/BMI2/FMA/F16C on by default (ggml/CMakeLists.txt, `INS_ENB`),
which would crash an AVX-only CPU with SIGILL.

To keep native speed, the instruction sets that ggml's sources test with compiler macros but that
have no GGML_* option (`__AVX512FP16__` in simd-mappings.h, `__GFNI__` in tiled/tiled-kernel.h,
`__AVXVNNIINT8__` in arch/x86/{quants.c,repack.cpp}) go into CMAKE_C_FLAGS/CMAKE_CXX_FLAGS, with
`-mtune=native` (what `-march=native` also implies). Each compiler flag is first tried on the
compiler, so an older GCC that does not know, say, -mavx512fp16 leaves that one out instead of
failing the build — as `-march=native` would silently leave it out.

ARM (aarch64), macOS and other architectures keep llama.cpp's native build: AMX is x86 only.

Levels: "auto" (the above), "safe" (x86: at most the AVX2 set — SSE4.2, AVX, AVX2, FMA, F16C, BMI2 —
as far as the CPU has it, no AVX-512, no VNNI, no AMX, no extra compiler flags; elsewhere
GGML_NATIVE=OFF, the architecture's baseline), "native" (llama.cpp's default, nothing passed).
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterable

LEVELS = ("auto", "safe", "native")

# GGML option -> (/proc/cpuinfo flags the CPU must report, compiler flags ggml adds for it).
# The compiler flags are the GCC/Clang branch of ggml/src/ggml-cpu/CMakeLists.txt (x86, not MSVC).
# Kernel flag names: arch/x86/include/asm/cpufeatures.h.
X86_OPTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "GGML_SSE42": (("sse4_2",), ("-msse4.2",)),
    "GGML_AVX": (("avx",), ("-mavx",)),
    "GGML_AVX2": (("avx2",), ("-mavx2",)),
    "GGML_FMA": (("fma",), ("-mfma",)),
    "GGML_F16C": (("f16c",), ("-mf16c",)),
    "GGML_BMI2": (("bmi2",), ("-mbmi2",)),
    "GGML_AVX_VNNI": (("avx_vnni",), ("-mavxvnni",)),
    # ggml's GGML_AVX512 adds all five; a CPU with only some of them (Xeon Phi) gets none
    "GGML_AVX512": (("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
                    ("-mavx512f", "-mavx512cd", "-mavx512vl", "-mavx512dq", "-mavx512bw")),
    "GGML_AVX512_VBMI": (("avx512vbmi",), ("-mavx512vbmi",)),
    "GGML_AVX512_VNNI": (("avx512_vnni",), ("-mavx512vnni",)),
    "GGML_AVX512_BF16": (("avx512_bf16",), ("-mavx512bf16",)),
}
# never compiled: the crash this module exists for
X86_OFF_ALWAYS = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")
# options that only make sense on top of GGML_AVX512 / GGML_AVX2
_NEEDS = {"GGML_AVX512_VBMI": "GGML_AVX512", "GGML_AVX512_VNNI": "GGML_AVX512", "GGML_AVX512_BF16": "GGML_AVX512",
          "GGML_AVX_VNNI": "GGML_AVX2", "GGML_AVX2": "GGML_AVX", "GGML_AVX512": "GGML_AVX2"}
# macros ggml reads that no GGML_* option sets: cpuinfo flags -> compiler flag, and the option it builds on
X86_EXTRA: dict[str, tuple[tuple[str, ...], str, str]] = {
    "AVX512_FP16": (("avx512_fp16",), "-mavx512fp16", "GGML_AVX512"),
    "GFNI": (("gfni",), "-mgfni", "GGML_AVX2"),
    "AVX_VNNI_INT8": (("avx_vnni_int8",), "-mavxvnniint8", "GGML_AVX2"),
}
# the CPU backend's feature names (ggml-cpu.cpp ggml_backend_cpu_get_features, what `ea-local info` shows)
# -> the /proc/cpuinfo flags that mean the CPU has it
FEATURE_CPUINFO: dict[str, tuple[str, ...]] = {
    "SSE3": ("pni",), "SSSE3": ("ssse3",), "AVX": ("avx",), "AVX_VNNI": ("avx_vnni",), "AVX2": ("avx2",),
    "F16C": ("f16c",), "FMA": ("fma",), "BMI2": ("bmi2",), "AVX512": ("avx512f",), "AVX512_VBMI": ("avx512vbmi",),
    "AVX512_VNNI": ("avx512_vnni",), "AVX512_BF16": ("avx512_bf16",), "AMX_INT8": ("amx_int8",),
    "NEON": ("asimd",), "DOTPROD": ("asimddp",), "SVE": ("sve",), "MATMUL_INT8": ("i8mm",), "FP16_VA": ("asimdhp",),
    "SME": ("sme",),
}
# the safe level: x86-64-v3 and below
SAFE_X86 = ("GGML_SSE42", "GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2")
X86_MACHINES = ("x86_64", "amd64", "i386", "i486", "i586", "i686", "x86")


@dataclass(frozen=True)
class Choice:
    level: str
    cmake_args: tuple[str, ...]
    summary: str  # one line for the build log and `ea-local info`


def parse_cpuinfo(text: str) -> frozenset[str]:
    """The CPU's feature flags: the first `flags` line (x86) or `Features` line (ARM) of /proc/cpuinfo."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def read_cpuinfo(path: str = "/proc/cpuinfo") -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def compiler_probe(compilers: Iterable[str] | None = None) -> Callable[[str], bool]:
    """flag -> whether every compiler CMake will use accepts it (compiles an empty file with -Werror).

    A compiler that cannot be run at all is not judged: every flag counts as accepted, and the build
    itself reports the missing compiler."""
    cands = list(compilers) if compilers is not None else [
        os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or "cc",
        os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "c++"]
    cache: dict[str, bool] = {}

    def run(cc: str, flags: list[str]) -> bool:
        with tempfile.TemporaryDirectory() as td:
            src = os.path.join(td, "probe.c")
            with open(src, "w") as f:
                f.write("int ea_local_probe;\n")
            try:
                r = subprocess.run([cc, "-Werror", *flags, "-c", src, "-o", os.path.join(td, "probe.o")],
                                   capture_output=True, timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                return False
            return r.returncode == 0

    usable = [cc for cc in cands if run(cc, [])]

    def supports(flag: str) -> bool:
        if flag not in cache:
            cache[flag] = all(run(cc, [flag]) for cc in usable)
        return cache[flag]

    return supports


def _x86(flags: frozenset[str], level: str, supports: Callable[[str], bool]) -> Choice:
    on: dict[str, bool] = {}
    allowed = SAFE_X86 if level == "safe" else tuple(X86_OPTIONS)
    for opt, (need, cflags) in X86_OPTIONS.items():  # dict order puts every option after the one it needs
        ok = opt in allowed and all(f in flags for f in need) and on.get(_NEEDS.get(opt, ""), True)
        on[opt] = ok and all(supports(c) for c in cflags)
    extra: list[str] = []
    extra_names: list[str] = []
    if level == "auto":
        if supports("-mtune=native"):
            extra.append("-mtune=native")
        for name, (need, cflag, base) in X86_EXTRA.items():
            if on[base] and all(f in flags for f in need) and supports(cflag):
                extra.append(cflag)
                extra_names.append(name)
    args = ["-DGGML_NATIVE=OFF"]
    args += [f"-D{opt}={'ON' if v else 'OFF'}" for opt, v in on.items()]
    args += [f"-D{opt}=OFF" for opt in X86_OFF_ALWAYS]
    if extra:
        joined = " ".join(extra)
        args += [f"-DCMAKE_C_FLAGS={joined}", f"-DCMAKE_CXX_FLAGS={joined}"]
    names = [o.removeprefix("GGML_") for o, v in on.items() if v] + extra_names
    amx = " (the CPU has AMX: not compiled)" if "amx_int8" in flags or "amx_tile" in flags else ""
    return Choice(level, tuple(args), f"x86 {level}: {' '.join(names) or 'no SIMD beyond SSE2'}; AMX off{amx}")


def choose(level: str = "auto", cpuinfo: str | None = None, machine: str | None = None,
           system: str | None = None, supports: Callable[[str], bool] | None = None) -> Choice:
    """The CMake flags for the CPU part of the build. cpuinfo/machine/system default to this machine's;
    supports: flag -> compiler accepts it (default: try the compilers)."""
    if level not in LEVELS:
        raise ValueError(f"unknown CPU flag level {level!r}; choose from {', '.join(LEVELS)}")
    machine = (machine or platform.machine()).lower()
    system = system or platform.system()
    if level == "native":
        return Choice(level, (), "native (-march=native, llama.cpp's default)")
    if machine not in X86_MACHINES or system != "Linux":
        if level == "safe":
            return Choice(level, ("-DGGML_NATIVE=OFF",), f"{machine} safe: the architecture's baseline")
        return Choice(level, (), f"{machine} {system}: native (-march=native; AMX is x86 only)")
    text = read_cpuinfo() if cpuinfo is None else cpuinfo
    flags = parse_cpuinfo(text or "")
    if not flags:
        if level == "safe":
            return Choice(level, ("-DGGML_NATIVE=OFF",) + tuple(f"-D{o}=OFF" for o in (*X86_OPTIONS, *X86_OFF_ALWAYS)),
                          "x86 safe: /proc/cpuinfo unreadable, no SIMD beyond SSE2")
        return Choice(level, (), "x86: /proc/cpuinfo unreadable, native (-march=native)")
    return _x86(flags, level, supports or _default_probe())


_probe: list[Callable[[str], bool]] = []


def _default_probe() -> Callable[[str], bool]:
    if not _probe:  # one probe per process: the compilers do not change under it
        _probe.append(compiler_probe())
    return _probe[0]
