#!/usr/bin/env python3
"""Build llama-cpp-python with ea_local's patches, cached.

Steps: fetch the pinned sdist (sha256 checked), apply patches/*.patch to its vendored
llama.cpp, build a wheel for the chosen backend, keep it under the user's cache directory
keyed by sdist hash + patch hash + build flags, and optionally install it. A second run with
the same inputs reuses the wheel and builds nothing.

    python scripts/build_llama.py --install                  # CPU (default)
    python scripts/build_llama.py --backend cuda --install   # or EA_LOCAL_BACKEND=cuda
    python scripts/build_llama.py --backend metal            # macOS, untested here
    EA_LOCAL_CMAKE_ARGS="-DGGML_AVX512=OFF" python scripts/build_llama.py
    python scripts/build_llama.py --export-source out.tgz    # patched, trimmed tree (offline GPU box)
    python scripts/build_llama.py --no-rpc                   # leave out the RPC backend and ggml-rpc-server
    python scripts/build_llama.py --cpu-flags safe           # or EA_LOCAL_CPU_FLAGS=safe|native (default auto)
    python scripts/build_llama.py --describe                 # the flags and cache key it would use, no build

CPU instruction sets (ea_local/cpu_flags.py): on x86 Linux the flags are picked from /proc/cpuinfo with
GGML_NATIVE=OFF and never AMX (llama.cpp's AMX matmul segfaults; DESIGN.md); ARM and macOS keep
-march=native. The chosen flags are CMake arguments, so they are part of the cache key.

The RPC backend (GGML_RPC=ON) is built by default: the client side goes into the wheel as
libggml-rpc, and the server, ggml-rpc-server, is compiled from the same patched tree and added to the
wheel as llama_cpp/lib/ggml-rpc-server (found there by `ea-local rpc-server`; docs/rpc.md).

Standard library only: it runs before anything else is installed.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.util
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import typing
import zipfile
from pathlib import Path

SDIST_NAME = "llama_cpp_python-0.3.36.tar.gz"
SDIST_VERSION = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
ROOT = Path(__file__).resolve().parent.parent
PATCH_DIR = ROOT / "patches"
# marker left in a wheel's cache directory by scripts/smoke.py when that build crashed here: the auto
# choice then falls back to the safe flags without crashing again
CRASHED = "smoke-crashed"

BACKEND_FLAGS = {
    "cpu": [],
    "cuda": ["-DGGML_CUDA=on"],
    "metal": ["-DGGML_METAL=on"],
}
# what ea_local does not use: the multimodal library, tests, tools
COMMON_FLAGS = ["-DLLAVA_BUILD=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF"]
# the RPC backend: client library in the wheel; RDMA off so the wheel never depends on libibverbs
# (llama.cpp turns it on by itself when that library happens to be installed)
RPC_FLAGS = ["-DGGML_RPC=ON", "-DGGML_RPC_RDMA=OFF"]
RPC_SERVER = "ggml-rpc-server"
# bumped when the way the server is built changes: a cached wheel then gets a new server, not a new build
RPC_SERVER_REV = "2"
# compiled into the server: upstream rpc-server does not ignore SIGPIPE, so a client that disconnects
# before its answer is written (e.g. a handshake check that timed out) kills the server
RPC_SERVER_EXTRA = """// ea_local (scripts/build_llama.py): survive clients that disconnect before their answer
#include <csignal>
static const int ea_local_ignore_sigpipe = (std::signal(SIGPIPE, SIG_IGN), 0);
"""
# bulky parts of the sdist the build does not need (keeps --export-source small)
TRIM = [".git", "vendor/llama.cpp/models", "vendor/llama.cpp/docs", "vendor/llama.cpp/tools/ui",
        "vendor/llama.cpp/media", "vendor/llama.cpp/benches", "docs", "examples"]


class BuildError(Exception):
    pass


def log(msg: str) -> None:
    print(f"[ea-local build] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    if os.environ.get("EA_LOCAL_CACHE"):
        return Path(os.environ["EA_LOCAL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ea_local"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def patches() -> list[Path]:
    return sorted(PATCH_DIR.glob("*.patch"))


def patch_hash() -> str:
    h = hashlib.sha256()
    for p in patches():
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def fetch_sdist(dest_dir: Path, given: Path | None) -> Path:
    dest = dest_dir / SDIST_NAME
    if given is not None:
        src = given
    elif dest.exists():
        src = dest
    else:
        dest_dir.mkdir(parents=True, exist_ok=True)
        log(f"downloading llama-cpp-python {SDIST_VERSION} sdist")
        tmp = Path(tempfile.mkdtemp(dir=dest_dir))
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={SDIST_VERSION}", "-d", str(tmp)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not (tmp / SDIST_NAME).exists():
            raise BuildError(f"could not download the sdist: {r.stderr.strip().splitlines()[-1:] or r.stdout}")
        src = tmp / SDIST_NAME
    digest = sha256_file(src)
    if digest != SDIST_SHA256:
        raise BuildError(f"sha256 mismatch for {src}: got {digest}, expected {SDIST_SHA256}")
    if src != dest:
        dest_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        if src.parent.parent == dest_dir and src.parent.name.startswith("tmp"):
            shutil.rmtree(src.parent, ignore_errors=True)
    return dest


def apply_patches(src: Path, files: list[Path] | None = None) -> None:
    vendor = src / "vendor" / "llama.cpp"
    for p in files if files is not None else patches():
        r = subprocess.run(["patch", "-p1", "--forward", "--batch", "--dry-run", "-i", str(p)],
                           cwd=vendor, capture_output=True, text=True)
        if r.returncode != 0:
            failed = [ln for ln in r.stdout.splitlines() if "FAILED" in ln or "can't find" in ln.lower()
                      or "Reversed" in ln or "checking file" in ln]
            raise BuildError(f"patch {p.name} does not apply to llama.cpp in the sdist:\n  "
                             + "\n  ".join(failed or r.stdout.splitlines()[-5:]))
        subprocess.run(["patch", "-p1", "--forward", "--batch", "--quiet", "-i", str(p)], cwd=vendor, check=True)
        log(f"applied {p.name}")


def unpack(sdist: Path, into: Path, trim: bool) -> Path:
    with tarfile.open(sdist) as tf:
        tf.extractall(into, filter="data") if sys.version_info >= (3, 12) else tf.extractall(into)
    src = into / SDIST_NAME.removesuffix(".tar.gz")
    if trim:
        for rel in TRIM:
            shutil.rmtree(src / rel, ignore_errors=True)
    return src


def _cpu_flags():
    # loaded by path: the ea_local package (and its dependencies) may not be installed yet
    spec = importlib.util.spec_from_file_location("ea_local_cpu_flags", ROOT / "ea_local" / "cpu_flags.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


cpu_flags = _cpu_flags()


def build_key(backend: str, cmake_args: list[str]) -> str:
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}-{platform.system()}-{platform.machine()}"
    h = hashlib.sha256("\n".join([SDIST_SHA256, patch_hash(), backend, *cmake_args, tag]).encode())
    return h.hexdigest()[:20]


def build_wheel(src: Path, out: Path, backend: str, cmake_args: list[str], isolation: bool) -> Path:
    env = dict(os.environ)
    env["CMAKE_ARGS"] = shlex.join(cmake_args)  # scikit-build-core splits it with shlex (CMAKE_C_FLAGS has spaces)
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(src)]
    if not isolation:
        cmd.insert(4, "--no-build-isolation")
    if os.environ.get("EA_LOCAL_BUILD_DIR"):
        # keep scikit-build-core's CMake tree (incremental rebuilds, .ninja_log timings); off by default
        cmd.insert(4, f"--config-settings=build-dir={os.environ['EA_LOCAL_BUILD_DIR']}")
    log(f"building the {backend} wheel (CMAKE_ARGS={env['CMAKE_ARGS']}); this takes minutes")
    logf = out / "build.log"
    out.mkdir(parents=True, exist_ok=True)
    with open(logf, "w") as f:
        r = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        tail = logf.read_text(errors="replace").splitlines()[-25:]
        raise BuildError("wheel build failed (full log: %s):\n%s" % (logf, "\n".join(tail)))
    wheels = sorted(out.glob("llama_cpp_python-*.whl"))
    if not wheels:
        raise BuildError(f"pip reported success but no wheel is in {out}")
    return wheels[0]


def _record_line(name: str, data: bytes) -> str:
    # wheel RECORD format (PEP 376/427): path,sha256=<urlsafe b64, no padding>,size
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def add_rpc_server(src: Path, wheel: Path, work: Path) -> None:
    """Compile tools/rpc/rpc-server.cpp of the patched tree against the wheel's own ggml libraries and
    add it to the wheel next to them (llama_cpp/lib/ggml-rpc-server, rpath $ORIGIN).

    The wheel's build leaves tools out (LLAMA_BUILD_TOOLS=OFF builds every tool); the server is one
    file that needs only libggml and libggml-base, so one compiler call is all it costs."""
    if platform.system() == "Windows":
        raise BuildError("building ggml-rpc-server is only supported on Linux and macOS here; use --no-rpc")
    libdir = work / "lib"
    libdir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        for n in zf.namelist():
            if n.startswith("llama_cpp/lib/") and "ggml" in n.rsplit("/", 1)[-1]:
                (libdir / n.rsplit("/", 1)[-1]).write_bytes(zf.read(n))
        record = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
    if not list(libdir.glob("*ggml-rpc*")):
        raise BuildError(f"the wheel has no libggml-rpc although GGML_RPC=ON was passed ({wheel.name})")
    vendor = src / "vendor" / "llama.cpp"
    exe = work / RPC_SERVER
    extra = work / "ea_sigpipe.cpp"
    extra.write_text(RPC_SERVER_EXTRA)
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "c++"
    origin = "@loader_path" if platform.system() == "Darwin" else "$ORIGIN"
    cmd = [cxx, "-std=c++17", "-O2", f"-I{vendor / 'ggml' / 'include'}", str(vendor / "tools" / "rpc" / "rpc-server.cpp"),
           str(extra), "-o", str(exe), f"-L{libdir}", "-lggml", "-lggml-base", "-pthread", f"-Wl,-rpath,{origin}"]
    if platform.system() != "Darwin":
        cmd.append(f"-Wl,-rpath-link,{libdir}")  # libggml's own dependencies (libggml-cpu, -rpc) at link time
    log(f"compiling {RPC_SERVER}")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"compiling {RPC_SERVER} failed ({' '.join(cmd)}):\n{r.stderr[-3000:]}")
    data = exe.read_bytes()
    arc = f"llama_cpp/lib/{RPC_SERVER}"
    # rewrite the wheel with the server added and its RECORD line (pip checks RECORD on install)
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            if item.filename == arc:
                continue
            body = zin.read(item.filename)
            if item.filename == record:
                lines = [ln for ln in body.decode().splitlines() if ln and not ln.startswith(arc + ",")]
                lines.insert(-1, _record_line(arc, data))  # RECORD's own line stays last
                body = ("\n".join(lines) + "\n").encode()
            zout.writestr(item, body)
        info = zipfile.ZipInfo(arc, date_time=(2020, 1, 1, 0, 0, 0))
        info.external_attr = (0o100755 << 16)  # regular file, executable: pip keeps the x bit
        info.compress_type = zipfile.ZIP_DEFLATED
        zout.writestr(info, data)
    tmp.replace(wheel)
    log(f"added {arc} to {wheel.name}")


class Plan(typing.NamedTuple):
    backend: str
    cpu: typing.Any  # cpu_flags.Choice
    cmake_args: list[str]
    key: str

    def describe(self) -> str:
        return f"{self.backend} build {self.key} (CPU: {self.cpu.summary})"


def plan(backend: str, cpu_level: str, rpc: bool, extra: list[str], cache: Path | None = None) -> Plan:
    """The flags and cache key a build with these inputs uses. An auto choice that crashed in the smoke
    run on this machine before (scripts/smoke.py left a marker) becomes the safe one."""
    cache = cache or cache_dir()

    def make(level: str) -> Plan:
        cpu = cpu_flags.choose(level)
        args = COMMON_FLAGS + BACKEND_FLAGS[backend] + list(cpu.cmake_args) + (RPC_FLAGS if rpc else []) + extra
        return Plan(backend, cpu, args, build_key(backend, args))

    p = make(cpu_level)
    if cpu_level == "auto" and (cache / "wheels" / p.key / CRASHED).exists():
        log(f"the {p.describe()} crashed in the smoke run here before: using the safe CPU flags")
        p = make("safe")
    return p


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default=os.environ.get("EA_LOCAL_BACKEND", "cpu"), choices=sorted(BACKEND_FLAGS))
    ap.add_argument("--cmake-args", default=os.environ.get("EA_LOCAL_CMAKE_ARGS", ""),
                    help="extra CMake flags, passed through (after the chosen ones, so they win)")
    ap.add_argument("--cpu-flags", default=os.environ.get("EA_LOCAL_CPU_FLAGS", "auto"), choices=cpu_flags.LEVELS,
                    help="CPU instruction sets: auto (from this CPU, never AMX), safe (at most AVX2), native "
                         "(-march=native); default: EA_LOCAL_CPU_FLAGS or auto")
    ap.add_argument("--describe", action="store_true", help="print the build's key and CPU flags and exit")
    ap.add_argument("--sdist", type=Path, help="use this local sdist instead of downloading (sha256 still checked)")
    ap.add_argument("--install", action="store_true", help="pip install the wheel into this Python")
    ap.add_argument("--no-build-isolation", action="store_true", help="build with this Python's packages (offline)")
    ap.add_argument("--export-source", type=Path, help="write the patched, trimmed source tree as .tgz and exit")
    ap.add_argument("--rebuild", action="store_true", help="ignore a cached wheel")
    ap.add_argument("--rpc", action=argparse.BooleanOptionalAction,
                    default=os.environ.get("EA_LOCAL_RPC_BUILD", "1") != "0",
                    help="include llama.cpp's RPC backend and ggml-rpc-server (default: on; EA_LOCAL_RPC_BUILD=0 turns it off)")
    a = ap.parse_args(argv)

    try:
        user_args = shlex.split(a.cmake_args)
    except ValueError as e:
        log(f"error: EA_LOCAL_CMAKE_ARGS / --cmake-args: {e}")
        return 2
    pl = plan(a.backend, a.cpu_flags, a.rpc, user_args)
    if a.describe:
        print(pl.describe())
        print(shlex.join(pl.cmake_args))
        return 0
    cmake_args = pl.cmake_args
    log(f"CPU flags: {pl.cpu.summary}")
    cache = cache_dir()
    try:
        sdist = fetch_sdist(cache / "sdist", a.sdist)
        if a.export_source:
            with tempfile.TemporaryDirectory() as td:
                src = unpack(sdist, Path(td), trim=True)
                apply_patches(src)
                with tarfile.open(a.export_source, "w:gz") as tf:
                    tf.add(src, arcname=src.name)
            log(f"wrote {a.export_source} ({a.export_source.stat().st_size / 2**20:.1f} MiB)")
            return 0
        key = pl.key
        wdir = cache / "wheels" / key
        wheels = sorted(wdir.glob("llama_cpp_python-*.whl"))
        rev = wdir / "rpc-server.rev"
        if wheels and not a.rebuild:
            wheel = wheels[0]
            log(f"cached wheel {wheel} (key {key}: sdist {SDIST_SHA256[:12]}, patches {patch_hash()[:12]}, {a.backend})")
            if a.rpc and (not rev.exists() or rev.read_text().strip() != RPC_SERVER_REV):
                with tempfile.TemporaryDirectory() as td:  # only the server is rebuilt (seconds)
                    src = unpack(sdist, Path(td), trim=True)
                    apply_patches(src)
                    add_rpc_server(src, wheel, Path(td) / "rpc")
                rev.write_text(RPC_SERVER_REV + "\n")
        else:
            shutil.rmtree(wdir, ignore_errors=True)
            with tempfile.TemporaryDirectory() as td:
                src = unpack(sdist, Path(td), trim=True)
                apply_patches(src)
                tmp_out = Path(td) / "wheel"
                wheel = build_wheel(src, tmp_out, a.backend, cmake_args, not a.no_build_isolation)
                if a.rpc:
                    add_rpc_server(src, wheel, Path(td) / "rpc")
                wdir.mkdir(parents=True, exist_ok=True)
                shutil.copy2(tmp_out / "build.log", wdir / "build.log")
                wheel = Path(shutil.copy2(wheel, wdir / wheel.name))
                if a.rpc:
                    rev.write_text(RPC_SERVER_REV + "\n")
            log(f"built {wheel}")
        if a.install:
            r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--force-reinstall", "--no-deps",
                                str(wheel)])
            if r.returncode != 0:
                raise BuildError("pip install of the wheel failed")
            # llama-cpp-python's own runtime dependencies (its wheel was installed without them)
            r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "typing-extensions>=4.5.0",
                                "numpy>=1.20.0", "diskcache>=5.6.1", "jinja2>=2.11.3"])
            if r.returncode != 0:
                raise BuildError("installing llama-cpp-python's dependencies failed")
            log("installed the patched llama-cpp-python")
        print(wheel)
        return 0
    except BuildError as e:
        log(f"error: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
