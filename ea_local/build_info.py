"""The llama.cpp build this process runs: its backends and devices, the CPU features compiled in, and
how many layers go to a GPU by default (what `ea-local info` prints under "build").

Everything is asked of the loaded library at run time, through ggml's backend registry
(ggml-backend.h: each backend's `ggml_backend_get_features`, which for the CPU backend lists the
instruction sets its code was compiled with — the list `llama_print_system_info` prints).
"""
from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass, field

from . import kvhooks  # noqa: F401  (loads libllama, and with it libggml*, first)
from .ggml_registry import fn
from . import cpu_flags

# enum ggml_backend_dev_type (ggml-backend.h)
_DEV_TYPES = {0: "CPU", 1: "GPU", 2: "iGPU", 3: "accelerator"}


class _Feature(ctypes.Structure):  # struct ggml_backend_feature
    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    kind: str  # CPU, GPU, iGPU, accelerator
    backend: str


@dataclass
class BuildInfo:
    library: str
    backends: dict[str, int] = field(default_factory=dict)  # registry name -> devices it has
    devices: list[Device] = field(default_factory=list)
    cpu_features: dict[str, str] = field(default_factory=dict)  # "AVX2" -> "1", "SVE_CNT" -> "16"

    @property
    def gpus(self) -> list[Device]:
        """Local GPUs in llama.cpp's default order: discrete ones, integrated only when there is none
        (llama_model_load's device choice); RPC devices are not local."""
        gpus = [d for d in self.devices if d.kind == "GPU" and d.backend != "RPC"]
        return gpus or [d for d in self.devices if d.kind == "iGPU"]


def read_build_info() -> BuildInfo:
    kvhooks._ll.llama_backend_init()
    lib = getattr(kvhooks._lib, "_name", "libllama")
    bi = BuildInfo(library=str(lib))
    for i in range(fn("ggml_backend_reg_count")()):
        reg = fn("ggml_backend_reg_get")(i)
        name = fn("ggml_backend_reg_name")(reg).decode()
        bi.backends[name] = fn("ggml_backend_reg_dev_count")(reg)
        if name == "CPU":
            addr = fn("ggml_backend_reg_get_proc_address")(reg, b"ggml_backend_get_features")
            if addr:
                feats = ctypes.CFUNCTYPE(ctypes.POINTER(_Feature), ctypes.c_void_p)(addr)(reg)
                j = 0
                while feats[j].name:
                    bi.cpu_features[feats[j].name.decode()] = (feats[j].value or b"").decode()
                    j += 1
    for i in range(fn("ggml_backend_dev_count")()):
        d = fn("ggml_backend_dev_get")(i)
        bi.devices.append(Device(fn("ggml_backend_dev_name")(d).decode(), fn("ggml_backend_dev_description")(d).decode(),
                                 _DEV_TYPES.get(fn("ggml_backend_dev_type")(d), "?"),
                                 fn("ggml_backend_reg_name")(fn("ggml_backend_dev_backend_reg")(d)).decode()))
    return bi


@functools.lru_cache(maxsize=1)
def _has_local_gpu() -> bool:
    return bool(read_build_info().gpus)


def default_gpu_layers(rpc: bool = False) -> int:
    """n_gpu_layers when neither --n-gpu-layers nor EA_LOCAL_N_GPU_LAYERS says: every layer (-1) on a build
    with a GPU device (CUDA, Metal, ...; as Ollama and llama-server do) or with RPC servers, 0 on a CPU build."""
    return -1 if rpc or _has_local_gpu() else 0


def env_gpu_layers() -> int | None:
    v = os.environ.get("EA_LOCAL_N_GPU_LAYERS")
    if not v:
        return None
    try:
        n = int(v)
    except ValueError:
        n = -2
    if n < -1:
        raise ValueError(f"EA_LOCAL_N_GPU_LAYERS must be -1 (all) or a number of layers, got {v!r}")
    return n


def offload_text(bi: BuildInfo, n_layer: int | None, n_gpu_layers: int | None, source: str = "") -> str:
    """Where the model's layers go: what `ea-local info` says under "GPU offload".

    llama.cpp counts n_gpu_layers over the repeating layers plus the output layer, from the output
    down (llama-model.cpp load_tensors: i_gpu_start = n_layer + 1 - n_gpu_layers); -1 is all of them."""
    gpus = bi.gpus
    ngl = default_gpu_layers() if n_gpu_layers is None else n_gpu_layers
    how = source or ("default" if n_gpu_layers is None else "")
    if not gpus:
        kinds = [b for b in bi.backends if b not in ("CPU", "RPC")]
        why = (f"the {'/'.join(kinds)} backend found no device" if kinds else "CPU build, no GPU backend")
        extra = f"; {how} n_gpu_layers {ngl} has nothing to offload to" if ngl not in (0, None) else ""
        return f"none: {why}; every layer runs on the CPU{extra} (with --rpc every layer goes to the RPC servers)"
    where = ", ".join(f"{d.name} ({d.description})" for d in gpus)
    if n_layer is None:
        n = "every layer" if ngl < 0 else f"{ngl} layers (counted from the output down)"
    else:
        total = n_layer + 1
        k = total if ngl < 0 else min(ngl, total)
        n = (f"all {n_layer} layers + output" if k == total else
             f"{k} of {total} ({n_layer} layers + output, from the output down)")
    if ngl == 0:
        return f"none: n_gpu_layers 0 ({how}); GPU available: {where}"
    return f"{n} to {where} ({how}; --n-gpu-layers / EA_LOCAL_N_GPU_LAYERS override)"


def format_build(bi: BuildInfo, n_layer: int | None = None, n_gpu_layers: int | None = None,
                 cpuinfo: str | None = None) -> str:
    """The build section of `ea-local info`. n_gpu_layers: an explicit --n-gpu-layers (None: the default,
    EA_LOCAL_N_GPU_LAYERS if set); cpuinfo: /proc/cpuinfo text to check the compiled features against."""
    rows: list[tuple[str, str]] = []
    backends = ", ".join(f"{b} ({n} device{'s' if n != 1 else ''})" if b != "RPC" else "RPC (servers given with --rpc)"
                         for b, n in bi.backends.items())
    rows.append(("backends", backends or "none registered"))
    rows.append(("devices", ", ".join(f"{d.name} ({d.kind}: {d.description})" for d in bi.devices) or "none"))
    feats = [k if v == "1" else f"{k}={v}" for k, v in bi.cpu_features.items()]
    rows.append(("CPU features", " ".join(feats) or "none reported"))
    text = cpu_flags.read_cpuinfo() if cpuinfo is None else cpuinfo
    check = compiled_vs_cpu(bi.cpu_features, cpu_flags.parse_cpuinfo(text or ""))
    if check:
        rows.append(("this CPU", check))
    if n_gpu_layers is None and env_gpu_layers() is not None:
        rows.append(("GPU offload", offload_text(bi, n_layer, env_gpu_layers(), "EA_LOCAL_N_GPU_LAYERS")))
    else:
        rows.append(("GPU offload", offload_text(bi, n_layer, n_gpu_layers, "" if n_gpu_layers is None else "--n-gpu-layers")))
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"build: llama.cpp with ea_local's hooks (API v{kvhooks.API_VERSION}), {bi.library}"]
                     + [f"  {k.ljust(width)}  {v}" for k, v in rows])


def compiled_vs_cpu(features: dict[str, str], cpu: frozenset[str]) -> str:
    """One line comparing the compiled-in instruction sets with the CPU's flags ('' when unknown)."""
    if not cpu:
        return ""
    mapped = {f: need for f, need in cpu_flags.FEATURE_CPUINFO.items() if any(n in cpu for n in need) or f in features}
    missing = [f for f in features if f in mapped and not any(n in cpu for n in mapped[f])]
    unused = [f for f, need in mapped.items() if f not in features and any(n in cpu for n in need)]
    parts = []
    if missing:
        parts.append(f"LACKS {' '.join(missing)} that this build uses: it will crash here (SIGILL); "
                     "run scripts/setup.sh to rebuild for this CPU")
    else:
        parts.append("has every instruction set compiled in")
    if unused:
        note = " (AMX: llama.cpp's AMX matmul crashes, never compiled)" if "AMX_INT8" in unused else ""
        parts.append(f"has but this build does not use: {' '.join(unused)}{note}")
    return "; ".join(parts)
