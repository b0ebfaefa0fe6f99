"""Tiny random-weight GGUF files for tests, and broken files for the error paths.

`write_tiny_gguf(path)` writes a ~800 KB llama-architecture model that llama.cpp can load and
run: 2 layers, n_embd 128, 4 query heads, 2 KV heads (head dim 32), FFN 256, a 384-token
byte-fallback SentencePiece ("llama") vocabulary, context 4096, F16 weights (norms F32).
`arch="qwen2"` (NEOX RoPE, q/k/v biases) and `arch="gemma3"` (iSWA, 6 layers: layer 5 global)
write the same kind of model for those architectures. Everything is seeded: the same
arguments give the same bytes.

Broken files: `write_empty`, `write_not_gguf`, `write_truncated`, `write_random_after_magic`,
`write_wrong_version`, `write_unsupported_arch`, and `write_tiny_gguf(drop_keys=...)` for a
file that lacks a required key. `CHAT_TEMPLATES` holds chat templates for `chat_template=`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import gguf
from gguf import GGUFValueType

PathLike = str | os.PathLike

TINY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(n_layers=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=256, rope_freq_base=10000.0),
    "qwen2": dict(n_layers=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=256, rope_freq_base=1000000.0),
    "gemma3": dict(n_layers=6, n_embd=64, n_head=4, n_head_kv=1, n_ff=128, head_dim=32,
                   rope_freq_base=1000000.0, sliding_window=512),
}


# Chat templates written for the tests in the style of four model families (string content only):
# ChatML, Llama 3 (BOS + header ids, trimmed content), Gemma (system folded into the first user turn,
# alternation enforced with raise_exception) and Mistral [INST] (no system role: raise_exception).
CHAT_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
        " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "llama3": (
        "{{- bos_token }}\n{%- for message in messages %}\n"
        "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
        " + '<|eot_id|>' }}\n{%- endfor %}\n"
        "{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}\n"
        "{%- endif %}\n"),
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
        "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
        "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
        "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"),
}


def _vocab(n_vocab: int) -> tuple[list[str], list[int]]:
    """Byte-fallback SentencePiece vocabulary: <unk> <s> </s>, the 256 byte tokens, filler pieces."""
    if n_vocab < 259 + 1:
        raise ValueError("n_vocab must be at least 260 (3 specials + 256 byte tokens + 1 piece)")
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    toks += ["\u2581"] + [f"\u2581t{i}" for i in range(n_vocab - len(toks) - 1)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256
    types += [gguf.TokenType.NORMAL] * (n_vocab - len(types))
    return toks, [int(t) for t in types]


def _set_kv(w: gguf.GGUFWriter, key: str, value: Any) -> None:
    """Set (or replace) a metadata key. `value` may be (value, GGUFValueType) to force a type."""
    w.kv_data[0].pop(key, None)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], GGUFValueType):
        val, vtype = value
        if vtype == GGUFValueType.ARRAY:
            w.add_array(key, val)
        else:
            w.add_key_value(key, val, vtype)
    elif isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        (w.add_uint32 if value >= 0 else w.add_int32)(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        w.add_array(key, list(value))
    else:
        raise TypeError(f"cannot write {type(value).__name__} for {key}")


def write_tiny_gguf(
    path: PathLike,
    arch: str = "llama",
    *,
    n_layers: int | None = None,
    n_embd: int | None = None,
    n_head: int | None = None,
    n_head_kv: int | Sequence[int] | None = None,
    n_ff: int | None = None,
    head_dim: int | None = None,
    n_vocab: int = 384,
    context_length: int = 4096,
    rope_freq_base: float | None = None,
    rope_scaling: tuple[str, float] | None = None,
    sliding_window: int | None = None,
    chat_template: str | None = None,
    name: str | None = None,
    weights: str = "f16",
    seed: int = 0,
    extra_kv: Mapping[str, Any] | None = None,
    drop_keys: Iterable[str] = (),
    drop_tensors: Iterable[str] = (),
    extra_tensors: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Write a tiny random-weight model of `arch` ("llama", "qwen2" or "gemma3") to `path`.

    `n_head_kv` may be a per-layer list (written as an array, as some converters do).
    `head_dim` writes attention.key_length/value_length (default: n_embd / n_head, not written).
    `extra_kv` sets or replaces metadata keys after the standard ones; `drop_keys` removes keys
    (names may contain "{arch}", e.g. "{arch}.block_count"); `drop_tensors` leaves tensors out (a file
    llama.cpp refuses to load while its header reads fine); `extra_tensors` adds tensors by name (e.g.
    "rope_freqs.weight", Llama-3's per-pair RoPE frequency factors). Returns the path.
    """
    if arch not in TINY_DEFAULTS:
        raise ValueError(f"arch must be one of {sorted(TINY_DEFAULTS)}")
    d = dict(TINY_DEFAULTS[arch])
    for k, v in dict(n_layers=n_layers, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, n_ff=n_ff,
                     head_dim=head_dim, rope_freq_base=rope_freq_base, sliding_window=sliding_window).items():
        if v is not None:
            d[k] = v
    L, E, H, F = d["n_layers"], d["n_embd"], d["n_head"], d["n_ff"]
    kvh = d["n_head_kv"]
    kv_per_layer = list(kvh) if isinstance(kvh, (list, tuple)) else [kvh] * L
    hd = d.get("head_dim") or E // H
    if weights not in ("f16", "f32"):
        raise ValueError("weights must be 'f16' or 'f32'")
    wdtype = np.float16 if weights == "f16" else np.float32
    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int) -> np.ndarray:  # ggml shape {cols, rows}
        return (rng.standard_normal((rows, cols)) * 0.02).astype(wdtype)

    def vec(n: int, value: float | None = None) -> np.ndarray:
        if value is not None:
            return np.full(n, value, dtype=np.float32)
        return (rng.standard_normal(n) * 0.02).astype(np.float32)

    path = Path(path)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name or f"tiny-random-{arch}")
    w.add_context_length(context_length)
    w.add_embedding_length(E)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(kvh if isinstance(kvh, int) else list(kvh))
    if d.get("head_dim"):
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(float(d["rope_freq_base"]))
    if rope_scaling is not None:
        kind, factor = rope_scaling
        w.add_rope_scaling_type(gguf.RopeScalingType(kind))
        w.add_rope_scaling_factor(float(factor))
    w.add_layer_norm_rms_eps(1e-6 if arch == "gemma3" else 1e-5)
    if arch == "gemma3" and d.get("sliding_window"):
        w.add_sliding_window(int(d["sliding_window"]))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if weights == "f16" else gguf.LlamaFileType.ALL_F32)

    toks, types = _vocab(n_vocab)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(toks)
    w.add_token_scores([-float(i) for i in range(n_vocab)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    for key, value in (extra_kv or {}).items():
        _set_kv(w, key.format(arch=arch), value)
    for key in drop_keys:
        w.kv_data[0].pop(key.format(arch=arch), None)

    w.add_tensor("token_embd.weight", mat(n_vocab, E))
    for i in range(L):
        p = f"blk.{i}."
        kvd = kv_per_layer[i] * hd
        w.add_tensor(p + "attn_norm.weight", vec(E, 1.0))
        w.add_tensor(p + "attn_q.weight", mat(H * hd, E))
        w.add_tensor(p + "attn_k.weight", mat(kvd, E))
        w.add_tensor(p + "attn_v.weight", mat(kvd, E))
        if arch == "qwen2":
            w.add_tensor(p + "attn_q.bias", vec(H * hd))
            w.add_tensor(p + "attn_k.bias", vec(kvd))
            w.add_tensor(p + "attn_v.bias", vec(kvd))
        w.add_tensor(p + "attn_output.weight", mat(E, H * hd))
        if arch == "gemma3":
            w.add_tensor(p + "attn_q_norm.weight", vec(hd, 1.0))
            w.add_tensor(p + "attn_k_norm.weight", vec(hd, 1.0))
            w.add_tensor(p + "post_attention_norm.weight", vec(E, 1.0))
            w.add_tensor(p + "post_ffw_norm.weight", vec(E, 1.0))
        w.add_tensor(p + "ffn_norm.weight", vec(E, 1.0))
        w.add_tensor(p + "ffn_gate.weight", mat(F, E))
        w.add_tensor(p + "ffn_up.weight", mat(F, E))
        w.add_tensor(p + "ffn_down.weight", mat(E, F))
    w.add_tensor("output_norm.weight", vec(E, 1.0))
    if arch != "gemma3":  # gemma3 ties the output projection to token_embd
        w.add_tensor("output.weight", mat(n_vocab, E))
    for name, data in (extra_tensors or {}).items():
        w.add_tensor(name, data)
    for name in drop_tensors:
        del w.tensors[0][name]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    return path


# ---------------------------------------------------------------------------- broken files

def write_empty(path: PathLike) -> Path:
    path = Path(path)
    path.write_bytes(b"")
    return path


def write_not_gguf(path: PathLike) -> Path:
    """A text file (bad magic)."""
    path = Path(path)
    path.write_text("this is not a model\n" * 8)
    return path


def write_truncated(src: PathLike, dst: PathLike, offset: int) -> Path:
    """The first `offset` bytes of `src` (a negative offset counts from the end)."""
    data = Path(src).read_bytes()
    dst = Path(dst)
    dst.write_bytes(data[:offset])
    return dst


def write_random_after_magic(path: PathLike, n_bytes: int = 4096, seed: int = 0, version: int | None = 3) -> Path:
    """b"GGUF", then (unless `version` is None) a valid version, then `n_bytes` random bytes."""
    rng = np.random.default_rng(seed)
    head = b"GGUF" + (b"" if version is None else int(version).to_bytes(4, "little"))
    path = Path(path)
    path.write_bytes(head + rng.integers(0, 256, size=n_bytes, dtype=np.uint8).tobytes())
    return path


def write_wrong_version(path: PathLike, version: int = 99, **tiny_kwargs: Any) -> Path:
    """A tiny model whose header says GGUF version `version`."""
    path = write_tiny_gguf(path, **tiny_kwargs)
    data = bytearray(path.read_bytes())
    data[4:8] = int(version).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    return path


def write_unsupported_arch(path: PathLike, arch: str = "bert") -> Path:
    """A small well-formed GGUF of an architecture ea_local does not support (metadata + 1 tensor)."""
    path = Path(path)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(512)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_layer_norm_eps(1e-12)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tensor("token_embd.weight", np.zeros((16, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    return path
