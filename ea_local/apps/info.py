"""`ea-local info`: human-readable text for a ModelInfo, the llama.cpp build and, when asked, placement."""
from __future__ import annotations

import os
from typing import Iterable, Iterator

from ea_local.model.info import ModelInfo
from ea_local.model.rope_model import RopeUnsupported, rope_specs

EXAMPLE_TOKENS = 4096


def compact_ranges(values: Iterable[int]) -> str:
    """[0, 1, 2, 3, 5, 7, 8] -> "0-3, 5, 7-8"."""
    vals = sorted(set(int(v) for v in values))
    if not vals:
        return "none"
    parts: list[str] = []
    start = prev = vals[0]
    for v in vals[1:] + [None]:  # type: ignore[list-item]
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(parts)


def human_bytes(n: float) -> str:
    """1536 -> "1.5 KiB"; exact bytes below 1 KiB."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024.0
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    raise AssertionError  # unreachable


def _count(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{suffix}"
    return str(n)


def _num(x: float) -> str:
    return f"{x:.10g}"


def format_info(info: ModelInfo) -> str:
    rows: list[tuple[str, str]] = []
    add = lambda k, v: rows.append((k, v))  # noqa: E731

    add("architecture", info.architecture)
    ft = info.file_type or "unknown"
    add("file type", f"{ft}  (GGUF v{info.gguf_version}, {info.n_tensors} tensors, "
                     f"{_count(info.n_params)} parameters, {human_bytes(info.file_size)})")
    add("layers", str(info.n_layers))
    add("embedding size", str(info.n_embd))

    def per_layer(values: tuple[int, ...]) -> str:
        distinct = sorted(set(values))
        if len(distinct) == 1:
            return str(distinct[0])
        return f"{min(values)}-{max(values)} per layer ({', '.join(map(str, values))})"

    add("attention heads", per_layer(info.n_head_per_layer))
    kv = per_layer(info.n_head_kv_per_layer)
    if len(set(info.n_head_per_layer)) == 1 and len(set(info.n_head_kv_per_layer)) == 1 and info.n_head_kv:
        g = info.n_head // info.n_head_kv
        kv += " (multi-head)" if g == 1 else f" (grouped-query, {g} query heads per KV head)"
    add("KV heads", kv)
    hd = f"K {info.head_dim_k}, V {info.head_dim_v}"
    if info.sliding_layers and (info.head_dim_k_swa, info.head_dim_v_swa) != (info.head_dim_k, info.head_dim_v):
        hd += f"; sliding layers K {info.head_dim_k_swa}, V {info.head_dim_v_swa}"
    add("head dim", hd)

    # RoPE
    pairs = "pairs (i, i+d/2)" if info.neox else "adjacent pairs (2i, 2i+1)"
    rope = f"{info.rope_type}, {pairs}, {info.rope_n_dims} of {info.head_dim_k} dims rotated"
    add("RoPE", rope)
    glob = f"base {_num(info.rope_freq_base)}, scale {_num(info.rope_freq_scale)}"
    if info.sliding_layers:
        add("RoPE, global layers", glob)
        swa = f"base {_num(info.rope_freq_base_swa or 0)}, scale {_num(info.rope_freq_scale_swa or 0)}"
        if info.rope_n_dims_swa != info.rope_n_dims:
            swa += f", {info.rope_n_dims_swa} dims"
        add("RoPE, sliding layers", swa)
    else:
        add("RoPE frequencies", glob)
    scaling = info.rope_scaling_type
    if scaling in ("linear", "none") and info.rope_freq_scale == 1.0 and not info.has_rope_freq_factors:
        scaling = "none"
    if info.rope_scaling_factor:
        scaling += f", factor {_num(info.rope_scaling_factor)}"
    if info.rope_scaling_orig_ctx:
        scaling += f", original context {info.rope_scaling_orig_ctx}"
    if info.has_rope_freq_factors:
        scaling += ", per-frequency factor tensors"
    try:  # the rotation the policies apply must be llama.cpp's, or the file is refused
        rope_specs(info, info.global_layers or range(info.n_layers), info.n_ctx_train)
    except RopeUnsupported as e:
        scaling += f"  (not supported: {e})"
    add("RoPE scaling", scaling)

    # attention span
    if info.sliding_layers:
        n_s = len(info.sliding_layers)
        add("sliding window", f"{info.sliding_window} tokens on {n_s} of {info.n_layers} layers: "
                              f"{compact_ranges(info.sliding_layers)}")
        add("global layers", f"{len(info.global_layers)}: {compact_ranges(info.global_layers)}")
    else:
        add("sliding window", "none (every layer attends to the whole context)")
    add("training context", f"{info.n_ctx_train} tokens")
    if info.n_vocab is not None:
        add("vocabulary", f"{info.n_vocab} tokens")
    scale = f"{info.kq_scale:.6g}"
    if info.attention_scale is not None:
        scale += f" (file says {info.attention_scale:g})"
    add("attention scale", scale)
    add("chat template", "yes" if info.has_chat_template else "no")

    # KV cache
    for t, b in info.kv_bytes_per_token.items():
        key = f"KV bytes/token {t}"
        if b is None:
            add(key, "n/a (rows are not whole blocks)")
        elif info.sliding_layers:
            add(key, f"{b.total}  (global layers {b.global_part} + sliding layers {b.sliding_part})")
        else:
            add(key, str(b.total))

    from ..engine.archive import bytes_per_token as archive_bytes
    from ..engine.session import scored_layers

    layers = scored_layers(info.global_layers)
    for t, b in info.kv_bytes_per_token.items():
        if b is not None and (ab := archive_bytes(info, t, layers)) is not None:
            add(f"archive bytes/token {t}", f"{ab}  (evicted cells kept on the host for recall: raw rows of the "
                                           f"{'global' if info.sliding_layers else 'evicted'} layers + digest keys)")

    n = EXAMPLE_TOKENS
    for t, b in info.kv_bytes_per_token.items():
        if b is None:
            continue
        key = f"KV for {n} tokens {t}"
        if info.sliding_layers:
            cells = info.swa_cache_cells(n)
            add(key, f"{human_bytes(info.kv_cache_bytes(n, t))} as llama.cpp allocates it "
                     f"(sliding layers keep {cells} cells); {human_bytes(b.total * n)} if every layer kept every token")
        else:
            add(key, human_bytes(b.total * n))

    width = max(len(k) for k, _ in rows)
    title = info.name or os.path.basename(info.path)
    lines = [f"{title}  ({info.path})"]
    lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join(lines)


def format_embedded() -> str:
    """The embedded models: short name (what --model takes), what they are, which commands default to
    them, and where the file is (or how to install it)."""
    from ea_local.model.embedded import BASE_MODEL, CHAT_MODEL, EMBEDDED, ModelNotFound

    uses = {BASE_MODEL: "default of demo and bench", CHAT_MODEL: "default of chat and summarize"}
    width = max(map(len, EMBEDDED))
    lines = ["embedded models (--model NAME):"]
    for m in EMBEDDED.values():
        try:
            where = str(m.locate())
        except (ModelNotFound, ImportError, OSError) as e:
            where = f"not installed: {e}"
        use = f"; {uses[m.name]}" if m.name in uses else ""
        lines.append(f"  {m.name.ljust(width)}  {m.description}{use}")
        lines.append(f"  {''.ljust(width)}  {where}")
    return "\n".join(lines)


def info_blocks(mi: ModelInfo, list_embedded: bool, endpoints: tuple[str, ...], n_gpu_layers: int | None,
                ctx: int, cache_type: str) -> Iterator[str]:
    """What `ea-local info` prints, block by block; bad options raise ValueError when their block is reached."""
    from ..build_info import format_build, read_build_info

    yield format_info(mi)
    if list_embedded:
        yield "\n" + format_embedded()
    if n_gpu_layers is not None and n_gpu_layers < -1:
        raise ValueError(f"--n-gpu-layers must be -1 (all) or more, got {n_gpu_layers}")
    yield format_build(read_build_info(), mi.n_layers, n_gpu_layers)  # ValueError: a bad EA_LOCAL_N_GPU_LAYERS
    if not endpoints and n_gpu_layers is None:
        return
    if cache_type not in ("f16", "q8_0", "q4_0"):
        raise ValueError(f"unknown cache type {cache_type!r}; choose from f16, q8_0, q4_0")
    if ctx <= 0:
        raise ValueError(f"--ctx must be positive, got {ctx}")
    from .placement import describe

    yield describe(mi, endpoints, n_gpu_layers, ctx, cache_type)
