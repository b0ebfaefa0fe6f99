"""Where llama.cpp put a loaded model: which device holds each layer's weights and KV cache, and how
many bytes of weights and KV each buffer holds (what `ea-local info --rpc` prints).

Read from llama.cpp's own log lines of that load (captured by engine/runtime.py), not recomputed:
the split depends on the devices' free memory at load time, so only llama.cpp knows it. The lines
come from src/llama-model.cpp (load_tensors) and src/llama-kv-cache{,-iswa}.cpp of the vendored tree.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

_LAYER = re.compile(r"load_tensors: layer\s+(\d+) assigned to device (\S+?), is_swa = (\d)")
_KV_LAYER = re.compile(r"llama_kv_cache: layer\s+(\d+): dev = (\S+)")
_WEIGHTS = re.compile(r"load_tensors:\s+(\S+) model buffer size =\s+([\d.]+) MiB")
_KV_BUF = re.compile(r"llama_kv_cache:\s+(\S+) KV buffer size =\s+([\d.]+) MiB")
_ISWA = re.compile(r"llama_kv_cache_iswa: creating\s+(non-SWA|SWA) KV cache")


@dataclass
class Placement:
    layer_device: dict[int, str] = field(default_factory=dict)  # weights; layer n_layer is the output layer
    kv_device: dict[str, dict[int, str]] = field(default_factory=dict)  # cache ("kv", "global", "sliding") -> layer -> device
    weights_mib: dict[str, float] = field(default_factory=dict)  # buffer name -> MiB
    kv_mib: dict[str, dict[str, float]] = field(default_factory=dict)  # cache -> buffer name -> MiB

    @property
    def complete(self) -> bool:
        return bool(self.layer_device) and bool(self.kv_device)


def parse(lines: list[str]) -> Placement:
    p = Placement()
    cache = "kv"
    for ln in lines:
        if m := _ISWA.search(ln):
            cache = "global" if m.group(1) == "non-SWA" else "sliding"
        elif m := _LAYER.search(ln):
            p.layer_device[int(m.group(1))] = m.group(2)
        elif m := _KV_LAYER.search(ln):
            p.kv_device.setdefault(cache, {})[int(m.group(1))] = m.group(2)
        elif m := _WEIGHTS.search(ln):
            p.weights_mib[m.group(1)] = p.weights_mib.get(m.group(1), 0.0) + float(m.group(2))
        elif m := _KV_BUF.search(ln):
            d = p.kv_mib.setdefault(cache, {})
            d[m.group(1)] = d.get(m.group(1), 0.0) + float(m.group(2))
    return p


def _ranges(values: list[int]) -> str:
    from .info import compact_ranges

    return compact_ranges(values)


def format_placement(p: Placement, n_layer: int, devices: dict[str, str] | None = None) -> str:
    """A plain-text table; `devices` maps device names (RPC0) to a description (its endpoint)."""
    if not p.complete:
        return ("placement: llama.cpp did not report it (its log lines for this load were not seen; "
                "was the log callback replaced?)")
    devices = devices or {}
    out = ["placement (reported by llama.cpp at load):"]
    by_dev: dict[str, list[int]] = {}
    for il, d in sorted(p.layer_device.items()):
        by_dev.setdefault(d, []).append(il)
    for d, layers in by_dev.items():
        name = f"{d} ({devices[d]})" if d in devices else d
        rep = [il for il in layers if il < n_layer]
        extra = " + output" if n_layer in layers else ""
        out.append(f"  {'weights':<10} {name:<32} layers {_ranges(rep) if rep else 'none'}{extra}")
    for cache, layers in p.kv_device.items():
        label = {"kv": "KV", "global": "KV global", "sliding": "KV sliding"}[cache]
        by_dev = {}
        for il, d in sorted(layers.items()):
            by_dev.setdefault(d, []).append(il)
        for d, ls in by_dev.items():
            name = f"{d} ({devices[d]})" if d in devices else d
            out.append(f"  {label:<10} {name:<32} layers {_ranges(ls)}")
    out.append("  buffers:")
    for b, mib in p.weights_mib.items():
        out.append(f"    {b:<36} weights {mib:9.2f} MiB")
    for cache, bufs in p.kv_mib.items():
        label = {"kv": "KV", "global": "KV global", "sliding": "KV sliding"}[cache]
        for b, mib in bufs.items():
            out.append(f"    {b:<36} {label:<10} {mib:7.2f} MiB")
    return "\n".join(out)


def describe(info, rpc: tuple[str, ...], n_gpu_layers: int | None, n_ctx: int, cache_type: str) -> str:
    """Load the model and a context of n_ctx cells as the engine would (sliding layers windowed on iSWA
    models), and report llama.cpp's placement. `info` is a ModelInfo (model/info.py)."""
    from ..engine.runtime import ContextConfig, Runtime

    extra = {} if n_gpu_layers is None else {"n_gpu_layers": n_gpu_layers}
    rt = Runtime(info.path, ContextConfig(n_ctx=n_ctx, n_batch=min(512, n_ctx), cache_type=cache_type,
                                          swa_full=not info.sliding_layers, rpc=rpc, **extra))
    try:
        devices: dict[str, str] = {}
        if rpc:
            from ..ggml_registry import fn

            for d in rt.loaded.rpc_devices:
                devices[fn("ggml_backend_dev_name")(d).decode()] = fn("ggml_backend_dev_description")(d).decode()
        head = f"context: {rt.n_ctx} cells, KV {cache_type}" + (f", RPC: {', '.join(rpc)}" if rpc else "")
        return head + "\n" + format_placement(parse(rt.load_log), rt.n_layer, devices)
    finally:
        rt.close()

