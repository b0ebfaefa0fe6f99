"""KV-cache arithmetic: bytes of a K or V row for each cache element type llama.cpp accepts."""
from __future__ import annotations

from dataclasses import dataclass

import gguf
from gguf import GGMLQuantizationType

# KV-cache element types llama.cpp accepts for --cache-type-k/-v
CACHE_TYPES: dict[str, GGMLQuantizationType] = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "bf16": GGMLQuantizationType.BF16,
    "q8_0": GGMLQuantizationType.Q8_0,
    "q4_0": GGMLQuantizationType.Q4_0,
    "q4_1": GGMLQuantizationType.Q4_1,
    "iq4_nl": GGMLQuantizationType.IQ4_NL,
    "q5_0": GGMLQuantizationType.Q5_0,
    "q5_1": GGMLQuantizationType.Q5_1,
}
SUMMARY_CACHE_TYPES = ("f16", "q8_0", "q4_0")


def row_bytes(cache_type: str, n_elements: int) -> int:
    """Bytes of one row of `n_elements` values of a ggml type (ggml_row_size).

    f16: 2 bytes/element; q8_0: 34 bytes per block of 32; q4_0: 18 bytes per 32; ...
    Raises ValueError for an unknown type or a row that is not a whole number of blocks
    (ggml cannot store it).
    """
    try:
        qtype = CACHE_TYPES[cache_type.lower()]
    except KeyError:
        raise ValueError(f"unknown KV cache type {cache_type!r}; known: {', '.join(CACHE_TYPES)}") from None
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if n_elements % block:
        raise ValueError(f"a row of {n_elements} values is not a whole number of {cache_type} blocks of {block}")
    return n_elements // block * type_size


@dataclass(frozen=True)
class KVBytes:
    """KV-cache bytes for one token (K and V rows of every layer)."""

    total: int
    global_part: int  # layers that attend to the whole context
    sliding_part: int  # sliding-window layers (llama.cpp keeps only ~window tokens of these)
