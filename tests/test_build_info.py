"""ea_local/build_info.py and `ea-local info`'s build section; the default n_gpu_layers."""
from __future__ import annotations

import subprocess
import sys

import pytest

from ea_local import build_info as bi_mod
from ea_local import cpu_flags, kvhooks
from ea_local.build_info import BuildInfo, Device, compiled_vs_cpu, format_build, offload_text

from .conftest import GEMMA
from .test_cpu_flags import SAPPHIRE_RAPIDS, ZEN2

CPU = Device("CPU", "Some CPU", "CPU", "CPU")
H100 = Device("CUDA0", "NVIDIA H100 80GB HBM3", "GPU", "CUDA")


def cpu_build(**feats: str) -> BuildInfo:
    return BuildInfo("libllama.so", {"CPU": 1, "RPC": 0}, [CPU], feats or {"AVX2": "1"})


def cuda_build(devices=(CPU, H100)) -> BuildInfo:
    return BuildInfo("libllama.so", {"CUDA": len(devices) - 1, "CPU": 1, "RPC": 0}, list(devices), {"AVX2": "1"})


def test_this_build_reports_its_cpu_features_and_runs_on_this_cpu():
    """The loaded library's CPU backend lists what it was compiled with; everything listed is an
    instruction set this CPU has (else the build would crash here), and AMX is never compiled."""
    b = bi_mod.read_build_info()
    assert "CPU" in b.backends and any(d.kind == "CPU" for d in b.devices)
    assert b.cpu_features, "the CPU backend reported no features"
    text = cpu_flags.read_cpuinfo()
    cpu = cpu_flags.parse_cpuinfo(text or "")
    if not cpu:
        pytest.skip("no /proc/cpuinfo flags here")
    missing = [f for f, need in cpu_flags.FEATURE_CPUINFO.items()
               if f in b.cpu_features and not any(n in cpu for n in need)]
    assert missing == []
    assert "AMX_INT8" not in b.cpu_features


def test_cpu_build_offloads_nothing_by_default(monkeypatch):
    monkeypatch.delenv("EA_LOCAL_N_GPU_LAYERS", raising=False)
    if bi_mod.read_build_info().gpus:
        pytest.skip("this build has a GPU device")
    assert bi_mod.default_gpu_layers() == 0
    assert bi_mod.default_gpu_layers(rpc=True) == -1  # RPC servers: every layer, llama.cpp's default


def test_gpu_build_offloads_every_layer_by_default(monkeypatch):
    monkeypatch.setattr(bi_mod, "_has_local_gpu", lambda: True)
    assert bi_mod.default_gpu_layers() == -1


def _load_params(monkeypatch, **cfg) -> int:
    """n_gpu_layers the engine passes to llama_model_load_from_file for a ContextConfig."""
    from ea_local.engine import runtime

    seen = []
    real = runtime.ll.llama_model_load_from_file

    def spy(path, mp):
        seen.append(mp.n_gpu_layers)
        return real(path, mp)

    monkeypatch.setattr(runtime.ll, "llama_model_load_from_file", spy)
    rt = runtime.Runtime(GEMMA, runtime.ContextConfig(n_ctx=64, **cfg))
    rt.close()
    return seen[0]


def test_engine_takes_the_default_and_the_overrides(monkeypatch):
    monkeypatch.delenv("EA_LOCAL_N_GPU_LAYERS", raising=False)
    monkeypatch.setattr(bi_mod, "_has_local_gpu", lambda: True)  # as on a CUDA/Metal build
    assert _load_params(monkeypatch) == -1
    assert _load_params(monkeypatch, n_gpu_layers=3) == 3  # --n-gpu-layers
    monkeypatch.setenv("EA_LOCAL_N_GPU_LAYERS", "5")
    assert _load_params(monkeypatch) == 5
    monkeypatch.delenv("EA_LOCAL_N_GPU_LAYERS")
    monkeypatch.setattr(bi_mod, "_has_local_gpu", lambda: False)  # a CPU build
    assert _load_params(monkeypatch) == 0


def test_offload_text_for_gpu_and_cpu_builds(monkeypatch):
    monkeypatch.delenv("EA_LOCAL_N_GPU_LAYERS", raising=False)
    monkeypatch.setattr(bi_mod, "_has_local_gpu", lambda: True)
    t = offload_text(cuda_build(), 18, None)
    assert t.startswith("all 18 layers + output to CUDA0 (NVIDIA H100 80GB HBM3) (default;")
    assert offload_text(cuda_build(), 18, 10, "--n-gpu-layers").startswith(
        "10 of 19 (18 layers + output, from the output down) to CUDA0")
    assert offload_text(cuda_build(), 18, 0, "EA_LOCAL_N_GPU_LAYERS").startswith("none: n_gpu_layers 0")
    monkeypatch.setattr(bi_mod, "_has_local_gpu", lambda: False)
    assert offload_text(cpu_build(), 18, None).startswith("none: CPU build, no GPU backend")
    assert "the CUDA backend found no device" in offload_text(cuda_build([CPU]), 18, None)
    assert "has nothing to offload to" in offload_text(cpu_build(), 18, 7, "--n-gpu-layers")


def test_compiled_features_against_the_cpu():
    spr = cpu_flags.parse_cpuinfo(SAPPHIRE_RAPIDS)
    line = compiled_vs_cpu({"AVX2": "1", "AVX512": "1", "AVX512_VNNI": "1", "AVX512_BF16": "1", "AVX512_VBMI": "1",
                            "AVX_VNNI": "1", "F16C": "1", "FMA": "1", "BMI2": "1", "AVX": "1"}, spr)
    assert line.startswith("has every instruction set compiled in")
    assert "does not use: SSE3 SSSE3 AMX_INT8 (AMX: llama.cpp's AMX matmul crashes, never compiled)" in line
    # a wheel built for AVX-512 on an AVX2 AMD: the crash it will be, named
    line = compiled_vs_cpu({"AVX2": "1", "AVX512": "1"}, cpu_flags.parse_cpuinfo(ZEN2))
    assert line.startswith("LACKS AVX512 that this build uses: it will crash here (SIGILL)")
    assert compiled_vs_cpu({"AVX2": "1"}, frozenset()) == ""


def test_format_build(monkeypatch):
    monkeypatch.delenv("EA_LOCAL_N_GPU_LAYERS", raising=False)
    monkeypatch.setattr(bi_mod, "_has_local_gpu", lambda: False)
    out = format_build(cpu_build(AVX2="1", FMA="1", SVE_CNT="16"), 18, None, cpuinfo=ZEN2)
    lines = out.splitlines()
    assert lines[0].startswith(f"build: llama.cpp with ea_local's hooks (API v{kvhooks.API_VERSION}), libllama.so")
    assert "  backends      CPU (1 device), RPC (servers given with --rpc)" in lines
    assert "  CPU features  AVX2 FMA SVE_CNT=16" in lines
    assert any(ln.startswith("  this CPU      has every instruction set compiled in") for ln in lines)
    assert any(ln.startswith("  GPU offload   none: CPU build") for ln in lines)
    monkeypatch.setenv("EA_LOCAL_N_GPU_LAYERS", "4")
    assert "n_gpu_layers 4 has nothing to offload to" in format_build(cpu_build(), 18, None, cpuinfo="")
    monkeypatch.setenv("EA_LOCAL_N_GPU_LAYERS", "many")
    with pytest.raises(ValueError, match="EA_LOCAL_N_GPU_LAYERS must be -1"):
        format_build(cpu_build(), 18, None, cpuinfo="")


def _ea(*args, env=None):
    import os

    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "ea_local.cli", *args], capture_output=True, text=True, env=e)


def test_cli_info_shows_the_build():
    r = _ea("info")
    assert r.returncode == 0, r.stderr
    assert "\nbuild: llama.cpp with ea_local's hooks" in r.stdout
    for row in ("backends", "CPU features", "this CPU", "GPU offload"):
        assert f"\n  {row}" in r.stdout
    r = _ea("info", env={"EA_LOCAL_N_GPU_LAYERS": "x"})
    assert r.returncode == 2 and r.stderr.strip().endswith("got 'x'") and "Traceback" not in r.stderr
    r = _ea("info", "--n-gpu-layers", "-4")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "-1 (all) or more" in r.stderr
