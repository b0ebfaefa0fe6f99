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

Standard library only: it runs before anything else is installed.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST_NAME = "llama_cpp_python-0.3.36.tar.gz"
SDIST_VERSION = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
ROOT = Path(__file__).resolve().parent.parent
PATCH_DIR = ROOT / "patches"

BACKEND_FLAGS = {
    "cpu": [],
    "cuda": ["-DGGML_CUDA=on"],
    "metal": ["-DGGML_METAL=on"],
}
# what ea_local does not use: the multimodal library, tests, tools
COMMON_FLAGS = ["-DLLAVA_BUILD=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF"]
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


def build_key(backend: str, cmake_args: list[str]) -> str:
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}-{platform.system()}-{platform.machine()}"
    h = hashlib.sha256("\n".join([SDIST_SHA256, patch_hash(), backend, *cmake_args, tag]).encode())
    return h.hexdigest()[:20]


def build_wheel(src: Path, out: Path, backend: str, cmake_args: list[str], isolation: bool) -> Path:
    env = dict(os.environ)
    env["CMAKE_ARGS"] = " ".join(cmake_args)
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(src)]
    if not isolation:
        cmd.insert(4, "--no-build-isolation")
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default=os.environ.get("EA_LOCAL_BACKEND", "cpu"), choices=sorted(BACKEND_FLAGS))
    ap.add_argument("--cmake-args", default=os.environ.get("EA_LOCAL_CMAKE_ARGS", ""),
                    help="extra CMake flags, passed through")
    ap.add_argument("--sdist", type=Path, help="use this local sdist instead of downloading (sha256 still checked)")
    ap.add_argument("--install", action="store_true", help="pip install the wheel into this Python")
    ap.add_argument("--no-build-isolation", action="store_true", help="build with this Python's packages (offline)")
    ap.add_argument("--export-source", type=Path, help="write the patched, trimmed source tree as .tgz and exit")
    ap.add_argument("--rebuild", action="store_true", help="ignore a cached wheel")
    a = ap.parse_args(argv)

    cmake_args = COMMON_FLAGS + BACKEND_FLAGS[a.backend] + a.cmake_args.split()
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
        key = build_key(a.backend, cmake_args)
        wdir = cache / "wheels" / key
        wheels = sorted(wdir.glob("llama_cpp_python-*.whl"))
        if wheels and not a.rebuild:
            wheel = wheels[0]
            log(f"cached wheel {wheel} (key {key}: sdist {SDIST_SHA256[:12]}, patches {patch_hash()[:12]}, {a.backend})")
        else:
            shutil.rmtree(wdir, ignore_errors=True)
            with tempfile.TemporaryDirectory() as td:
                src = unpack(sdist, Path(td), trim=True)
                apply_patches(src)
                tmp_out = Path(td) / "wheel"
                wheel = build_wheel(src, tmp_out, a.backend, cmake_args, not a.no_build_isolation)
                wdir.mkdir(parents=True, exist_ok=True)
                shutil.copy2(tmp_out / "build.log", wdir / "build.log")
                wheel = Path(shutil.copy2(wheel, wdir / wheel.name))
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
