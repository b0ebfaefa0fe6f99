#!/usr/bin/env python3
"""Write a random-weight llama GGUF (Q4_0) with a real model's shape, for speed measurements.

Random weights make the text noise; memory traffic, KV size and kernels are the real shape's.
    python scripts/bench/random_gguf.py OUT.gguf --shape llama3-8b   # ~4.4 GB, seconds on a fast disk
"""
from __future__ import annotations

import argparse

import gguf
import numpy as np

SHAPES = {  # layers, embd, ffn, heads, kv heads, vocab, train ctx
    "llama3-8b": (32, 4096, 14336, 32, 8, 128256, 131072),
    "llama-1b": (16, 2048, 8192, 32, 8, 128256, 131072),
    "tiny": (2, 256, 512, 4, 2, 512, 4096),
}


def q4_0(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Random Q4_0 blocks: an f16 scale (small, so activations stay finite) + 16 bytes of nibbles per 32 weights."""
    nb = cols // 32
    blk = np.empty((rows, nb, 18), dtype=np.uint8)
    blk[:, :, :2] = np.full((rows, nb), 0.02, dtype=np.float16).view(np.uint8).reshape(rows, nb, 2)
    blk[:, :, 2:] = rng.integers(0, 256, size=(rows, nb, 16), dtype=np.uint8)
    return blk.reshape(rows, nb * 18)


def write(out: str, shape: str, seed: int = 0) -> None:
    L, E, F, H, KV, V, CTX = SHAPES[shape]
    hd = E // H
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(out, "llama")
    w.add_name(f"random-{shape}")
    for fn, v in [(w.add_context_length, CTX), (w.add_embedding_length, E), (w.add_block_count, L),
                  (w.add_feed_forward_length, F), (w.add_head_count, H), (w.add_head_count_kv, KV),
                  (w.add_rope_dimension_count, hd)]:
        fn(v)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    toks += [f"\u2581t{i}" for i in range(V - len(toks))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores([0.0] * V)
    w.add_token_types(types + [gguf.TokenType.NORMAL] * (V - len(types)))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    Q = gguf.GGMLQuantizationType.Q4_0
    ones = np.ones(E, dtype=np.float32)
    w.add_tensor("token_embd.weight", q4_0(rng, V, E), raw_dtype=Q)
    for i in range(L):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones)
        for name, rows, cols in [("attn_q", E, E), ("attn_k", KV * hd, E), ("attn_v", KV * hd, E),
                                 ("attn_output", E, E), ("ffn_gate", F, E), ("ffn_up", F, E), ("ffn_down", E, F)]:
            w.add_tensor(p + name + ".weight", q4_0(rng, rows, cols), raw_dtype=Q)
        w.add_tensor(p + "ffn_norm.weight", ones)
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", q4_0(rng, V, E), raw_dtype=Q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    write(a.out, a.shape, a.seed)
