"""What a GGUF model file says about itself: shape, RoPE, sliding-window layers, KV-cache cost.

`read_model_info(path)` reads only the GGUF header (metadata key/values and tensor
descriptors) through a read-only memory map; tensor data is never touched, so it takes
well under a second and a few MB even for multi-GB files.

The header is read by gguf_header.py; KV row sizes come from kv.py. The hyperparameters are
derived the way llama.cpp does it (src/llama-model.cpp `load_hparams`, the per-architecture
`load_arch_hparams` in src/models/*.cpp and `llama_model_rope_type`), so the RoPE of each
layer and the sliding-window layers are the ones llama.cpp will use when it runs the file.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import gguf
from gguf import GGMLQuantizationType

from .gguf_header import GGUFArray, GGUFHeader, ModelFileError, TensorInfo, read_header
from .kv import CACHE_TYPES, SUMMARY_CACHE_TYPES, KVBytes, row_bytes

if TYPE_CHECKING:
    from .rope import RopeSpec

__all__ = [
    "CACHE_TYPES",
    "KVBytes",
    "ModelFileError",
    "ModelInfo",
    "SUPPORTED_ARCHITECTURES",
    "read_model_info",
    "row_bytes",
]


# --------------------------------------------------------------------------------------
# architectures

@dataclass(frozen=True)
class _Arch:
    neox: bool  # llama_model_rope_type(): LLAMA_ROPE_TYPE_NEOX (True) or LLAMA_ROPE_TYPE_NORM
    swa: str = "none"  # how load_arch_hparams() sets up sliding-window attention (see _sliding)
    reads_attention_scale: bool = False  # load_arch_hparams() reads {arch}.attention.scale
    n_rot_must_equal_head_dim: bool = False  # load_hparams() rejects n_rot != n_embd_head_k


# Architectures whose attention is plain causal self-attention over a KV cache with
# standard (NORM or NEOX) RoPE on every layer, as llama.cpp runs them.
_ARCHS: dict[str, _Arch] = {
    # NORM: rotate adjacent pairs (2i, 2i+1)
    "llama": _Arch(neox=False, n_rot_must_equal_head_dim=True),  # also Mistral/Mixtral files
    "mistral3": _Arch(neox=False),
    "granite": _Arch(neox=False, reads_attention_scale=True),
    "internlm2": _Arch(neox=False),
    # NEOX: rotate pairs (i, i + n_dims/2)
    "qwen2": _Arch(neox=True),
    "qwen2moe": _Arch(neox=True),
    "qwen3": _Arch(neox=True),
    "qwen3moe": _Arch(neox=True),
    "starcoder2": _Arch(neox=True),
    "phi3": _Arch(neox=True, swa="phi3"),
    "gemma": _Arch(neox=True),
    "gemma2": _Arch(neox=True, swa="gemma2"),
    "gemma3": _Arch(neox=True, swa="gemma3"),
}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(sorted(_ARCHS))

# llama_model_rope_type() == LLAMA_ROPE_TYPE_NONE (llama.cpp arch names)
_NO_ROPE_ARCHS = frozenset({
    "clip", "gpt2", "gptj", "mpt", "refact", "bloom", "mamba", "mamba2", "jamba", "jina-bert-v2",
    "t5", "t5encoder", "jais", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7", "wavtokenizer-dec",
    "nemotron_h", "nemotron_h_moe", "kimi-linear",
})

_ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")  # llama_rope_scaling_type_from_string
_MAX_LAYERS = 512  # LLAMA_MAX_LAYERS

# --------------------------------------------------------------------------------------
# the model description

@dataclass(frozen=True)
class ModelInfo:
    path: str
    architecture: str
    name: str | None
    n_layers: int
    n_embd: int
    n_head: int  # query heads of layer 0 (hparams.n_head())
    n_head_kv: int  # KV heads of layer 0 (hparams.n_head_kv())
    n_head_per_layer: tuple[int, ...]
    n_head_kv_per_layer: tuple[int, ...]
    head_dim_k: int  # key/query head size of the global layers
    head_dim_v: int
    head_dim_k_swa: int  # of the sliding-window layers (== head_dim_k unless the file says)
    head_dim_v_swa: int
    rope_type: str  # "neox" or "norm"
    rope_n_dims: int  # rotated dimensions per head (rope.dimension_count, default head_dim_k)
    rope_n_dims_swa: int
    rope_freq_base: float  # global layers (rope.freq_base, default 10000)
    rope_freq_scale: float  # global layers, as llama.cpp applies it (1/factor; 1 for scaling "none")
    rope_freq_base_swa: float | None  # sliding layers; None when there are none
    rope_freq_scale_swa: float | None
    rope_scaling_type: str  # none | linear | yarn | longrope (file's, default "linear" as llama.cpp)
    rope_scaling_factor: float | None  # as written in the file
    rope_scaling_orig_ctx: int | None
    has_rope_freq_factors: bool  # rope_freqs / rope_factors_{long,short} tensors present
    sliding_window: int | None  # tokens; None when no layer slides
    sliding_layers: tuple[int, ...]
    n_ctx_train: int
    file_type: str | None  # "Q4_K_M", "F16", ... ("... (guessed)" when the file does not say)
    file_type_id: int | None
    attention_scale: float | None  # {arch}.attention.scale as written, if present
    kq_scale: float  # softmax scale llama.cpp uses for q.k
    n_vocab: int | None
    n_params: int  # elements over all tensors
    n_tensors: int
    file_size: int
    gguf_version: int
    chat_template: str | None
    kv_bytes_per_token: Mapping[str, KVBytes | None] = field(default_factory=dict, hash=False)  # f16, q8_0, q4_0

    # ---- layers
    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    @property
    def neox(self) -> bool:
        return self.rope_type == "neox"

    @property
    def global_layers(self) -> tuple[int, ...]:
        s = set(self.sliding_layers)
        return tuple(il for il in range(self.n_layers) if il not in s)

    @property
    def is_iswa(self) -> bool:
        """Both sliding and global layers (llama.cpp builds a two-part "iSWA" cache)."""
        return bool(self.sliding_layers) and len(self.sliding_layers) < self.n_layers

    def _check_layer(self, layer: int) -> int:
        il = int(layer)
        if not 0 <= il < self.n_layers:
            raise IndexError(f"layer {layer} out of range 0..{self.n_layers - 1}")
        return il

    def is_sliding(self, layer: int) -> bool:
        return self._check_layer(layer) in self.sliding_layers

    def head_dims(self, layer: int) -> tuple[int, int]:
        """(d_k, d_v) of `layer`."""
        if self.is_sliding(layer):
            return self.head_dim_k_swa, self.head_dim_v_swa
        return self.head_dim_k, self.head_dim_v

    # ---- RoPE
    def rope_params(self, layer: int) -> tuple[float, float, bool, int]:
        """(freq_base, freq_scale, neox, n_dims) llama.cpp uses for `layer`'s q and k."""
        if self.is_sliding(layer):
            assert self.rope_freq_base_swa is not None and self.rope_freq_scale_swa is not None
            return self.rope_freq_base_swa, self.rope_freq_scale_swa, self.neox, self.rope_n_dims_swa
        return self.rope_freq_base, self.rope_freq_scale, self.neox, self.rope_n_dims

    def rope_spec(self, layer: int) -> "RopeSpec":
        """`layer`'s base RoPE (no scaling corrections or frequency factors: ea_local.model.rope_model has those)."""
        from .rope import RopeSpec

        base, scale, neox, n_dims = self.rope_params(layer)
        return RopeSpec(n_dims=n_dims, freq_base=base, freq_scale=scale, neox=neox)

    def rope_specs(self) -> dict[int, "RopeSpec"]:
        return {il: self.rope_spec(il) for il in range(self.n_layers)}

    # ---- KV cache
    def kv_bytes_per_token_for(self, type_k: str = "f16", type_v: str | None = None) -> KVBytes:
        """KV bytes for one token with K stored as `type_k` and V as `type_v` (default: same)."""
        type_v = type_k if type_v is None else type_v
        glob = slid = 0
        for il in range(self.n_layers):
            dk, dv = self.head_dims(il)
            nkv = self.n_head_kv_per_layer[il]
            b = row_bytes(type_k, nkv * dk) + row_bytes(type_v, nkv * dv)
            if il in self.sliding_layers:
                slid += b
            else:
                glob += b
        return KVBytes(total=glob + slid, global_part=glob, sliding_part=slid)

    def swa_cache_cells(self, n_ctx: int, n_ubatch: int = 512, swa_full: bool = False) -> int:
        """Cells llama.cpp allocates for the sliding layers of an `n_ctx`-cell context (one sequence).

        llama_kv_cache_iswa: GGML_PAD(min(n_ctx, n_swa + n_ubatch), 256), or n_ctx with swa_full.
        """
        if not self.sliding_layers or self.sliding_window is None:
            return 0
        if swa_full:
            return n_ctx
        return -(-min(n_ctx, self.sliding_window + n_ubatch) // 256) * 256

    def kv_cache_bytes(self, n_ctx: int, type_k: str = "f16", type_v: str | None = None,
                       n_ubatch: int = 512, swa_full: bool = False) -> int:
        """Bytes of the KV cache llama.cpp allocates for `n_ctx` cells (one sequence): global
        layers hold every cell, sliding layers only `swa_cache_cells`."""
        b = self.kv_bytes_per_token_for(type_k, type_v)
        return b.global_part * n_ctx + b.sliding_part * self.swa_cache_cells(n_ctx, n_ubatch, swa_full)


# --------------------------------------------------------------------------------------
# metadata -> ModelInfo

class _KV:
    """Typed access to the header's key/values, with user-facing errors."""

    def __init__(self, kv: Mapping[str, Any], path: str):
        self.kv, self.path = kv, path

    def _bad(self, key: str, expected: str) -> ModelFileError:
        v = self.kv[key]
        got = f"an array of {v.length} {v.elem_type.name}" if isinstance(v, GGUFArray) else repr(v)[:60]
        return ModelFileError(f"bad metadata in {self.path}: {key} should be {expected}, got {got}")

    def missing(self, key: str) -> ModelFileError:
        return ModelFileError(f"missing required key '{key}' in {self.path}")

    def has(self, key: str) -> bool:
        return key in self.kv

    def get_int(self, key: str, default: Any = ..., minimum: int = 0) -> Any:
        if key not in self.kv:
            if default is ...:
                raise self.missing(key)
            return default
        v = self.kv[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise self._bad(key, f"an integer >= {minimum}")
        return v

    def get_float(self, key: str, default: Any = ...) -> Any:
        if key not in self.kv:
            if default is ...:
                raise self.missing(key)
            return default
        v = self.kv[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self._bad(key, "a finite number")
        return float(v)

    def get_str(self, key: str, default: Any = ...) -> Any:
        if key not in self.kv:
            if default is ...:
                raise self.missing(key)
            return default
        v = self.kv[key]
        if not isinstance(v, str):
            raise self._bad(key, "a string")
        return v

    def int_or_array(self, key: str, n: int, default: Any = ...) -> Any:
        """llama_model_loader::get_key_or_arr: a scalar for every layer, or one value per layer."""
        if key not in self.kv:
            if default is ...:
                raise self.missing(key)
            return default
        v = self.kv[key]
        if isinstance(v, GGUFArray):
            if v.length != n:
                raise ModelFileError(
                    f"bad metadata in {self.path}: {key} has {v.length} entries, expected one per layer ({n})")
            if v.values is None or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                           for x in v.values):
                raise self._bad(key, "non-negative integers")
            return tuple(int(x) for x in v.values)
        return (self.get_int(key),) * n


def _file_type(kv: _KV, tensors: list[TensorInfo]) -> tuple[str | None, int | None]:
    if kv.has("general.file_type"):
        ft = kv.get_int("general.file_type")
        try:
            name = gguf.LlamaFileType(ft).name
        except ValueError:
            return f"unknown ({ft})", ft
        return name.removeprefix("MOSTLY_").removeprefix("ALL_"), ft
    # llama.cpp guesses from the most common tensor type
    counts: dict[int, int] = {}
    for t in tensors:
        counts[t.ggml_type] = counts.get(t.ggml_type, 0) + 1
    if not counts:
        return None, None
    qt = GGMLQuantizationType(max(counts, key=lambda k: counts[k]))
    return f"{qt.name} (guessed)", None


def _sliding(arch: _Arch, kv: _KV, a: str, n_layers: int, base: float, scale_train: float
             ) -> tuple[tuple[int, ...], int | None, float | None, float | None]:
    """(sliding layers, window, swa freq_base, swa freq_scale) as load_arch_hparams() sets them."""
    window_key = f"{a}.attention.sliding_window"
    pattern_key = f"{a}.attention.sliding_window_pattern"

    def pattern(default_n: int) -> tuple[int, ...]:
        # llama_model_base::load_swa_pattern(): a per-layer bool array wins; else an integer
        # period n (key or default) with llama_hparams::set_swa_pattern():
        # layer il slides iff n == 0 or il % n < n - 1  (the last layer of every n is global)
        if kv.has(pattern_key) and isinstance(kv.kv[pattern_key], GGUFArray):
            arr = kv.kv[pattern_key]
            if arr.values is None or arr.length > _MAX_LAYERS:
                raise kv._bad(pattern_key, f"at most {_MAX_LAYERS} flags")
            return tuple(il for il, f in enumerate(arr.values[:n_layers]) if f)
        p = kv.get_int(pattern_key, default_n)
        return tuple(il for il in range(n_layers) if p == 0 or il % p < p - 1)

    if arch.swa == "gemma2":
        # always iSWA; window default 4096; period 2; swa rope = global rope unless freq_base_swa
        layers = pattern(2)
        window = kv.get_int(window_key, 4096)
        swa_base = kv.get_float(f"{a}.rope.freq_base_swa", base)
        swa_scale = scale_train
    elif arch.swa == "gemma3":
        # iSWA only when sliding_window > 0; period 6; hparams defaults: base 10000, scale 1
        window = kv.get_int(window_key, 0)
        if window <= 0:
            return (), None, None, None
        layers = pattern(6)
        swa_base = kv.get_float(f"{a}.rope.freq_base_swa", 10000.0)
        swa_scale = 1.0
    else:
        # phi3: llama.cpp disables SWA (swa_type NONE) even when the file has a window;
        # the others never set one up
        return (), None, None, None
    if not layers:
        return (), None, None, None
    return layers, window, swa_base, swa_scale


def _kq_scale(arch_name: str, arch: _Arch, attention_scale: float | None, n_layers: int,
              n_embd: int, n_head: int, head_dim_k: int) -> float:
    if arch.reads_attention_scale and attention_scale:
        return attention_scale
    # gemma2/gemma3 27B: 1/sqrt(n_embd/n_head) (query_pre_attn_scalar); otherwise 1/sqrt(d_k)
    if (arch_name == "gemma2" and n_layers == 46) or (arch_name == "gemma3" and n_layers == 62):
        return 1.0 / math.sqrt(n_embd // n_head)
    return 1.0 / math.sqrt(head_dim_k)


def _check_attention_tensors(hdr: GGUFHeader, n_layers: int, p: str) -> None:
    """The embeddings and every layer's Q, K, V projections (split or fused) must be in the tensor table:
    without them llama.cpp refuses the file with a message we would not see (its log is silenced)."""
    names = {t.name for t in hdr.tensors}
    need = ["token_embd.weight"]
    for i in range(n_layers):
        if f"blk.{i}.attn_qkv.weight" not in names:
            need += [f"blk.{i}.attn_{x}.weight" for x in ("q", "k", "v")]
    missing = [n for n in need if n not in names]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelFileError(f"incomplete model file: {p} has no tensor '{missing[0]}'{more} "
                             "(an interrupted download or a broken conversion?)")


def read_model_info(path: str | os.PathLike[str]) -> ModelInfo:
    """Describe the GGUF model at `path`; raises ModelFileError (one-line message) if it can't."""
    p = os.fspath(path)
    hdr = read_header(p)
    kv = _KV(hdr.kv, p)

    a = kv.get_str("general.architecture")
    arch = _ARCHS.get(a)
    if arch is None:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        if a in _NO_ROPE_ARCHS:
            raise ModelFileError(f"unsupported architecture '{a}' in {p}: it does not use RoPE; "
                                 f"ea_local supports {supported}")
        raise ModelFileError(f"unsupported architecture '{a}' in {p}: ea_local supports {supported}")

    n_layers = kv.get_int(f"{a}.block_count", minimum=1)
    if n_layers > _MAX_LAYERS:
        raise ModelFileError(f"bad metadata in {p}: {a}.block_count is {n_layers} (max {_MAX_LAYERS})")
    n_embd = kv.get_int(f"{a}.embedding_length", minimum=1)
    n_ctx_train = kv.get_int(f"{a}.context_length", minimum=1)
    n_head_l = kv.int_or_array(f"{a}.attention.head_count", n_layers)
    n_head_kv_l = kv.int_or_array(f"{a}.attention.head_count_kv", n_layers, n_head_l)
    n_head = n_head_l[0]
    if n_head <= 0:
        raise ModelFileError(f"bad metadata in {p}: layer 0 has {n_head} attention heads")
    if any(h > 0 and k == 0 for h, k in zip(n_head_l, n_head_kv_l)) or any(k > h for h, k in zip(n_head_l, n_head_kv_l)):
        raise ModelFileError(f"bad metadata in {p}: KV head counts {list(n_head_kv_l)} do not fit "
                             f"query head counts {list(n_head_l)}")
    head_dim_k = kv.get_int(f"{a}.attention.key_length", n_embd // n_head, minimum=1)
    head_dim_v = kv.get_int(f"{a}.attention.value_length", n_embd // n_head, minimum=1)
    if head_dim_k == 0 or head_dim_v == 0:
        raise ModelFileError(f"bad metadata in {p}: head size is 0 ({n_embd} / {n_head})")
    head_dim_k_swa = kv.get_int(f"{a}.attention.key_length_swa", head_dim_k, minimum=1)
    head_dim_v_swa = kv.get_int(f"{a}.attention.value_length_swa", head_dim_v, minimum=1)

    # RoPE (load_hparams)
    n_rot = kv.get_int(f"{a}.rope.dimension_count", head_dim_k, minimum=0)
    n_rot_swa = kv.get_int(f"{a}.rope.dimension_count_swa", n_rot, minimum=0)
    if arch.n_rot_must_equal_head_dim and n_rot != head_dim_k:
        raise ModelFileError(f"bad metadata in {p}: rope dimension count {n_rot} != head size {head_dim_k} "
                             f"(llama.cpp rejects this for '{a}')")
    for nr, dk in ((n_rot, head_dim_k), (n_rot_swa, head_dim_k_swa)):
        if nr % 2 or nr > dk or nr == 0:
            raise ModelFileError(f"bad metadata in {p}: rope dimension count {nr} for head size {dk}")
    base = kv.get_float(f"{a}.rope.freq_base", 10000.0)
    if base <= 0:
        raise ModelFileError(f"bad metadata in {p}: {a}.rope.freq_base is {base}")
    scaling = kv.get_str(f"{a}.rope.scaling.type", "linear")
    if scaling not in _ROPE_SCALING_TYPES:
        raise ModelFileError(f"bad metadata in {p}: unknown rope scaling type {scaling!r} "
                             f"(llama.cpp knows {', '.join(_ROPE_SCALING_TYPES)})")
    factor_key = f"{a}.rope.scaling.factor"
    factor = kv.get_float(factor_key, None) if kv.has(factor_key) else kv.get_float(f"{a}.rope.scale_linear", None)
    if factor is not None and factor < 0:
        raise ModelFileError(f"bad metadata in {p}: rope scaling factor {factor}")
    scale_train = 1.0 if not factor else 1.0 / factor
    scale = 1.0 if scaling == "none" else scale_train  # llama_context: "never scale if scaling type is none"
    orig_ctx = kv.get_int(f"{a}.rope.scaling.original_context_length", None)
    factor_tensors = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}
    has_factors = any(t.name in factor_tensors for t in hdr.tensors)

    sliding, window, swa_base, swa_scale = _sliding(arch, kv, a, n_layers, base, scale_train)
    if swa_base is not None and swa_base <= 0:
        raise ModelFileError(f"bad metadata in {p}: {a}.rope.freq_base_swa is {swa_base}")

    attention_scale = kv.get_float(f"{a}.attention.scale", None)
    kq = _kq_scale(a, arch, attention_scale, n_layers, n_embd, n_head, head_dim_k)

    template = kv.get_str("tokenizer.chat_template", None)
    tokens = hdr.kv.get("tokenizer.ggml.tokens")
    n_vocab = tokens.length if isinstance(tokens, GGUFArray) else kv.get_int(f"{a}.vocab_size", None)
    name = kv.get_str("general.name", None)
    ftype, ftype_id = _file_type(kv, hdr.tensors)

    _check_attention_tensors(hdr, n_layers, p)
    info = ModelInfo(
        path=p, architecture=a, name=name, n_layers=n_layers, n_embd=n_embd,
        n_head=n_head, n_head_kv=n_head_kv_l[0],
        n_head_per_layer=tuple(n_head_l), n_head_kv_per_layer=tuple(n_head_kv_l),
        head_dim_k=head_dim_k, head_dim_v=head_dim_v,
        head_dim_k_swa=head_dim_k_swa, head_dim_v_swa=head_dim_v_swa,
        rope_type="neox" if arch.neox else "norm", rope_n_dims=n_rot, rope_n_dims_swa=n_rot_swa,
        rope_freq_base=base, rope_freq_scale=scale,
        rope_freq_base_swa=swa_base, rope_freq_scale_swa=swa_scale,
        rope_scaling_type=scaling, rope_scaling_factor=factor, rope_scaling_orig_ctx=orig_ctx,
        has_rope_freq_factors=has_factors,
        sliding_window=window, sliding_layers=sliding, n_ctx_train=n_ctx_train,
        file_type=ftype, file_type_id=ftype_id, attention_scale=attention_scale, kq_scale=kq,
        n_vocab=n_vocab, n_params=sum(t.n_elements for t in hdr.tensors), n_tensors=len(hdr.tensors),
        file_size=hdr.file_size, gguf_version=hdr.version, chat_template=template or None,
    )
    per_type: dict[str, KVBytes | None] = {}
    for t in SUMMARY_CACHE_TYPES:
        try:
            per_type[t] = info.kv_bytes_per_token_for(t)
        except ValueError:  # rows not a whole number of blocks: llama.cpp can't use this type
            per_type[t] = None
    return dataclasses.replace(info, kv_bytes_per_token=per_type)
